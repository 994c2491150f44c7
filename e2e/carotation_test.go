package e2e

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// logRec is one slog text line of the server: its time and attributes.
type logRec struct {
	at    time.Time
	attrs map[string]string
}

// logRecords returns the server's log lines whose msg is msg, in order.
func logRecords(t *testing.T, out, msg string) []logRec {
	t.Helper()
	var recs []logRec
	for _, l := range strings.Split(out, "\n") {
		attrs := parseSlogText(l)
		if attrs["msg"] != msg {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, attrs["time"])
		if err != nil {
			t.Fatalf("log line %q: time: %v", l, err)
		}
		recs = append(recs, logRec{at: at, attrs: attrs})
	}
	return recs
}

// parseSlogText splits a log/slog text line into its key=value pairs
// (values quoted when they hold spaces or quotes).
func parseSlogText(l string) map[string]string {
	m := map[string]string{}
	for l = strings.TrimSpace(l); l != ""; l = strings.TrimLeft(l, " ") {
		k, rest, ok := strings.Cut(l, "=")
		if !ok || strings.Contains(k, " ") {
			return m
		}
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return m
			}
			v, _ := strconv.Unquote(q)
			m[k], l = v, rest[len(q):]
			continue
		}
		v, after, _ := strings.Cut(rest, " ")
		m[k], l = v, after
	}
	return m
}

// normSerial writes a hex serial number the way serialHex and Envoy's
// admin might differ on (case, leading zeros, separators) in one form.
func normSerial(s string) string {
	n, ok := new(big.Int).SetString(strings.ReplaceAll(strings.ToLower(s), ":", ""), 16)
	if !ok {
		return s
	}
	return n.Text(16)
}

// sidecarSecrets is what a sidecar holds from SDS, read from its config
// dump: the "default" chain and the "ROOTCA" trusted CAs.
type sidecarSecrets struct {
	chain []*x509.Certificate
	roots []*x509.Certificate
}

func parsePEMCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out, nil
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
}

func readSidecarSecrets(admin string) (sidecarSecrets, error) {
	body, err := httpGet("http://" + admin + "/config_dump?resource=dynamic_active_secrets")
	if err != nil {
		return sidecarSecrets{}, err
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
				ValidationContext struct {
					TrustedCA struct {
						InlineBytes string `json:"inline_bytes"`
					} `json:"trusted_ca"`
				} `json:"validation_context"`
			} `json:"secret"`
		} `json:"configs"`
	}
	if err := json.Unmarshal([]byte(body), &dump); err != nil {
		return sidecarSecrets{}, err
	}
	var s sidecarSecrets
	for _, c := range dump.Configs {
		var raw string
		switch c.Name {
		case "default":
			raw = c.Secret.TLSCertificate.CertificateChain.InlineBytes
		case "ROOTCA":
			raw = c.Secret.ValidationContext.TrustedCA.InlineBytes
		default:
			continue
		}
		b, err := base64.StdEncoding.DecodeString(raw)
		if err != nil {
			return sidecarSecrets{}, err
		}
		certs, err := parsePEMCerts(b)
		if err != nil {
			return sidecarSecrets{}, fmt.Errorf("%s: %w", c.Name, err)
		}
		if c.Name == "default" {
			s.chain = certs
		} else {
			s.roots = certs
		}
	}
	if len(s.chain) == 0 || len(s.roots) == 0 {
		return sidecarSecrets{}, fmt.Errorf("default or ROOTCA secret missing from the config dump")
	}
	return s, nil
}

// chainWatcher records, for every leaf a sidecar has held, the root its
// chain's intermediate was signed by (issuer common name).
type chainWatcher struct {
	mu       sync.Mutex
	interCA  map[string]string // normalised leaf serial -> intermediate's issuer CN
	lastLeaf string
}

func (w *chainWatcher) poll(admin string) {
	s, err := readSidecarSecrets(admin)
	if err != nil || len(s.chain) < 2 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	serial := normSerial(s.chain[0].SerialNumber.Text(16))
	w.interCA[serial] = s.chain[1].Issuer.CommonName
	w.lastLeaf = serial
}

func (w *chainWatcher) rootOf(serial string) (string, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	cn, ok := w.interCA[normSerial(serial)]
	return cn, ok
}

func (w *chainWatcher) last() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastLeaf
}

// caStatusJSON is the part of `sds-server ca status -o json` the test reads.
type caStatusJSON struct {
	CA struct {
		Roots []struct {
			Subject string `json:"subject"`
			Serial  string `json:"serial"`
		} `json:"roots"`
	} `json:"ca"`
	Bundle struct {
		Version string `json:"version"`
	} `json:"bundle"`
	Rotation *struct {
		Phase   string `json:"phase"`
		Done    int    `json:"done"`
		Total   int    `json:"total"`
		History []struct {
			Phase  string    `json:"phase"`
			At     time.Time `json:"at"`
			Done   int       `json:"done"`
			Total  int       `json:"total"`
			Forced []string  `json:"forced"`
		} `json:"history"`
	} `json:"rotation"`
}

func caStatus(t *testing.T, srv *server) caStatusJSON {
	t.Helper()
	var st caStatusJSON
	if err := json.Unmarshal([]byte(srv.cli(t, "ca", "status", "-o", "json")), &st); err != nil {
		t.Fatalf("ca status -o json: %v", err)
	}
	return st
}

// certsCA is the part of Envoy's /certs about trusted CAs.
type certsCA struct {
	Certificates []struct {
		CACert []struct {
			SerialNumber string `json:"serial_number"`
		} `json:"ca_cert"`
		CertChain []struct {
			SerialNumber string `json:"serial_number"`
		} `json:"cert_chain"`
	} `json:"certificates"`
}

// TestRootRotationUnderTraffic runs `ca rotate` on the built-in CA with two
// sidecars under 25 req/s (15/s on fresh connections, 10/s on one
// keep-alive connection) and 30 s leaves: no request may fail, each phase
// advances only after both sidecars' ACKs (from the server's log), and at
// the end each Envoy serves a leaf under B and trusts B alone. Then the
// server restarts: both Envoys, bootstrapped with tokens pinning A before
// the rotation, reconnect and get a new certificate.
func TestRootRotationUnderTraffic(t *testing.T) {
	if testing.Short() {
		t.Skip("root rotation e2e takes about 90 s")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	srv := startServer(t, bin, "--cert-ttl", "30s", "--allow-short-ttl")
	m := startMesh(t, srv, envoyBin, "--max-connection-duration", "5s")
	pids := map[string]int{"frontend": m.frontend.pid(), "backend": m.backend.pid()}
	admins := map[string]string{"frontend": m.frontend.admin, "backend": m.backend.admin}
	target := fmt.Sprintf("http://127.0.0.1:%d/work", m.feOut)
	eventually(t, 20*time.Second, "first request through the mesh", func() error {
		_, err := httpGet(target)
		return err
	})
	// The server's node IDs, from its admission log lines.
	nodes := map[string]string{}
	for _, r := range logRecords(t, srv.out.String(), "node admitted") {
		nodes[r.attrs["service"]] = r.attrs["node_id"]
	}
	if nodes["frontend"] == "" || nodes["backend"] == "" {
		t.Fatalf("node IDs from the log: %v", nodes)
	}
	before := caStatus(t, srv)
	if len(before.CA.Roots) != 1 {
		t.Fatalf("%d roots before the rotation, want 1", len(before.CA.Roots))
	}
	rootA := before.CA.Roots[0]

	bg := newBackground(t)
	tr := startTraffic(bg, target, 15, 10)
	watchers := map[string]*chainWatcher{"frontend": {interCA: map[string]string{}}, "backend": {interCA: map[string]string{}}}
	bg.every(200*time.Millisecond, func() {
		for name, w := range watchers {
			w.poll(admins[name])
		}
	})
	time.Sleep(3 * time.Second) // traffic before the rotation too

	srv.cli(t, "ca", "rotate", "--renew-over", "20s")
	var final caStatusJSON
	eventually(t, 120*time.Second, "root rotation complete (ca status phase none)", func() error {
		final = caStatus(t, srv)
		if final.Rotation == nil || final.Rotation.Phase != "none" {
			if final.Rotation != nil {
				return fmt.Errorf("phase %s, %d of %d done", final.Rotation.Phase, final.Rotation.Done, final.Rotation.Total)
			}
			return fmt.Errorf("no rotation reported")
		}
		return nil
	})
	time.Sleep(3 * time.Second) // traffic on the new chains only

	// Phase times and gates, from the server's own log.
	log1 := srv.out.String()
	start := logRecords(t, log1, "root rotation started: new root in the trust bundle")
	adv := logRecords(t, log1, "root rotation phase advanced")
	if len(start) != 1 || len(adv) != 3 {
		t.Fatalf("log has %d rotation starts and %d phase advances, want 1 and 3:\n%s", len(start), len(adv), tail(log1, 40))
	}
	t0 := start[0].at
	phaseEnd := map[string]time.Time{}
	for _, a := range adv {
		phaseEnd[a.attrs["from"]] = a.at
		if a.attrs["sidecars_done"] != "2" || a.attrs["sidecars"] != "2" || a.attrs["forced"] != "" {
			t.Errorf("phase %s advanced with %s of %s sidecars done, forced %q; want 2 of 2, none forced",
				a.attrs["from"], a.attrs["sidecars_done"], a.attrs["sidecars"], a.attrs["forced"])
		}
	}
	t1, t2, t3 := phaseEnd["trust_both"], phaseEnd["reissue"], phaseEnd["trust_new"]
	if t1.IsZero() || t2.IsZero() || t3.IsZero() {
		t.Fatalf("phase advances %v: want trust_both, reissue and trust_new", adv)
	}
	t.Logf("phase 1 trust_both %s, phase 2 reissue %s (renew-over 20s), phase 3 trust_new %s; rotation %s in all",
		t1.Sub(t0).Round(time.Millisecond), t2.Sub(t1).Round(time.Millisecond), t3.Sub(t2).Round(time.Millisecond), t3.Sub(t0).Round(time.Millisecond))
	if h := final.Rotation.History; len(h) != 4 || h[0].Phase != "trust_both" {
		t.Errorf("ca status history has %d entries, want 4 (start, 3 advances): %+v", len(h), h)
	} else {
		for i, want := range []string{"reissue", "trust_new", "complete"} {
			if h[i+1].Phase != want || h[i+1].Done != 2 || h[i+1].Total != 2 || len(h[i+1].Forced) != 0 || !h[i+1].At.Equal(phaseEnd[h[i].Phase]) && h[i+1].At.Sub(phaseEnd[h[i].Phase]).Abs() > time.Millisecond {
				t.Errorf("history[%d] = %+v, want %s with 2 of 2 done, none forced, at the time the log gives", i+1, h[i+1], want)
			}
		}
	}

	// Gate 1 and 3: each sidecar ACKed the phase's bundle before the advance.
	bundleAcks := logRecords(t, log1, "envoy loaded trust bundle")
	ackedIn := func(node string, from, to time.Time) (string, bool) {
		for _, r := range bundleAcks {
			if r.attrs["node_id"] == node && r.attrs["current"] == "true" && r.at.After(from) && !r.at.After(to) {
				return r.attrs["bundle"], true
			}
		}
		return "", false
	}
	finalVersion := final.Bundle.Version
	for _, node := range nodes {
		v1, ok := ackedIn(node, t0, t1)
		if !ok {
			t.Errorf("phase 1 advanced at %s before %s ACKed the bundle {B, A}", t1.Format(time.StampMilli), node)
		} else if v1 == before.Bundle.Version || v1 == finalVersion {
			t.Errorf("%s ACKed bundle %s in phase 1: that is not the bundle {B, A}", node, v1)
		}
		v3, ok := ackedIn(node, t2, t3)
		if !ok {
			t.Errorf("phase 3 advanced at %s before %s ACKed the bundle {B}", t3.Format(time.StampMilli), node)
		} else if v3 != finalVersion {
			t.Errorf("%s ACKed bundle %s in phase 3, want the final %s", node, v3, finalVersion)
		}
	}
	// Gate 2: each sidecar ACKed a certificate under B before the advance.
	certAcks := logRecords(t, log1, "envoy loaded certificate")
	for name, node := range nodes {
		ok := false
		for _, r := range certAcks {
			if r.attrs["node_id"] != node || !r.at.After(t1) || r.at.After(t2) {
				continue
			}
			root, seen := watchers[name].rootOf(r.attrs["serial"])
			if !seen {
				t.Logf("%s: serial %s ACKed at %s was not seen in the config dump", name, r.attrs["serial"], r.at.Format(time.StampMilli))
				continue
			}
			if root == "sds-server root CA 2" {
				ok = true
				t.Logf("%s served its first certificate under B %s into phase 2", name, r.at.Sub(t1).Round(time.Millisecond))
				break
			}
		}
		if !ok {
			t.Errorf("phase 2 advanced at %s before %s served a certificate under B", t2.Format(time.StampMilli), node)
		}
	}

	// What each Envoy holds now: a leaf under B's intermediate, B alone.
	if len(final.CA.Roots) != 1 || final.CA.Roots[0].Serial == rootA.Serial {
		t.Fatalf("roots after the rotation %+v, want B alone", final.CA.Roots)
	}
	rootB := final.CA.Roots[0]
	bPEM, err := os.ReadFile(filepath.Join(srv.dataDir, "ca", "root-2.crt"))
	if err != nil {
		t.Fatal(err)
	}
	bCerts, err := parsePEMCerts(bPEM)
	if err != nil || len(bCerts) != 1 || normSerial(bCerts[0].SerialNumber.Text(16)) != normSerial(rootB.Serial) {
		t.Fatalf("root-2.crt is not the root ca status shows (%v)", err)
	}
	b := bCerts[0]
	for name, admin := range admins {
		s, err := readSidecarSecrets(admin)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		// A leaf issued in phase 2 still carries the cross-signed B after
		// its intermediate until it is renewed; nothing else may follow.
		okChain := len(s.chain) >= 2 && s.chain[0].CheckSignatureFrom(s.chain[1]) == nil && s.chain[1].CheckSignatureFrom(b) == nil
		if len(s.chain) == 3 {
			x := s.chain[2]
			okChain = okChain && string(x.RawSubject) == string(b.RawSubject) && string(x.RawSubjectPublicKeyInfo) == string(b.RawSubjectPublicKeyInfo)
		}
		if !okChain || len(s.chain) > 3 {
			t.Errorf("%s: leaf chain %v: want leaf, B's intermediate[, B cross-signed]", name, chainNames(s.chain))
		}
		t.Logf("%s: leaf chain %v", name, chainNames(s.chain))
		if len(s.roots) != 1 || !s.roots[0].Equal(b) {
			t.Errorf("%s: ROOTCA holds %v, want B alone", name, chainNames(s.roots))
		}
		body, err := httpGet("http://" + admin + "/certs")
		if err != nil {
			t.Fatal(err)
		}
		var v certsCA
		if err := json.Unmarshal([]byte(body), &v); err != nil {
			t.Fatal(err)
		}
		// Contexts with a workload certificate are the mesh's (the
		// bootstrap's static context to sds-server pins A, by design).
		for _, c := range v.Certificates {
			if len(c.CertChain) == 0 {
				continue
			}
			var cas []string
			for _, ca := range c.CACert {
				cas = append(cas, normSerial(ca.SerialNumber))
			}
			if len(cas) != 1 || cas[0] != normSerial(rootB.Serial) {
				t.Errorf("%s /certs: ca_cert serials %v, want B's %s alone", name, cas, normSerial(rootB.Serial))
			}
		}
	}
	failedRotation := tr.failed.Load()
	sentRotation := tr.sent.Load()

	// Restart: Envoys bootstrapped pinning A reconnect and renew.
	lastBefore := map[string]string{}
	for name, w := range watchers {
		lastBefore[name] = w.last()
	}
	restartAt := time.Now()
	srv.restart(t)
	for name, node := range nodes {
		w := watchers[name]
		eventually(t, 60*time.Second, name+" serves a certificate issued after the restart", func() error {
			if got := w.last(); got == lastBefore[name] {
				return fmt.Errorf("still serial %s", got)
			}
			if root, _ := w.rootOf(w.last()); root != "sds-server root CA 2" {
				return fmt.Errorf("new serial %s under %q", w.last(), root)
			}
			if !slices.ContainsFunc(logRecords(t, srv.out.String(), "envoy loaded certificate"), func(r logRec) bool { return r.attrs["node_id"] == node }) {
				return fmt.Errorf("no ACK from %s in the restarted server's log yet", node)
			}
			return nil
		})
		t.Logf("%s: serial %s before the restart, %s within %s after it", name, lastBefore[name], w.last(), time.Since(restartAt).Round(time.Second))
	}
	time.Sleep(3 * time.Second) // traffic on the certificates from the restarted server
	bg.stop()

	t.Logf("requests: %d sent, %d failed (%d sent, %d failed up to the end of the rotation), %d on the reused keep-alive connection",
		tr.sent.Load(), tr.failed.Load(), sentRotation, failedRotation, tr.keepAliveReused.Load())
	if tr.failed.Load() != 0 {
		t.Errorf("%d of %d requests failed, e.g. %q", tr.failed.Load(), tr.sent.Load(), tr.firstFailures())
		// Which side refused what: Envoy's TLS counters.
		for name, admin := range admins {
			body, _ := httpGet("http://" + admin + "/stats?filter=ssl\\.(fail|connection_error|no_certificate)|upstream_cx_connect_fail|upstream_rq_5")
			var nonZero []string
			for _, l := range strings.Split(body, "\n") {
				if l != "" && !strings.HasSuffix(l, ": 0") {
					nonZero = append(nonZero, l)
				}
			}
			t.Logf("%s Envoy counters: %s", name, strings.Join(nonZero, "; "))
		}
	}
	if tr.keepAliveReused.Load() < 100 {
		t.Errorf("the keep-alive connection was reused for only %d requests", tr.keepAliveReused.Load())
	}
	for name, p := range map[string]*envoy{"frontend": m.frontend, "backend": m.backend} {
		if !p.alive() || p.pid() != pids[name] {
			t.Errorf("%s Envoy restarted or died (pid %d at start)", name, pids[name])
		}
	}
}

func chainNames(cs []*x509.Certificate) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Subject.CommonName+" <- "+c.Issuer.CommonName)
	}
	return out
}
