package stepca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	authconfig "github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/ca"
	"go.step.sm/crypto/jose"

	"github.com/meshid/sds-server/internal/stepcainit"
	"github.com/meshid/sds-server/issuer"
)

// testCA is a real step-ca authority running in this process on loopback,
// created by stepcainit: the same code and files as the step-ca binary.
type testCA struct {
	*stepcainit.CA
	mu  sync.Mutex
	srv *ca.CA
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startCA creates a step-ca with opts (Dir and Address are filled in) and
// runs it until the test ends. Its provisioner's lifetime bounds are 10s to
// 24h unless opts sets others; a negative MinTLSCertDuration means no claims.
func startCA(t testing.TB, opts stepcainit.Options) *testCA {
	t.Helper()
	opts.NoDB = true
	return startCAWith(t, opts)
}

// startCAWith is startCA keeping opts.NoDB: with a database (bbolt), step-ca
// can revoke and keeps a CRL (unless opts.NoCRL).
func startCAWith(t testing.TB, opts stepcainit.Options) *testCA {
	t.Helper()
	opts.Dir = t.TempDir()
	opts.Address = freeAddr(t)
	switch {
	case opts.MinTLSCertDuration < 0:
		opts.MinTLSCertDuration = 0
	case opts.MinTLSCertDuration == 0 && opts.MaxTLSCertDuration == 0:
		opts.MinTLSCertDuration, opts.MaxTLSCertDuration = 10*time.Second, 24*time.Hour
	}
	c, err := stepcainit.Init(opts)
	if err != nil {
		t.Fatal(err)
	}
	tc := &testCA{CA: c}
	tc.start(t)
	t.Cleanup(tc.stop)
	return tc
}

func (tc *testCA) start(t testing.TB) {
	t.Helper()
	cfg, err := authconfig.LoadConfiguration(tc.ConfigFile)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Logger = nil // no access log in test output
	pass, err := os.ReadFile(tc.PasswordFile)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.New(cfg, ca.WithPassword([]byte(strings.TrimSpace(string(pass)))), ca.WithQuiet(true))
	if err != nil {
		t.Fatalf("start step-ca: %v", err)
	}
	go func() { _ = srv.Run() }()
	tc.mu.Lock()
	tc.srv = srv
	tc.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := tls.Dial("tcp", tc.Address, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // readiness probe only
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("step-ca not listening on %s: %v", tc.Address, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (tc *testCA) stop() {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.srv != nil {
		_ = tc.srv.Stop()
		tc.srv = nil
	}
}

// options points an issuer at tc, with fast retries.
func (tc *testCA) options() Options {
	return Options{
		URL: tc.URL, RootFingerprint: tc.Fingerprint, Provisioner: tc.Provisioner,
		KeyFile: tc.KeyFile, PasswordFile: tc.ProvisionerPasswordFile,
		TrustDomain: "mesh.local", TTL: 30 * time.Second, AllowShortTTL: true,
		Timeout: 2 * time.Second, ConnectAttempts: 2, ConnectBackoff: 10 * time.Millisecond,
	}
}

func open(t testing.TB, opts Options) *Issuer {
	t.Helper()
	iss, err := Open(context.Background(), opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return iss
}

var testID = issuer.Identity{TrustDomain: "mesh.local", Env: "prod", Service: "web", NodeID: "n-7f3a"}

// workloadCSR makes the CSR sds builds: CN/OU/O and the SPIFFE ID.
func workloadCSR(t testing.TB, id issuer.Identity) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	uri, _ := url.Parse(id.SPIFFEID())
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: id.NodeID, OrganizationalUnit: []string{id.Service}, Organization: []string{id.Env}},
		URIs:    []*url.URL{uri},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der, key
}

func parseChain(t *testing.T, chainPEM []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for rest := chainPEM; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

func TestIssueWorkloadAndServerCertificates(t *testing.T) {
	tc := startCA(t, stepcainit.Options{})
	iss := open(t, tc.options())
	ctx := context.Background()

	roots, err := iss.Roots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(roots) != 1 || fingerprint(roots[0]) != tc.Fingerprint {
		t.Fatalf("Roots: %d roots, first %s; want the step-ca root %s", len(roots), fingerprint(roots[0]), tc.Fingerprint)
	}

	csr, key := workloadCSR(t, testID)
	before := time.Now().Truncate(time.Second)
	cert, err := iss.Issue(ctx, issuer.Request{Identity: testID, CSR: csr, TTL: 30 * time.Second})
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	leaf := cert.Leaf
	if got := uriStrings(leaf.URIs); !slices.Equal(got, []string{"spiffe://mesh.local/ns/prod/sa/web"}) {
		t.Errorf("URI SANs %v", got)
	}
	if s := leaf.Subject; s.CommonName != "n-7f3a" || !slices.Equal(s.OrganizationalUnit, []string{"web"}) || !slices.Equal(s.Organization, []string{"prod"}) {
		t.Errorf("subject %s, want CN=n-7f3a,OU=web,O=prod", s)
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses) > 0 || leaf.IsCA {
		t.Errorf("unexpected DNS/IP SANs %v %v or CA flag", leaf.DNSNames, leaf.IPAddresses)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) {
		t.Errorf("extended key usage %v, want client and server auth", leaf.ExtKeyUsage)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		t.Error("certificate is not for the CSR's key")
	}
	if cert.IssuedAt.Before(before) || cert.IssuedAt.After(time.Now()) {
		t.Errorf("IssuedAt %s, want about now", cert.IssuedAt)
	}
	if got := cert.IssuedAt.Sub(leaf.NotBefore); got != issuer.Backdate {
		t.Errorf("NotBefore is %s before the issue time, want %s", got, issuer.Backdate)
	}
	if cert.TTL != 30*time.Second || !leaf.NotAfter.Equal(cert.IssuedAt.Add(30*time.Second)) {
		t.Errorf("TTL %s, NotAfter %s; want 30s after %s", cert.TTL, leaf.NotAfter, cert.IssuedAt)
	}
	chain := parseChain(t, cert.ChainPEM)
	if len(chain) != 2 || !chain[0].Equal(leaf) {
		t.Fatalf("chain of %d certificates, want leaf + intermediate", len(chain))
	}
	pool := x509.NewCertPool()
	pool.AddCert(roots[0])
	inter := x509.NewCertPool()
	inter.AddCert(chain[1])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("workload certificate does not verify against the step-ca root: %v", err)
	}

	// Every issuance is a fresh one-time token: a second one works too.
	if _, err := iss.Issue(ctx, issuer.Request{Identity: testID, CSR: csr, TTL: time.Minute}); err != nil {
		t.Fatalf("second Issue: %v", err)
	}

	t.Run("server certificate", func(t *testing.T) {
		sc, err := iss.ServerCertificate([]string{"localhost", "127.0.0.1", "::1"}, 30*24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if len(sc.Certificate) != 3 {
			t.Fatalf("chain of %d certificates, want leaf, intermediate, root", len(sc.Certificate))
		}
		if root, _ := x509.ParseCertificate(sc.Certificate[2]); root == nil || !root.Equal(roots[0]) {
			t.Error("chain does not end with the step-ca root")
		}
		l := sc.Leaf
		if !slices.Equal(l.DNSNames, []string{"localhost"}) || len(l.IPAddresses) != 2 || !slices.Equal(uriStrings(l.URIs), []string{"spiffe://mesh.local/sds-server"}) {
			t.Errorf("SANs: DNS %v IP %v URI %v", l.DNSNames, l.IPAddresses, uriStrings(l.URIs))
		}
		if !slices.Equal(l.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
			t.Errorf("extended key usage %v, want serverAuth only", l.ExtKeyUsage)
		}
		// 30 days asked, the provisioner allows 24h (backdate included).
		if life := l.NotAfter.Sub(l.NotBefore); life != 24*time.Hour {
			t.Errorf("lifetime %s, want the provisioner's maximum, 24h", life)
		}
		if _, err := l.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, DNSName: "localhost"}); err != nil {
			t.Errorf("server certificate does not verify: %v", err)
		}
	})

	t.Run("refuses a CSR for another identity", func(t *testing.T) {
		other := testID
		other.Service = "db"
		csr, _ := workloadCSR(t, other)
		_, err := iss.Issue(ctx, issuer.Request{Identity: testID, CSR: csr, TTL: time.Minute})
		if err == nil || !strings.Contains(err.Error(), "URI SANs") {
			t.Fatalf("Issue with a CSR naming db: %v, want a refusal naming the URI SANs", err)
		}
	})
}

func TestOpenWithRootFile(t *testing.T) {
	tc := startCA(t, stepcainit.Options{})
	opts := tc.options()
	opts.RootFingerprint, opts.RootFile = "", tc.RootFile
	iss := open(t, opts)
	if fingerprint(iss.Root()) != tc.Fingerprint {
		t.Fatal("pinned root is not the root file's")
	}
	csr, _ := workloadCSR(t, testID)
	if _, err := iss.Issue(context.Background(), issuer.Request{Identity: testID, CSR: csr, TTL: time.Minute}); err != nil {
		t.Fatal(err)
	}

	// The key file as `step crypto jwk create` writes it: JSON-serialized JWE.
	compact, err := os.ReadFile(tc.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	jwe, err := jose.ParseEncrypted(strings.TrimSpace(string(compact)))
	if err != nil {
		t.Fatal(err)
	}
	opts.KeyFile = filepath.Join(t.TempDir(), "key.json")
	if err := os.WriteFile(opts.KeyFile, []byte(jwe.FullSerialize()), 0o600); err != nil {
		t.Fatal(err)
	}
	open(t, opts)
}

// TestOpenErrors covers every start-up error: one clear line each.
func TestOpenErrors(t *testing.T) {
	tc := startCA(t, stepcainit.Options{})
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// A provisioner key that is not the provisioner's.
	_, otherJWE, err := jose.GenerateDefaultKeyPair([]byte("other-password"))
	if err != nil {
		t.Fatal(err)
	}
	otherKey, _ := otherJWE.CompactSerialize()
	otherRoot := startCA(t, stepcainit.Options{})
	strict := startCA(t, stepcainit.Options{MinTLSCertDuration: 5 * time.Minute, MaxTLSCertDuration: time.Hour})
	useStrict := func(o *Options) {
		s := strict.options()
		o.URL, o.RootFingerprint, o.KeyFile, o.PasswordFile = s.URL, s.RootFingerprint, s.KeyFile, s.PasswordFile
	}

	// A silent step-ca: accepts connections, never answers.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()

	tests := []struct {
		name  string
		mod   func(*Options)
		want  []string
		anyOf []string // at least one of these
		// maxTime proves Open gives up rather than hangs; generous, since
		// a loaded machine stretches the attempts' backoff.
		maxTime time.Duration
	}{
		{name: "unreachable", mod: func(o *Options) { o.URL = "https://" + freeAddr(t); o.ConnectAttempts = 3 },
			want: []string{"is unreachable", "connection refused", "gave up after 3 attempts"}, maxTime: 15 * time.Second},
		{name: "silent", mod: func(o *Options) {
			o.URL = "https://" + silent.Addr().String()
			o.Timeout = 200 * time.Millisecond
		}, want: []string{"gave up after 2 attempts"}, anyOf: []string{"deadline exceeded", "timeout"}, maxTime: 15 * time.Second},
		{name: "wrong root fingerprint", mod: func(o *Options) { o.RootFingerprint = otherRoot.Fingerprint },
			want: []string{"no root with fingerprint " + otherRoot.Fingerprint, tc.Fingerprint}},
		{name: "root file of another CA", mod: func(o *Options) { o.RootFingerprint, o.RootFile = "", otherRoot.RootFile },
			want: []string{"not trusted by the pinned root"}},
		{name: "root file without the fingerprint", mod: func(o *Options) { o.RootFile = otherRoot.RootFile },
			want: []string{otherRoot.RootFile, "no certificate with the root fingerprint"}},
		{name: "malformed fingerprint", mod: func(o *Options) { o.RootFingerprint = "abc" }, want: []string{"64 hex digits"}},
		{name: "unknown provisioner", mod: func(o *Options) { o.Provisioner = "nope" },
			want: []string{`no provisioner named "nope"`, "sds-server (JWK)"}},
		{name: "wrong password", mod: func(o *Options) { o.PasswordFile = write("wrong-password", "hunter2\n") },
			want: []string{tc.KeyFile, "does not decrypt it", "wrong password"}},
		{name: "missing password file", mod: func(o *Options) { o.PasswordFile = "" },
			want: []string{"is encrypted", "password file"}},
		{name: "unreadable key file", mod: func(o *Options) { o.KeyFile = filepath.Join(dir, "missing.key") },
			want: []string{"provisioner key file", "missing.key", "no such file"}},
		{name: "key file is a directory", mod: func(o *Options) { o.KeyFile = dir },
			want: []string{"provisioner key file", "is a directory"}},
		{name: "key of another provisioner", mod: func(o *Options) {
			o.KeyFile = write("other.key", otherKey)
			o.PasswordFile = write("other-password", "other-password")
		}, want: []string{"holds key", `provisioner "sds-server" uses key`}},
		{name: "ttl under the provisioner minimum", mod: func(o *Options) { useStrict(o); o.TTL = time.Minute },
			want: []string{"lifetime 1m0s is outside the bounds", "requests 2m0s", "minTLSCertDuration 5m0s", "maxTLSCertDuration 1h0m0s"}},
		{name: "ttl over the provisioner maximum", mod: func(o *Options) { useStrict(o); o.TTL = time.Hour },
			want: []string{"lifetime 1h0m0s is outside the bounds", "1m0s backdate", "minTLSCertDuration 5m0s", "maxTLSCertDuration 1h0m0s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := tc.options()
			tt.mod(&opts)
			start := time.Now()
			iss, err := Open(context.Background(), opts)
			if err == nil {
				t.Fatalf("Open succeeded (%v), want an error", iss.Root().Subject)
			}
			msg := err.Error()
			t.Logf("error: %s", msg)
			if strings.Contains(msg, "\n") {
				t.Errorf("error spans lines: %q", msg)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not mention %q", msg, w)
				}
			}
			if len(tt.anyOf) > 0 && !slices.ContainsFunc(tt.anyOf, func(w string) bool { return strings.Contains(msg, w) }) {
				t.Errorf("error %q mentions none of %q", msg, tt.anyOf)
			}
			if tt.maxTime > 0 && time.Since(start) > tt.maxTime {
				t.Errorf("Open took %s, want under %s", time.Since(start), tt.maxTime)
			}
		})
	}
}

// TestOpenChecksStepCADefaults: a provisioner without claims of its own is
// bound by step-ca's defaults (5m minimum), which only a real signature can
// reveal; the error names them.
func TestOpenChecksStepCADefaults(t *testing.T) {
	tc := startCA(t, stepcainit.Options{MinTLSCertDuration: -1})
	opts := tc.options()
	opts.TTL = time.Minute // 2m with the backdate, under step-ca's 5m
	_, err := Open(context.Background(), opts)
	if err == nil {
		t.Fatal("Open succeeded, want step-ca's minimum lifetime to refuse the probe")
	}
	for _, w := range []string{"refused a certificate of lifetime 1m0s", "minTLSCertDuration 5m0s (step-ca default)", "HTTP 403"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
	opts.TTL = 10 * time.Minute
	open(t, opts) // within the defaults
}

// TestOpenChecksTemplate: a provisioner without sds-server's template
// signs certificates without OU/O; the start-up probe catches it.
func TestOpenChecksTemplate(t *testing.T) {
	tc := startCA(t, stepcainit.Options{NoTemplate: true})
	_, err := Open(context.Background(), tc.options())
	if err == nil {
		t.Fatal("Open succeeded against a provisioner without the template")
	}
	for _, w := range []string{"without the identity", "sds-server.tpl", "subject"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
}

// hangingTransport never answers: a step-ca that accepted the connection
// and went silent.
type hangingTransport struct{}

func (hangingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	<-r.Context().Done()
	return nil, r.Context().Err()
}

// TestIssueOutages: a slow step-ca times out (no hang), a stopped one fails
// at once, and issuance works again once it is back.
func TestIssueOutages(t *testing.T) {
	tc := startCA(t, stepcainit.Options{})
	opts := tc.options()
	opts.Timeout = 300 * time.Millisecond
	iss := open(t, opts)
	csr, _ := workloadCSR(t, testID)
	req := issuer.Request{Identity: testID, CSR: csr, TTL: 30 * time.Second}

	t.Run("slow", func(t *testing.T) {
		saved := iss.client
		slow, err := ca.NewClient(tc.URL, ca.WithTransport(hangingTransport{}))
		if err != nil {
			t.Fatal(err)
		}
		iss.client = slow
		defer func() { iss.client = saved }()
		for _, c := range []struct {
			name string
			ctx  func() (context.Context, context.CancelFunc)
			max  time.Duration
		}{
			{"caller deadline", func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 100*time.Millisecond)
			}, 5 * time.Second},
			{"no caller deadline: the request timeout", func() (context.Context, context.CancelFunc) {
				return context.WithCancel(context.Background())
			}, 5 * time.Second},
		} {
			ctx, cancel := c.ctx()
			start := time.Now()
			_, err := iss.Issue(ctx, req)
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("%s: Issue: %v, want a deadline error", c.name, err)
			}
			if d := time.Since(start); d > c.max {
				t.Errorf("%s: Issue took %s, want under %s", c.name, d, c.max)
			}
		}
		start := time.Now()
		if _, err := iss.Roots(context.Background()); err == nil || time.Since(start) > 5*time.Second {
			t.Errorf("Roots on a silent step-ca: %v after %s, want a timeout", err, time.Since(start))
		}
	})

	t.Run("down, then back", func(t *testing.T) {
		tc.stop()
		start := time.Now()
		_, err := iss.Issue(context.Background(), req)
		if err == nil || !strings.Contains(err.Error(), tc.URL) {
			t.Fatalf("Issue with step-ca down: %v, want an error naming %s", err, tc.URL)
		}
		if time.Since(start) > 5*time.Second {
			t.Errorf("Issue with step-ca down took %s", time.Since(start))
		}
		if _, err := iss.ServerCertificate([]string{"localhost"}, time.Hour); err == nil {
			t.Error("ServerCertificate succeeded with step-ca down")
		}
		tc.start(t)
		if _, err := iss.Issue(context.Background(), req); err != nil {
			t.Fatalf("Issue after step-ca restarted: %v", err)
		}
	})
}

// BenchmarkIssue measures one workload issuance through a real (in-process)
// step-ca on loopback: token signing, HTTPS round trip, step-ca's template
// and signature, and the checks of the answer. Key generation is sds's.
func BenchmarkIssue(b *testing.B) {
	tc := startCA(b, stepcainit.Options{})
	iss := open(b, tc.options())
	csr, _ := workloadCSR(b, testID)
	req := issuer.Request{Identity: testID, CSR: csr, TTL: time.Hour}
	ctx := context.Background()
	for b.Loop() {
		if _, err := iss.Issue(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}
