package bootstrap

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"sync/atomic"
	"testing"
	"time"
)

// testPKI is a root, an intermediate and a server leaf, like sds-server's.
type testPKI struct {
	root, inter, leaf *x509.Certificate
	rootKey, interKey crypto.Signer
	leafKey           crypto.Signer
	rootPEM           []byte
}

var serial atomic.Int64

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func signCert(t *testing.T, tmpl, parent *x509.Certificate, pub crypto.PublicKey, parentKey crypto.Signer) *x509.Certificate {
	t.Helper()
	tmpl.SerialNumber = big.NewInt(serial.Add(1))
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Hour)
		tmpl.NotAfter = time.Now().Add(time.Hour)
	}
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func caTemplate(cn string) *x509.Certificate {
	return &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
}

// newPKI makes a chain whose leaf carries leafURI (none if empty).
func newPKI(t *testing.T, name, leafURI string) *testPKI {
	t.Helper()
	p := &testPKI{}
	rk, ik, lk := newKey(t), newKey(t), newKey(t)
	p.rootKey, p.interKey, p.leafKey = rk, ik, lk
	p.root = signCert(t, caTemplate(name+" root"), nil, rk.Public(), rk)
	p.inter = signCert(t, caTemplate(name+" intermediate"), p.root, ik.Public(), rk)
	p.leaf = p.issueLeaf(t, leafURI, p.inter, ik)
	p.rootPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.root.Raw})
	return p
}

func (p *testPKI) issueLeaf(t *testing.T, uri string, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "sds-server"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	return signCert(t, tmpl, parent, p.leafKey.Public(), parentKey)
}

// tlsCert is what the server presents: leaf, intermediate, root.
func (p *testPKI) tlsCert() tls.Certificate {
	return tls.Certificate{
		Certificate: [][]byte{p.leaf.Raw, p.inter.Raw, p.root.Raw},
		PrivateKey:  p.leafKey,
	}
}
