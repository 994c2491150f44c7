package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/sds-server/internal/stepcainit"
)

// stepCA is a real step-ca process the test owns.
type stepCA struct {
	*stepcainit.CA
	bin  string
	proc *proc
}

// startStepCA creates a step-ca (root, intermediate, the JWK provisioner
// with deploy/step-ca/sds-server.tpl, bbolt DB) on a free loopback port and
// runs it.
func startStepCA(t *testing.T, bin string) *stepCA {
	t.Helper()
	return startStepCAWith(t, bin, stepcainit.Options{})
}

// startStepCAWith is startStepCA with more options (Dir, Address and the
// lifetime claims are set here).
func startStepCAWith(t *testing.T, bin string, opts stepcainit.Options) *stepCA {
	t.Helper()
	opts.Dir = t.TempDir()
	opts.Address = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	opts.MinTLSCertDuration, opts.MaxTLSCertDuration = 10*time.Second, 24*time.Hour
	ca, err := stepcainit.Init(opts)
	if err != nil {
		t.Fatal(err)
	}
	s := &stepCA{CA: ca, bin: bin}
	s.start(t)
	return s
}

// start runs step-ca and waits until /health answers over TLS verified
// against its root.
func (s *stepCA) start(t *testing.T) {
	t.Helper()
	s.proc = start(t, "step-ca", exec.Command(s.bin, "--password-file", s.PasswordFile, s.ConfigFile))
	pem, err := os.ReadFile(s.RootFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	eventually(t, 20*time.Second, "step-ca healthy", func() error {
		if !s.proc.alive() {
			t.Fatalf("step-ca exited:\n%s", tail(s.proc.out.String(), 30))
		}
		resp, err := c.Get(s.URL + "/health")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "ok") {
			return fmt.Errorf("health: %s %s", resp.Status, b)
		}
		return nil
	})
}

// sdsConfig writes an sds-server config file that points at s.
func (s *stepCA) sdsConfig(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sds-server.yaml")
	cfg := fmt.Sprintf("ca:\n  backend: stepca\n  url: %s\n  root_fingerprint: %s\n  provisioner: %s\n  key_file: %s\n  password_file: %s\n",
		s.URL, s.Fingerprint, s.Provisioner, s.KeyFile, s.ProvisionerPasswordFile)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// metric returns the value of the sample named exactly sample (name and
// labels as Prometheus prints them) on the server's /metrics.
func (s *server) metric(t *testing.T, sample string) float64 {
	t.Helper()
	body, err := httpGet("http://" + s.metrics + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sample) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatalf("metric %s: %v", sample, err)
	}
	return v
}

// failure is a request through the mesh that did not get a 200.
type failure struct {
	at  time.Time
	err string
}

// TestStepCA runs sds-server on a real step-ca process with two real Envoy
// sidecars: the certificates Envoy serves come from step-ca (openssl verify
// against its root) with the identity of DESIGN.md, and rotate. Then step-ca
// is stopped for longer than a renewal window and restarted: no request may
// fail while the sidecars' certificates are valid, renewals resume, and the
// metrics count the failed attempts.
func TestStepCA(t *testing.T) {
	if testing.Short() {
		t.Skip("step-ca e2e takes about 2 minutes")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	stepBin := tool(t, "SDS_STEPCA_BIN", ".tools/bin/step-ca")
	const (
		ttl    = 30 * time.Second
		outage = 25 * time.Second // > the 24 s a renewal may wait (80 % of ttl)
	)
	begin := time.Now()
	ca := startStepCA(t, stepBin)
	srv := startServer(t, bin, "--config", ca.sdsConfig(t), "--cert-ttl", ttl.String(), "--allow-short-ttl")
	if !strings.Contains(srv.out.String(), "step-ca at "+ca.URL) {
		t.Fatalf("sds-server does not report step-ca as its CA:\n%s", srv.out.String())
	}
	m := startMesh(t, srv, envoyBin, "--max-connection-duration", "5s")
	pids := map[string]int{"frontend": m.frontend.pid(), "backend": m.backend.pid()}
	target := fmt.Sprintf("http://127.0.0.1:%d/work", m.feOut)
	eventually(t, 20*time.Second, "first request through the mesh", func() error {
		_, err := httpGet(target)
		return err
	})
	t.Logf("mesh up on step-ca certificates %s after start", time.Since(begin).Round(time.Millisecond))

	// What Envoy serves chains to step-ca's root and carries the identity.
	checkServedCertificateRoot(t, srv, fmt.Sprintf("127.0.0.1:%d", m.beIn), "backend", "default", ca.RootFile)
	checkServedCertificateRoot(t, srv, fmt.Sprintf("127.0.0.1:%d", m.feIn), "frontend", "default", ca.RootFile)
	if x := m.backendApp.lastXFCC(); !strings.Contains(x, "URI=spiffe://mesh.local/ns/default/sa/frontend") {
		t.Fatalf("backend saw x-forwarded-client-cert %q, want the frontend's SPIFFE ID", x)
	}

	watchers := map[string]*certWatcher{"frontend": {known: map[string]bool{}}, "backend": {known: map[string]bool{}}}
	admins := map[string]string{"frontend": m.frontend.admin, "backend": m.backend.admin}
	bg := newBackground(t)
	var sent atomic.Int64
	var failMu sync.Mutex
	var failures []failure
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	keep := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Hour}}
	do := func(c *http.Client) {
		sent.Add(1)
		start := time.Now()
		resp, err := c.Get(target)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("%s", resp.Status)
			}
		}
		if err != nil {
			failMu.Lock()
			failures = append(failures, failure{at: start, err: err.Error()})
			failMu.Unlock()
		}
	}
	bg.every(time.Second/10, func() { do(fresh) })
	bg.every(time.Second/10, func() { do(keep) })
	bg.every(200*time.Millisecond, func() {
		for name, w := range watchers {
			w.poll(admins[name])
		}
	})
	stopTraffic := bg.stop
	waitCerts := func(what string, timeout time.Duration, ok func(certs []servedCert) bool) {
		t.Helper()
		deadline := time.Now().Add(timeout)
		for time.Now().Before(deadline) {
			if ok(watchers["frontend"].certs()) && ok(watchers["backend"].certs()) {
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("%s: not within %s (frontend saw %d certificates, backend %d)", what, timeout, len(watchers["frontend"].certs()), len(watchers["backend"].certs()))
	}

	// 1. Certificates rotate on step-ca.
	waitCerts("a rotation on each sidecar", 30*time.Second, func(c []servedCert) bool { return len(c) >= 2 })
	issued := srv.metric(t, `sds_certificates_issued_total{result="success"}`)
	latSum := srv.metric(t, "sds_certificate_issuance_duration_seconds_sum")
	latCount := srv.metric(t, "sds_certificate_issuance_duration_seconds_count")
	if latCount > 0 {
		t.Logf("issuance via step-ca: %.0f certificates, mean %.1f ms (key generation + token + sign)", issued, 1000*latSum/latCount)
	}
	if f := srv.metric(t, `sds_certificates_issued_total{result="failure"}`); f != 0 {
		t.Errorf("%.0f issuance failures before step-ca was stopped", f)
	}

	// 2. step-ca down for longer than a renewal window.
	stoppedAt := time.Now()
	ca.proc.stop()
	t.Logf("step-ca stopped at +%s for %s", stoppedAt.Sub(begin).Round(time.Second), outage)
	time.Sleep(outage)
	failedAttempts := srv.metric(t, `sds_certificates_issued_total{result="failure"}`)
	renewalFailing := srv.metric(t, "sds_nodes_renewal_failing")
	restartedAt := time.Now()
	ca.start(t)
	t.Logf("step-ca back at +%s; %.0f failed issuance attempts, %.0f nodes renewal-failing during the outage", restartedAt.Sub(begin).Round(time.Second), failedAttempts, renewalFailing)
	if failedAttempts == 0 {
		t.Errorf(`sds_certificates_issued_total{result="failure"} is 0 after a %s outage; want the failed renewals counted`, outage)
	}

	// 3. Renewals resume: both sidecars get a certificate issued after the
	// restart. The server retries with full-jitter backoff capped at a tenth
	// of the certificate lifetime (3 s here).
	waitCerts("a renewal after step-ca came back", 30*time.Second, func(c []servedCert) bool {
		return len(c) > 0 && !c[len(c)-1].issuedAt.Before(restartedAt.Truncate(time.Second))
	})
	resumedAt := time.Now()
	time.Sleep(2 * time.Second) // traffic on the new certificates too
	stopTraffic()
	t.Logf("renewals resumed %s after step-ca came back", resumedAt.Sub(restartedAt).Round(100*time.Millisecond))

	// The renewed certificates chain to step-ca's root too.
	checkServedCertificateRoot(t, srv, fmt.Sprintf("127.0.0.1:%d", m.beIn), "backend", "default", ca.RootFile)

	// No request failed while both sidecars' certificates were valid. A
	// certificate may expire during the outage (its renewal can fall due up
	// to 24 s before step-ca stops, leaving as little as 6 s), and requests
	// then fail until the renewal lands: that is allowed.
	validAt := func(at time.Time) (bool, string) {
		for name, w := range watchers {
			var cur *servedCert
			for _, c := range w.certs() {
				if !c.firstSeen.After(at) {
					cur = &c
				}
			}
			// One second of slack: NotAfter has whole seconds.
			if cur == nil || !cur.notAfter.After(at.Add(time.Second)) {
				return false, name
			}
		}
		return true, ""
	}
	failMu.Lock()
	var whileValid, whileExpired []string
	for _, f := range failures {
		line := fmt.Sprintf("+%s %s", f.at.Sub(begin).Round(10*time.Millisecond), f.err)
		if ok, _ := validAt(f.at); ok {
			whileValid = append(whileValid, line)
		} else {
			whileExpired = append(whileExpired, line)
		}
	}
	failMu.Unlock()
	t.Logf("requests: %d sent, %d failed while certificates were valid, %d while a sidecar's certificate had expired", sent.Load(), len(whileValid), len(whileExpired))
	if len(whileValid) > 0 {
		t.Errorf("%d requests failed while both sidecars held valid certificates, e.g. %q", len(whileValid), whileValid[:min(5, len(whileValid))])
	}
	for name, w := range watchers {
		certs := w.certs()
		for i, c := range certs {
			t.Logf("%s: certificate %d: serial %s issued +%s, expires +%s, seen +%s", name, i, c.serial,
				c.issuedAt.Sub(begin).Round(time.Second), c.notAfter.Sub(begin).Round(time.Second), c.firstSeen.Sub(begin).Round(100*time.Millisecond))
		}
		if last := certs[len(certs)-1]; !last.notAfter.After(time.Now()) {
			t.Errorf("%s serves an expired certificate at the end", name)
		}
	}
	if f := srv.metric(t, `sds_certificates_issued_total{result="failure"}`); f < failedAttempts {
		t.Errorf("failure count went down: %.0f < %.0f", f, failedAttempts)
	}
	if err := func() error { _, err := httpGet("http://" + srv.metrics + "/readyz"); return err }(); err != nil {
		t.Errorf("server not ready after step-ca came back: %v", err)
	}
	for name, p := range map[string]*envoy{"frontend": m.frontend, "backend": m.backend} {
		if !p.alive() || p.pid() != pids[name] {
			t.Errorf("%s Envoy restarted or died (pid %d at start)", name, pids[name])
		}
	}
	t.Logf("total %s", time.Since(begin).Round(time.Second))
}
