package e2e

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/url"
	"regexp"
	"sync"
	"testing"
	"time"
)

// certsView is the part of Envoy's admin /certs answer the tests read.
type certsView struct {
	Certificates []struct {
		CertChain []struct {
			SerialNumber   string    `json:"serial_number"`
			ValidFrom      time.Time `json:"valid_from"`
			ExpirationTime time.Time `json:"expiration_time"`
		} `json:"cert_chain"`
	} `json:"certificates"`
}

// servedCert is a workload certificate as Envoy's admin reports it.
type servedCert struct {
	serial    string
	issuedAt  time.Time // valid_from + the 1 minute backdate
	notAfter  time.Time
	firstSeen time.Time
}

// certWatcher polls a sidecar's /certs and records every distinct leaf
// certificate it has loaded, in order.
type certWatcher struct {
	mu    sync.Mutex
	seen  []servedCert
	known map[string]bool
	errs  int
}

func (w *certWatcher) poll(admin string) {
	body, err := httpGet("http://" + admin + "/certs")
	if err != nil {
		w.mu.Lock()
		w.errs++
		w.mu.Unlock()
		return
	}
	var v certsView
	if json.Unmarshal([]byte(body), &v) != nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range v.Certificates {
		if len(c.CertChain) == 0 {
			continue
		}
		leaf := c.CertChain[0]
		if w.known[leaf.SerialNumber] {
			continue
		}
		w.known[leaf.SerialNumber] = true
		w.seen = append(w.seen, servedCert{serial: leaf.SerialNumber, issuedAt: leaf.ValidFrom.Add(time.Minute),
			notAfter: leaf.ExpirationTime, firstSeen: time.Now()})
	}
}

func (w *certWatcher) certs() []servedCert {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]servedCert(nil), w.seen...)
}

var xfccCertRE = regexp.MustCompile(`Cert="([^"]+)"`)

// xfccSerials returns the distinct client certificate serials (hex) the app
// saw in x-forwarded-client-cert.
func (a *app) xfccSerials(t *testing.T) map[string]bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[string]bool{}
	for _, x := range a.xfcc {
		m := xfccCertRE.FindStringSubmatch(x)
		if m == nil {
			continue
		}
		p, err := url.QueryUnescape(m[1])
		if err != nil {
			t.Errorf("x-forwarded-client-cert Cert field: %v", err)
			continue
		}
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Errorf("x-forwarded-client-cert certificate: %v", err)
			continue
		}
		out[fmt.Sprintf("%x", c.SerialNumber)] = true
	}
	return out
}

// TestRotation drives steady traffic through frontend -> backend while both
// sidecars' 30 s certificates rotate at least three times, pushed on the
// open SDS streams: no request may fail and no Envoy may restart.
func TestRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("rotation e2e takes about 90 s")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	const ttl = 30 * time.Second
	srv := startServer(t, bin, "--cert-ttl", ttl.String(), "--allow-short-ttl")
	m := startMesh(t, srv, envoyBin, "--max-connection-duration", "5s")
	pids := map[string]int{"frontend": m.frontend.pid(), "backend": m.backend.pid()}
	target := fmt.Sprintf("http://127.0.0.1:%d/work", m.feOut)
	eventually(t, 20*time.Second, "first request through the mesh", func() error {
		_, err := httpGet(target)
		return err
	})

	watchers := map[string]*certWatcher{"frontend": {known: map[string]bool{}}, "backend": {known: map[string]bool{}}}
	admins := map[string]string{"frontend": m.frontend.admin, "backend": m.backend.admin}
	bg := newBackground(t)
	tr := startTraffic(bg, target, 15, 10)
	bg.every(200*time.Millisecond, func() {
		for name, w := range watchers {
			w.poll(admins[name])
		}
	})

	// Initial certificate + 3 rotations = 4 serials on each sidecar; the
	// 4th arrives by 3 × 80 % × 30 s = 72 s after the first.
	deadline := time.Now().Add(110 * time.Second)
	for time.Now().Before(deadline) {
		if len(watchers["frontend"].certs()) >= 4 && len(watchers["backend"].certs()) >= 4 {
			break
		}
		time.Sleep(time.Second)
	}
	time.Sleep(2 * time.Second) // traffic on the last certificates too
	bg.stop()

	t.Logf("requests: %d sent, %d failed, %d on the reused keep-alive connection", tr.sent.Load(), tr.failed.Load(), tr.keepAliveReused.Load())
	if tr.failed.Load() != 0 {
		t.Errorf("%d of %d requests failed during rotation, e.g. %q", tr.failed.Load(), tr.sent.Load(), tr.firstFailures())
	}
	if tr.keepAliveReused.Load() < 100 {
		t.Errorf("the keep-alive connection was reused for only %d requests; want it to live through the rotations", tr.keepAliveReused.Load())
	}
	for name, w := range watchers {
		certs := w.certs()
		if len(certs) < 4 {
			t.Errorf("%s: saw %d certificates, want at least 4 (3 rotations)", name, len(certs))
			continue
		}
		for i := 1; i < len(certs); i++ {
			prev, next := certs[i-1], certs[i]
			life := prev.notAfter.Sub(prev.issuedAt)
			frac := float64(next.issuedAt.Sub(prev.issuedAt)) / float64(life)
			t.Logf("%s: rotation %d: serial %s -> %s at %.3f of a %s life", name, i, prev.serial, next.serial, frac, life)
			// valid_from has 1 s precision: allow 1/30 either side.
			if frac < 0.5-0.04 || frac > 0.8+0.04 {
				t.Errorf("%s: rotation %d at %.3f of the previous certificate's life, want 0.5-0.8", name, i, frac)
			}
		}
	}
	if serials := m.backendApp.xfccSerials(t); len(serials) < 3 {
		t.Errorf("backend saw %d distinct frontend certificates, want at least 3", len(serials))
	}
	for name, p := range map[string]*envoy{"frontend": m.frontend, "backend": m.backend} {
		if !p.alive() || p.pid() != pids[name] {
			t.Errorf("%s Envoy restarted or died (pid %d at start)", name, pids[name])
		}
	}
}
