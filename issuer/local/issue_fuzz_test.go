package local

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// FuzzIssueCSR hands any bytes to the CA as a workload's CSR. Today the
// server makes its CSRs itself; a node agent would send its own, so the CA
// must already hold for hostile ones: no panic; an error (one line, naming
// the identity) for anything that is not a well-signed CSR for an accepted
// key; and a certificate only for the CSR's own key, carrying exactly the
// authenticated identity (never a name, SAN or CA flag from the CSR), that
// verifies to the root.
func FuzzIssueCSR(f *testing.F) {
	ca, _ := newTestCA(f, testOptions())
	id := testIdentity()
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(ca.Root())
	inters.AddCert(ca.Intermediate())

	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		f.Fatal(err)
	}
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		f.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	greedy := &x509.CertificateRequest{ // names the CA must not copy
		Subject:        pkix.Name{CommonName: "admin", Organization: []string{"root"}},
		DNSNames:       []string{"sds-server.example", "*.example"},
		IPAddresses:    []net.IP{net.ParseIP("127.0.0.1")},
		EmailAddresses: []string{"a@example"},
		URIs:           []*url.URL{{Scheme: "spiffe", Host: testTrustDomain, Path: "/ns/prod/sa/admin"}},
	}
	for _, seed := range []struct {
		key  crypto.Signer
		tmpl *x509.CertificateRequest
	}{
		{newP256(f), nil}, {p384, nil}, {rsa2048, nil}, {newP256(f), greedy},
		{p224, nil}, {rsa1024, nil}, {ed, nil},
	} {
		der := newCSR(f, seed.key, seed.tmpl)
		f.Add(der)
		bad := append([]byte(nil), der...)
		bad[len(bad)-3] ^= 0x40 // in the signature
		f.Add(bad)
		f.Add(der[:len(der)/2])
	}
	f.Add([]byte{})
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\n"))
	f.Add(ca.Intermediate().Raw)

	f.Fuzz(func(t *testing.T, der []byte) {
		cert, err := ca.Issue(context.Background(), issuer.Request{Identity: id, CSR: der, TTL: time.Hour})
		if err != nil {
			msg := err.Error()
			if !strings.HasPrefix(msg, "issue certificate for "+id.SPIFFEID()+": ") || strings.ContainsAny(msg, "\r\n") {
				t.Fatalf("error %q: want one line naming %s", msg, id.SPIFFEID())
			}
			return
		}
		csr, err := x509.ParseCertificateRequest(der)
		if err != nil || csr.CheckSignature() != nil {
			t.Fatalf("issued a certificate for a CSR that does not parse or verify (%v)", err)
		}
		leaf := cert.Leaf
		type equaler interface{ Equal(crypto.PublicKey) bool }
		if k, ok := leaf.PublicKey.(equaler); !ok || !k.Equal(csr.PublicKey) {
			t.Fatalf("leaf key %T is not the CSR's key %T", leaf.PublicKey, csr.PublicKey)
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.SPIFFEID() ||
			len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
			t.Fatalf("leaf names URIs %v DNS %v IPs %v emails %v; want only %s",
				leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses, id.SPIFFEID())
		}
		if leaf.Subject.CommonName != id.NodeID || leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign != 0 {
			t.Fatalf("leaf subject %v, CA %v, key usage %v", leaf.Subject, leaf.IsCA, leaf.KeyUsage)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: t0,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Fatalf("leaf does not verify: %v", err)
		}
	})
}
