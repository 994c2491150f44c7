package local

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer"
)

func testIdentity() issuer.Identity {
	return issuer.Identity{TrustDomain: testTrustDomain, Env: "prod", Service: "web", NodeID: "node-4f2a"}
}

func newP256(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// newCSR returns a DER CSR signed by key, from tmpl (nil: an empty one).
func newCSR(t testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// verifyLeaf checks leaf chains to ca's root through its intermediate for usage.
func verifyLeaf(t *testing.T, ca *CA, leaf *x509.Certificate, now time.Time, usage x509.ExtKeyUsage) {
	t.Helper()
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(ca.Root())
	inters.AddCert(ca.Intermediate())
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		t.Errorf("leaf does not verify for %v: %v", usage, err)
	}
}

func TestIssueLeaf(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		key      crypto.Signer
		keyUsage x509.KeyUsage
	}{
		{"ECDSA P-256", newP256(t), x509.KeyUsageDigitalSignature},
		{"ECDSA P-384", p384, x509.KeyUsageDigitalSignature},
		{"RSA 2048", rsaKey, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment},
	}
	id := testIdentity()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const ttl = 90 * time.Minute
			cert, err := ca.Issue(context.Background(), issuer.Request{Identity: id, CSR: newCSR(t, tc.key, nil), TTL: ttl})
			if err != nil {
				t.Fatalf("Issue: %v", err)
			}
			leaf := cert.Leaf
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://mesh.local/ns/prod/sa/web" {
				t.Errorf("URIs = %v, want exactly spiffe://mesh.local/ns/prod/sa/web", leaf.URIs)
			}
			if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
				t.Errorf("unexpected SANs: DNS %v IP %v email %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
			}
			s := leaf.Subject
			if s.CommonName != id.NodeID || !slices.Equal(s.OrganizationalUnit, []string{id.Service}) || !slices.Equal(s.Organization, []string{id.Env}) {
				t.Errorf("subject = %v, want CN=%s, OU=%s, O=%s", s, id.NodeID, id.Service, id.Env)
			}
			if !leaf.NotBefore.Equal(t0.Add(-time.Minute)) {
				t.Errorf("NotBefore = %s, want %s (backdated 1 min)", leaf.NotBefore, t0.Add(-time.Minute))
			}
			if !leaf.NotAfter.Equal(t0.Add(ttl)) {
				t.Errorf("NotAfter = %s, want %s", leaf.NotAfter, t0.Add(ttl))
			}
			if !cert.IssuedAt.Equal(t0) || cert.TTL != ttl {
				t.Errorf("IssuedAt %s TTL %s, want %s %s", cert.IssuedAt, cert.TTL, t0, ttl)
			}
			if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
				t.Errorf("ExtKeyUsage = %v, want ServerAuth, ClientAuth", leaf.ExtKeyUsage)
			}
			if leaf.KeyUsage != tc.keyUsage {
				t.Errorf("KeyUsage = %v, want %v", leaf.KeyUsage, tc.keyUsage)
			}
			if leaf.IsCA || !leaf.BasicConstraintsValid {
				t.Error("leaf must carry basic constraints CA:FALSE")
			}
			if !bytes.Equal(leaf.AuthorityKeyId, ca.Intermediate().SubjectKeyId) {
				t.Error("AuthorityKeyId is not the intermediate's SubjectKeyId")
			}
			if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 128 {
				t.Errorf("serial %s is not a positive 128-bit number", leaf.SerialNumber)
			}
			if !tc.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(leaf.PublicKey) {
				t.Error("leaf key is not the CSR key")
			}
			verifyLeaf(t, ca, leaf, t0, x509.ExtKeyUsageClientAuth)
			verifyLeaf(t, ca, leaf, t0, x509.ExtKeyUsageServerAuth)

			var chain [][]byte
			for rest := cert.ChainPEM; ; {
				var b *pem.Block
				if b, rest = pem.Decode(rest); b == nil {
					break
				}
				chain = append(chain, b.Bytes)
			}
			if len(chain) != 2 || !bytes.Equal(chain[0], leaf.Raw) || !bytes.Equal(chain[1], ca.Intermediate().Raw) {
				t.Errorf("ChainPEM holds %d certificates, want leaf then intermediate", len(chain))
			}
		})
	}
}

func TestIssueUniqueSerialsConcurrently(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	const n = 32
	csr := newCSR(t, newP256(t), nil)
	serials := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cert, err := ca.Issue(context.Background(), issuer.Request{Identity: testIdentity(), CSR: csr, TTL: time.Hour})
			if err != nil {
				t.Error(err)
				return
			}
			serials[i] = cert.Leaf.SerialNumber.String()
		})
	}
	wg.Wait()
	slices.Sort(serials)
	if len(slices.Compact(serials)) != n {
		t.Error("serial numbers repeat")
	}
}

func TestIssueIgnoresCSRClaims(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	evil, _ := url.Parse("spiffe://mesh.local/ns/prod/sa/payments")
	other, _ := url.Parse("spiffe://mesh.local/sds-server")
	csr := newCSR(t, newP256(t), &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: "admin", Organization: []string{"prod"}, OrganizationalUnit: []string{"payments"}},
		DNSNames:       []string{"payments.prod.svc", "localhost"},
		EmailAddresses: []string{"root@example.com"},
		IPAddresses:    []net.IP{net.IPv4(10, 0, 0, 1)},
		URIs:           []*url.URL{evil, other},
		ExtraExtensions: []pkix.Extension{{ // basicConstraints CA:TRUE
			Id: []int{2, 5, 29, 19}, Critical: true, Value: []byte{0x30, 0x03, 0x01, 0x01, 0xff},
		}},
	})
	id := testIdentity()
	cert, err := ca.Issue(context.Background(), issuer.Request{Identity: id, CSR: csr, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	leaf := cert.Leaf
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.SPIFFEID() {
		t.Errorf("URIs = %v, want only %s", leaf.URIs, id.SPIFFEID())
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Errorf("CSR SANs copied: DNS %v IP %v email %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	if leaf.Subject.CommonName != id.NodeID || !slices.Equal(leaf.Subject.OrganizationalUnit, []string{"web"}) {
		t.Errorf("CSR subject copied: %v", leaf.Subject)
	}
	if leaf.IsCA {
		t.Error("CSR made the leaf a CA")
	}
}

func TestIssueRejects(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	good := newCSR(t, newP256(t), nil)
	badSig := bytes.Clone(good)
	badSig[len(badSig)-1] ^= 0xff
	withID := func(f func(*issuer.Identity)) issuer.Identity {
		id := testIdentity()
		f(&id)
		return id
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	canceled, cancel := context.WithCancel(context.Background())
	cancel()

	tests := []struct {
		name string
		ctx  context.Context
		id   issuer.Identity
		csr  []byte
		ttl  time.Duration
		want string
	}{
		{"bad CSR signature", nil, testIdentity(), badSig, time.Hour, "signature"},
		{"garbage CSR", nil, testIdentity(), []byte("garbage"), time.Hour, "parse certificate signing request"},
		{"no CSR", nil, testIdentity(), nil, time.Hour, "no certificate signing request"},
		{"P-224 key", nil, testIdentity(), newCSR(t, p224, nil), time.Hour, "unsupported ECDSA curve P-224"},
		{"P-521 key", nil, testIdentity(), newCSR(t, p521, nil), time.Hour, "unsupported ECDSA curve P-521"},
		{"Ed25519 key", nil, testIdentity(), newCSR(t, edKey, nil), time.Hour, "unsupported key type ed25519.PublicKey"},
		{"RSA 1024 key", nil, testIdentity(), newCSR(t, rsa1024, nil), time.Hour, "RSA key of 1024 bits"},
		{"no node ID", nil, withID(func(i *issuer.Identity) { i.NodeID = "" }), good, time.Hour, "no node ID"},
		{"bad service", nil, withID(func(i *issuer.Identity) { i.Service = "Web/../admin" }), good, time.Hour, "invalid service"},
		{"empty env", nil, withID(func(i *issuer.Identity) { i.Env = "" }), good, time.Hour, "invalid environment"},
		{"bad trust domain", nil, withID(func(i *issuer.Identity) { i.TrustDomain = "" }), good, time.Hour, "invalid trust domain"},
		{"other trust domain", nil, withID(func(i *issuer.Identity) { i.TrustDomain = "evil.example" }), good, time.Hour, `this CA serves "mesh.local"`},
		{"zero TTL", nil, testIdentity(), good, 0, "must be positive"},
		{"negative TTL", nil, testIdentity(), good, -time.Hour, "must be positive"},
		{"TTL under 5m", nil, testIdentity(), good, 4*time.Minute + 59*time.Second, "allow_short_ttl"},
		{"canceled context", canceled, testIdentity(), good, time.Hour, "context canceled"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := tc.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			cert, err := ca.Issue(ctx, issuer.Request{Identity: tc.id, CSR: tc.csr, TTL: tc.ttl})
			if err == nil || cert != nil {
				t.Fatalf("Issue = %v, %v; want an error", cert, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

func TestIssueShortTTL(t *testing.T) {
	tests := []struct {
		allowShort bool
		ttl        time.Duration
		wantErr    bool
	}{
		{false, issuer.MinTTL, false},
		{false, issuer.MinTTL - time.Second, true},
		{false, 30 * time.Second, true},
		{true, 30 * time.Second, false},
		{true, time.Second, false},
		{true, 0, true},
	}
	for _, tc := range tests {
		opts := testOptions()
		opts.AllowShortTTL = tc.allowShort
		ca, _ := newTestCA(t, opts)
		cert, err := ca.Issue(context.Background(), issuer.Request{Identity: testIdentity(), CSR: newCSR(t, newP256(t), nil), TTL: tc.ttl})
		if gotErr := err != nil; gotErr != tc.wantErr {
			t.Errorf("allow %v, TTL %s: error %v, want error %v", tc.allowShort, tc.ttl, err, tc.wantErr)
			continue
		}
		if err == nil && (cert.TTL != tc.ttl || !cert.Leaf.NotAfter.Equal(t0.Add(tc.ttl))) {
			t.Errorf("allow %v, TTL %s: got TTL %s NotAfter %s", tc.allowShort, tc.ttl, cert.TTL, cert.Leaf.NotAfter)
		}
	}
}

func TestIssueClampsToIntermediate(t *testing.T) {
	ca, dir := newTestCA(t, testOptions())
	end := ca.IntermediateNotAfter()
	csr := newCSR(t, newP256(t), nil)
	tests := []struct {
		name    string
		now     time.Time
		ttl     time.Duration
		wantTTL time.Duration // 0: an error
	}{
		{"well before expiry", end.Add(-2 * time.Hour), time.Hour, time.Hour},
		{"exactly at expiry", end.Add(-time.Hour), time.Hour, time.Hour},
		{"clamped", end.Add(-10 * time.Minute), time.Hour, 10 * time.Minute},
		{"sub-second clock", end.Add(-10*time.Minute + 300*time.Millisecond), time.Hour, 10 * time.Minute},
		{"expired", end, time.Hour, 0},
		{"long expired", end.Add(48 * time.Hour), time.Hour, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Open renews an expired intermediate (renew_test.go): open
			// before expiry, then move the clock, as a running server sees.
			clk := &fakeClock{t: end.Add(-2 * time.Hour)}
			opts := testOptions()
			opts.Now = clk.Now
			ca, err := Open(context.Background(), dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			clk.Set(tc.now)
			cert, err := ca.Issue(context.Background(), issuer.Request{Identity: testIdentity(), CSR: csr, TTL: tc.ttl})
			if tc.wantTTL == 0 {
				if err == nil || !strings.Contains(err.Error(), "intermediate CA expired") {
					t.Fatalf("error = %v, want intermediate CA expired", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cert.TTL != tc.wantTTL {
				t.Errorf("TTL = %s, want %s", cert.TTL, tc.wantTTL)
			}
			if !cert.Leaf.NotAfter.Equal(cert.IssuedAt.Add(cert.TTL)) || cert.Leaf.NotAfter.After(end) {
				t.Errorf("NotAfter %s, IssuedAt %s + TTL %s, intermediate ends %s", cert.Leaf.NotAfter, cert.IssuedAt, cert.TTL, end)
			}
		})
	}
}

func TestServerCertificate(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	cert, err := ca.ServerCertificate([]string{"localhost", "127.0.0.1", "::1", "sds.example.com"}, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf := cert.Leaf
	if leaf == nil || len(cert.Certificate) != 3 || !bytes.Equal(cert.Certificate[0], leaf.Raw) ||
		!bytes.Equal(cert.Certificate[1], ca.Intermediate().Raw) || !bytes.Equal(cert.Certificate[2], ca.Root().Raw) {
		t.Fatal("chain is not [leaf, intermediate, root] with Leaf set")
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://mesh.local/sds-server" {
		t.Errorf("URIs = %v, want spiffe://mesh.local/sds-server", leaf.URIs)
	}
	if leaf.Subject.CommonName != "sds-server" || leaf.IsCA {
		t.Errorf("subject %v, CA %v", leaf.Subject, leaf.IsCA)
	}
	if !slices.Equal(leaf.DNSNames, []string{"localhost", "sds.example.com"}) || len(leaf.IPAddresses) != 2 {
		t.Errorf("DNS %v IP %v", leaf.DNSNames, leaf.IPAddresses)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		t.Errorf("ExtKeyUsage = %v, want ServerAuth", leaf.ExtKeyUsage)
	}
	if k, ok := cert.PrivateKey.(*ecdsa.PrivateKey); !ok || k.Curve != elliptic.P256() || !k.PublicKey.Equal(leaf.PublicKey) {
		t.Error("private key is not the P-256 key of the leaf")
	}
	if !leaf.NotAfter.Equal(t0.Add(24 * time.Hour)) {
		t.Errorf("NotAfter = %s", leaf.NotAfter)
	}

	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(ca.Root())
	inters.AddCert(ca.Intermediate())
	for _, tc := range []struct {
		host string
		ok   bool
	}{{"localhost", true}, {"127.0.0.1", true}, {"::1", true}, {"sds.example.com", true}, {"example.com", false}, {"10.0.0.1", false}} {
		_, err := leaf.Verify(x509.VerifyOptions{DNSName: tc.host, Roots: roots, Intermediates: inters, CurrentTime: t0})
		if (err == nil) != tc.ok {
			t.Errorf("verify for %q: %v, want ok %v", tc.host, err, tc.ok)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: t0, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("server certificate verifies as a client certificate")
	}

	// A real handshake: the client trusts only the root and sees it sent.
	cliConn, srvConn := net.Pipe()
	defer cliConn.Close()
	defer srvConn.Close()
	srv := tls.Server(srvConn, &tls.Config{Certificates: []tls.Certificate{cert}, Time: at(t0)})
	go srv.Handshake()
	cli := tls.Client(cliConn, &tls.Config{RootCAs: roots, ServerName: "localhost", Time: at(t0)})
	if err := cli.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	if peer := cli.ConnectionState().PeerCertificates; len(peer) != 3 || !peer[2].Equal(ca.Root()) {
		t.Error("handshake does not carry the root")
	}
}

func TestServerCertificateRejects(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	for _, tc := range []struct {
		name  string
		hosts []string
		ttl   time.Duration
		want  string
	}{
		{"host with port", []string{"localhost:8443"}, time.Hour, `"localhost:8443"`},
		{"URL", []string{"https://sds.example.com"}, time.Hour, "neither a DNS name nor an IP"},
		{"empty host", []string{"localhost", ""}, time.Hour, `host ""`},
		{"zero TTL", []string{"localhost"}, 0, "must be positive"},
		{"short TTL", []string{"localhost"}, time.Minute, "allow_short_ttl"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ca.ServerCertificate(tc.hosts, tc.ttl)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// BenchmarkIssue measures the hot path of a renewal: a new P-256 key, its
// CSR, and the signature of the CA.
func BenchmarkIssue(b *testing.B) {
	ca, _ := newTestCA(b, testOptions())
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ca.Issue(ctx, issuer.Request{Identity: testIdentity(), CSR: csr, TTL: time.Hour}); err != nil {
			b.Fatal(err)
		}
	}
}

// TestIssuePublicKey: a key handed over directly (Request.PublicKey, no
// CSR) gets the same leaf as through a CSR, and the same key checks refuse
// the same keys.
func TestIssuePublicKey(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	id := testIdentity()
	key := newP256(t)
	viaKey, err := ca.Issue(context.Background(), issuer.Request{Identity: id, TTL: time.Hour, PublicKey: &key.PublicKey})
	if err != nil {
		t.Fatalf("Issue with a public key: %v", err)
	}
	viaCSR, err := ca.Issue(context.Background(), issuer.Request{Identity: id, CSR: newCSR(t, key, nil), TTL: time.Hour})
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	a, b := viaKey.Leaf, viaCSR.Leaf
	if a.Subject.String() != b.Subject.String() || a.URIs[0].String() != b.URIs[0].String() ||
		a.KeyUsage != b.KeyUsage || !slices.Equal(a.ExtKeyUsage, b.ExtKeyUsage) || !a.NotAfter.Equal(b.NotAfter) ||
		!key.PublicKey.Equal(a.PublicKey) || !bytes.Equal(a.AuthorityKeyId, b.AuthorityKeyId) {
		t.Errorf("leaf for the public key differs from Issue's:\n%+v\n%+v", a, b)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name string
		pub  crypto.PublicKey
		want string
	}{
		{"P-224", &p224.PublicKey, "unsupported ECDSA curve P-224"},
		{"Ed25519", edPub, "unsupported key type"},
	} {
		if _, err := ca.Issue(context.Background(), issuer.Request{Identity: id, TTL: time.Hour, PublicKey: tc.pub}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Issue(public key %s) = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}
