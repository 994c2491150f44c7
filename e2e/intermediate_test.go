package e2e

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// servedIssuer returns the subject common name of the issuer of the
// "default" certificate a sidecar holds, from its config dump.
func servedIssuer(admin string) (string, error) {
	body, err := httpGet("http://" + admin + "/config_dump?resource=dynamic_active_secrets")
	if err != nil {
		return "", err
	}
	var dump struct {
		Configs []struct {
			Name   string `json:"name"`
			Secret struct {
				TLSCertificate struct {
					CertificateChain struct {
						InlineBytes string `json:"inline_bytes"`
					} `json:"certificate_chain"`
				} `json:"tls_certificate"`
			} `json:"secret"`
		} `json:"configs"`
	}
	if err := json.Unmarshal([]byte(body), &dump); err != nil {
		return "", err
	}
	for _, c := range dump.Configs {
		if c.Name != "default" {
			continue
		}
		raw, err := base64.StdEncoding.DecodeString(c.Secret.TLSCertificate.CertificateChain.InlineBytes)
		if err != nil {
			return "", err
		}
		b, _ := pem.Decode(raw)
		if b == nil {
			return "", fmt.Errorf("no PEM in the default secret")
		}
		leaf, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return "", err
		}
		return leaf.Issuer.CommonName, nil
	}
	return "", fmt.Errorf("no default secret in the config dump")
}

var activatedRE = regexp.MustCompile(`(?m)^time=(\S+) level=INFO msg="intermediate CA activated[^"]*" generation=(\d+)`)

// TestIntermediateRenewal runs the built-in CA with a 60 s intermediate
// under steady traffic between two sidecars (20 s leaves) until the
// intermediate has been renewed twice and both sidecars serve leaves of
// the third one: no request may fail and no Envoy may restart.
func TestIntermediateRenewal(t *testing.T) {
	if testing.Short() {
		t.Skip("intermediate renewal e2e takes about 110 s")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	const interTTL = 60 * time.Second
	t.Setenv("SDS_CA_INTERMEDIATE_TTL", interTTL.String())
	srv := startServer(t, bin, "--cert-ttl", "20s", "--allow-short-ttl")
	started := time.Now()
	m := startMesh(t, srv, envoyBin, "--max-connection-duration", "5s")
	pids := map[string]int{"frontend": m.frontend.pid(), "backend": m.backend.pid()}
	target := fmt.Sprintf("http://127.0.0.1:%d/work", m.feOut)
	eventually(t, 20*time.Second, "first request through the mesh", func() error {
		_, err := httpGet(target)
		return err
	})

	bg := newBackground(t)
	tr := startTraffic(bg, target, 15, 10)
	watchers := map[string]*certWatcher{"frontend": {known: map[string]bool{}}, "backend": {known: map[string]bool{}}}
	admins := map[string]string{"frontend": m.frontend.admin, "backend": m.backend.admin}
	bg.every(200*time.Millisecond, func() {
		for name, w := range watchers {
			w.poll(admins[name])
		}
	})

	// Two activations: generation 3 signs. Renewal comes when a third of
	// the 60 s is left (40 s in), activation ~2 s later: ~84 s for two.
	eventually(t, 150*time.Second, "intermediate generation 3 activated", func() error {
		if n := len(activatedRE.FindAllString(srv.out.String(), -1)); n < 2 {
			return fmt.Errorf("%d activations so far", n)
		}
		return nil
	})
	eventually(t, 40*time.Second, "both sidecars serve a leaf of generation 3", func() error {
		for name, admin := range admins {
			cn, err := servedIssuer(admin)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if cn != "sds-server intermediate CA 3" {
				return fmt.Errorf("%s serves a leaf of %q", name, cn)
			}
		}
		return nil
	})
	time.Sleep(3 * time.Second) // traffic on the new leaves too
	bg.stop()

	t.Logf("requests: %d sent, %d failed, %d on the reused keep-alive connection", tr.sent.Load(), tr.failed.Load(), tr.keepAliveReused.Load())
	if tr.failed.Load() != 0 {
		t.Errorf("%d of %d requests failed during intermediate renewal, e.g. %q", tr.failed.Load(), tr.sent.Load(), tr.firstFailures())
	}
	if tr.keepAliveReused.Load() < 100 {
		t.Errorf("the keep-alive connection was reused for only %d requests", tr.keepAliveReused.Load())
	}
	var prev time.Time
	for _, a := range activatedRE.FindAllStringSubmatch(srv.out.String(), -1) {
		at, err := time.Parse(time.RFC3339Nano, a[1])
		if err != nil {
			t.Fatal(err)
		}
		gap := ""
		if !prev.IsZero() {
			gap = fmt.Sprintf(", %s after the previous one", at.Sub(prev).Round(100*time.Millisecond))
		}
		t.Logf("generation %s activated %s after the server started%s", a[2], at.Sub(started).Round(100*time.Millisecond), gap)
		prev = at
	}
	for name, w := range watchers {
		certs := w.certs()
		shortest := time.Duration(0)
		for _, c := range certs {
			if life := c.notAfter.Sub(c.issuedAt); shortest == 0 || life < shortest {
				shortest = life
			}
		}
		t.Logf("%s: %d leaves served, shortest lifetime %s", name, len(certs), shortest)
		// Leaves clamped to an expiring intermediate stay long enough to
		// be renewed onto the next one: no renewal storm.
		if shortest < 10*time.Second {
			t.Errorf("%s: a leaf of %s was served: clamping made it too short", name, shortest)
		}
	}
	if body, err := httpGet("http://" + srv.metrics + "/metrics"); err != nil {
		t.Error(err)
	} else if n := metricValue(body, `sds_ca_intermediate_renewals_total{result="success"}`); n < 2 {
		t.Errorf("sds_ca_intermediate_renewals_total{result=\"success\"} = %g, want at least 2", n)
	}
	for name, p := range map[string]*envoy{"frontend": m.frontend, "backend": m.backend} {
		if !p.alive() || p.pid() != pids[name] {
			t.Errorf("%s Envoy restarted or died (pid %d at start)", name, pids[name])
		}
	}
}

// metricValue returns the value of the sample line that starts with
// series in a Prometheus text exposition, or -1.
func metricValue(body, series string) float64 {
	for _, l := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(l, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err == nil {
				return v
			}
		}
	}
	return -1
}
