package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/sds-server/internal/stepcainit"
)

// TestStepCARootRotation runs the README's procedure "Rotating step-ca's
// root" on a real step-ca behind sds-server, with two real Envoy sidecars
// under traffic (new connections and one keep-alive connection):
//
//  1. make root B and its intermediate;
//  2. add B to step-ca's "root" list, reload step-ca; wait until every
//     sidecar ACKed the bundle {A, B} (sds_trust_bundle_pending_nodes 0);
//  3. switch step-ca's intermediate to B's, reload; wait until every
//     sidecar serves a certificate under B;
//  4. remove A from "root", reload; wait until every sidecar ACKed {B}.
//
// No request may fail. Then sds-server restarts with its configuration
// still pinning A: it must start (it follows step-ca's roots, kept in its
// data dir) and admit a sidecar bootstrapped with a new token.
func TestStepCARootRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("step-ca root rotation e2e takes about 2 minutes")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	stepBin := tool(t, "SDS_STEPCA_BIN", ".tools/bin/step-ca")
	const ttl = 30 * time.Second
	begin := time.Now()
	ca := startStepCA(t, stepBin)
	cfg := ca.sdsConfig(t)
	appendFile(t, cfg, "  roots_refresh: 2s\n")
	srv := startServer(t, bin, "--config", cfg, "--cert-ttl", ttl.String(), "--allow-short-ttl")
	m := startMesh(t, srv, envoyBin)
	target := fmt.Sprintf("http://127.0.0.1:%d/work", m.feOut)
	eventually(t, 20*time.Second, "first request through the mesh", func() error {
		_, err := httpGet(target)
		return err
	})
	rootA := readCert(t, ca.RootFile)

	// Traffic: 10 req/s on new connections, 10 req/s on one keep-alive
	// connection, through frontend -> backend.
	bg := newBackground(t)
	var sent atomic.Int64
	var failMu sync.Mutex
	var failures []string
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
				err = errors.New(resp.Status)
			}
		}
		if err != nil {
			failMu.Lock()
			failures = append(failures, fmt.Sprintf("+%s %v", start.Sub(begin).Round(10*time.Millisecond), err))
			failMu.Unlock()
		}
	}
	bg.every(time.Second/10, func() { do(fresh) })
	bg.every(time.Second/10, func() { do(keep) })

	// The operator's check between steps: every connected sidecar ACKed
	// the current roots.
	waitRollout := func(what string, roots int) {
		t.Helper()
		eventually(t, 60*time.Second, what, func() error {
			r, a, p := srv.metric(t, "sds_trust_bundle_roots"), srv.metric(t, "sds_trust_bundle_acked_nodes"), srv.metric(t, "sds_trust_bundle_pending_nodes")
			if int(r) != roots || a != 2 || p != 0 {
				return fmt.Errorf("sds_trust_bundle_roots %v (want %d), acked_nodes %v (want 2), pending_nodes %v (want 0)", r, roots, a, p)
			}
			// `ca status` shows the same rollout as for the built-in CA.
			var st struct {
				CA struct {
					Roots []json.RawMessage `json:"roots"`
				} `json:"ca"`
				Bundle struct {
					Connected int `json:"connected"`
					Acked     int `json:"acked"`
				} `json:"bundle"`
			}
			if err := json.Unmarshal([]byte(srv.cli(t, "ca", "status", "-o", "json")), &st); err != nil {
				return fmt.Errorf("ca status -o json: %w", err)
			}
			if len(st.CA.Roots) != roots || st.Bundle.Connected != 2 || st.Bundle.Acked != 2 {
				return fmt.Errorf("ca status: %d roots (want %d), %d of %d sidecars on the bundle (want 2 of 2)", len(st.CA.Roots), roots, st.Bundle.Acked, st.Bundle.Connected)
			}
			return nil
		})
	}
	// What Envoy holds: its trust bundle and the root its certificate
	// chains to.
	checkEnvoys := func(what string, trust []*x509.Certificate, leafRoot *x509.Certificate) {
		t.Helper()
		eventually(t, 60*time.Second, what, func() error {
			for name, e := range map[string]*envoy{"frontend": m.frontend, "backend": m.backend} {
				n, err := envoyCACerts(e.admin)
				if err != nil {
					return err
				}
				if n != len(trust) {
					return fmt.Errorf("%s's Envoy trusts %d CA certificates, want %d", name, n, len(trust))
				}
			}
			for name, port := range map[string]int{"frontend": m.feIn, "backend": m.beIn} {
				if err := servedChainsTo(fmt.Sprintf("127.0.0.1:%d", port), leafRoot); err != nil {
					return fmt.Errorf("%s: %w", name, err)
				}
			}
			return nil
		})
	}
	checkEnvoys("sidecars on root A", []*x509.Certificate{rootA}, rootA)
	step := func(name string, f func()) {
		t.Helper()
		start := time.Now()
		f()
		failMu.Lock()
		n := len(failures)
		failMu.Unlock()
		t.Logf("step %q: %s (requests so far: %d sent, %d failed)", name, time.Since(start).Round(100*time.Millisecond), sent.Load(), n)
	}

	// 1. Root B and its intermediate.
	var b *stepcainit.Root
	step("1. make root B", func() {
		var err error
		if b, err = stepcainit.AddRoot(ca.CA, "sds-server test B", "b"); err != nil {
			t.Fatal(err)
		}
	})
	rootB := readCert(t, b.RootFile)

	// 2. step-ca serves {A, B}; every sidecar ACKs the bundle.
	step("2. add root B to step-ca, wait for every ACK", func() {
		if err := stepcainit.SetRoots(ca.ConfigFile, ca.RootFile, b.RootFile); err != nil {
			t.Fatal(err)
		}
		ca.reload(t, rootA, rootB)
		waitRollout("every sidecar ACKed {A, B}", 2)
	})
	checkEnvoys("sidecars trust A and B", []*x509.Certificate{rootA, rootB}, rootA)

	// 3. step-ca signs with B's intermediate; every sidecar renews under B.
	step("3. switch step-ca to B's intermediate, wait for leaves under B", func() {
		if err := stepcainit.SetIntermediate(ca.ConfigFile, b.IntermediateCert, b.IntermediateKey); err != nil {
			t.Fatal(err)
		}
		ca.reload(t, rootA, rootB)
		checkEnvoys("sidecars serve leaves under B", []*x509.Certificate{rootA, rootB}, rootB)
		// The SDS listener moved to B's intermediate too (sds-server
		// renews it when step-ca's intermediate changes).
		eventually(t, 30*time.Second, "the SDS listener's certificate under B", func() error { return servedChainsTo(srv.addr, rootB) })
	})
	// New tokens pin what the listener shows: B.
	attempts := 0
	eventually(t, 30*time.Second, "a sidecar bootstrapped on root B", func() error {
		attempts++
		return bootstrapLate(srv, "late-b")
	})
	t.Logf("a new token bootstrapped against the listener under B at attempt %d", attempts)

	// 4. A leaves step-ca; every sidecar ACKs {B}.
	step("4. remove root A from step-ca, wait for every ACK", func() {
		if err := stepcainit.SetRoots(ca.ConfigFile, b.RootFile); err != nil {
			t.Fatal(err)
		}
		ca.reload(t, rootB)
		waitRollout("every sidecar ACKed {B}", 1)
	})
	checkEnvoys("sidecars trust B alone", []*x509.Certificate{rootB}, rootB)
	time.Sleep(3 * time.Second) // traffic on the final state
	bg.stop()

	failMu.Lock()
	t.Logf("requests: %d sent, %d failed", sent.Load(), len(failures))
	if len(failures) > 0 {
		t.Errorf("%d requests failed during the rotation, e.g. %q", len(failures), failures[:min(5, len(failures))])
	}
	failMu.Unlock()
	if !strings.Contains(srv.out.String(), "step-ca roots changed") {
		t.Errorf("sds-server did not log the change of step-ca's roots:\n%s", tail(srv.out.String(), 30))
	}

	// 5. sds-server restarts with its configuration still pinning A:
	// it trusts B from its data dir, and new tokens pin B.
	restartAt := time.Now()
	srv.restart(t)
	eventually(t, 30*time.Second, "sds-server ready after the restart", func() error {
		_, err := httpGet("http://" + srv.metrics + "/readyz")
		return err
	})
	t.Logf("sds-server restarted on root B in %s", time.Since(restartAt).Round(100*time.Millisecond))
	if err := bootstrapLate(srv, "late-after-restart"); err != nil {
		t.Fatalf("bootstrap with a new token after the restart: %v", err)
	}
	// The sidecars bootstrapped before the rotation pinned A for their
	// connection to sds-server, whose certificate now chains to B alone.
	deadline := time.Now().Add(20 * time.Second)
	var connected float64
	for time.Now().Before(deadline) {
		if connected = srv.metric(t, "sds_connected_nodes"); connected == 2 {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("after the restart, %v of 2 sidecars bootstrapped on A reconnected within 20s", connected)
	for _, l := range lines(srv.out.String()) {
		if strings.Contains(l, "roots changed") || strings.Contains(l, "trust bundle") || strings.Contains(l, "CA: step-ca") {
			t.Log(l)
		}
	}
	for _, l := range lines(m.frontend.out.String()) {
		if strings.Contains(l, "sds_cluster") || strings.Contains(l, "CERTIFICATE_VERIFY_FAILED") || strings.Contains(l, "xds") {
			t.Log(l)
		}
	}
	t.Logf("total %s", time.Since(begin).Round(time.Second))
}

// bootstrapLate creates a token and runs `bootstrap envoy` with it: the
// handshake's root must match the root the token pins.
func bootstrapLate(srv *server, node string) error {
	tok, errOut, code := srv.cliResult("token", "create", "--service", "late")
	if code != 0 {
		return fmt.Errorf("token create: %s", errOut)
	}
	dir, err := os.MkdirTemp("", "late")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	_, errOut, code = srv.cliResult("bootstrap", "envoy", "--server", srv.addr, "--token", strings.TrimSpace(tok), "--service-port", "9",
		"--listen", "127.0.0.1:1", "--admin", "127.0.0.1:2", "--node-id", node, "-o", dir+"/late.yaml")
	if code != 0 {
		return fmt.Errorf("bootstrap envoy: %s", errOut)
	}
	return nil
}

// reload makes step-ca re-read ca.json (SIGHUP) and waits until it serves
// exactly want at /roots, over TLS verified against want.
func (s *stepCA) reload(t *testing.T, want ...*x509.Certificate) {
	t.Helper()
	if err := syscall.Kill(s.proc.pid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range want {
		pool.AddCert(c)
	}
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	eventually(t, 20*time.Second, fmt.Sprintf("step-ca serving %d roots after SIGHUP", len(want)), func() error {
		if !s.proc.alive() {
			t.Fatalf("step-ca exited:\n%s", tail(s.proc.out.String(), 30))
		}
		resp, err := c.Get(s.URL + "/roots")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var body struct {
			Crts []string `json:"crts"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			return err
		}
		if len(body.Crts) != len(want) {
			return fmt.Errorf("step-ca serves %d roots, want %d", len(body.Crts), len(want))
		}
		for i, p := range body.Crts {
			blk, _ := pem.Decode([]byte(p))
			if blk == nil {
				return fmt.Errorf("root %d: no PEM", i)
			}
			got, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return err
			}
			found := false
			for _, w := range want {
				found = found || w.Equal(got)
			}
			if !found {
				return fmt.Errorf("step-ca serves root %s, not wanted", got.Subject)
			}
		}
		return nil
	})
}

// envoyCACerts counts the CA certificates Envoy's admin /certs reports for
// the mesh's TLS contexts (those with a workload certificate): the trust
// bundle from ROOTCA. The static context of the xds cluster (the root the
// bootstrap pinned) is left out. Contexts that disagree are an error.
func envoyCACerts(admin string) (int, error) {
	body, err := httpGet("http://" + admin + "/certs")
	if err != nil {
		return 0, err
	}
	var v struct {
		Certificates []struct {
			CACert []struct {
				SerialNumber string `json:"serial_number"`
			} `json:"ca_cert"`
			CertChain []json.RawMessage `json:"cert_chain"`
		} `json:"certificates"`
	}
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		return 0, err
	}
	n := -1
	for _, c := range v.Certificates {
		if len(c.CertChain) == 0 {
			continue
		}
		if n >= 0 && len(c.CACert) != n {
			return 0, fmt.Errorf("Envoy at %s: TLS contexts trust %d and %d CA certificates", admin, n, len(c.CACert))
		}
		n = len(c.CACert)
	}
	if n < 0 {
		return 0, fmt.Errorf("Envoy at %s has no TLS context with a certificate yet", admin)
	}
	return n, nil
}

// servedChainsTo checks that the certificate a sidecar's inbound listener
// serves chains to root (and to it alone of the test's roots).
func servedChainsTo(addr string, root *x509.Certificate) error {
	var chain []*x509.Certificate
	conf := &tls.Config{InsecureSkipVerify: true, VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error { //nolint:gosec // the chain is checked below
		for _, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return err
			}
			chain = append(chain, c)
		}
		return nil
	}}
	d := &net.Dialer{Timeout: 2 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, conf)
	if conn != nil {
		conn.Close()
	}
	if len(chain) == 0 {
		return fmt.Errorf("no certificate from %s: %v", addr, err)
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	pool.AddCert(root)
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("certificate served at %s (serial %x) does not chain to %s: %w", addr, chain[0].SerialNumber, root.Subject.CommonName, err)
	}
	return nil
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func appendFile(t *testing.T, path, text string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
}
