package local

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// minRSABits is the smallest RSA workload key accepted.
const minRSABits = 2048

// Issue signs a workload certificate for req.Identity with the intermediate.
// Of the CSR only the public key is used, after its signature is checked
// (req.PublicKey, a key generated in this process, is used as is):
// names and attributes all come from the authenticated identity. The
// lifetime is cut short at the intermediate's expiry, and the returned TTL
// says so. Issue implements issuer.Issuer and is safe for concurrent use.
func (ca *CA) Issue(ctx context.Context, req issuer.Request) (*issuer.Certificate, error) {
	if req.PublicKey != nil { // generated in this process: no CSR to check
		keyUsage, err := leafKeyUsage(req.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("issue certificate for %s: %w", req.Identity.SPIFFEID(), err)
		}
		return ca.issue(ctx, req, req.PublicKey, keyUsage)
	}
	pub, keyUsage, err := csrPublicKey(req.CSR)
	if err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", req.Identity.SPIFFEID(), err)
	}
	return ca.issue(ctx, req, pub, keyUsage)
}

// issue signs the certificate of req.Identity for pub.
func (ca *CA) issue(ctx context.Context, req issuer.Request, pub crypto.PublicKey, keyUsage x509.KeyUsage) (*issuer.Certificate, error) {
	id := req.Identity
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	if id.TrustDomain != ca.trustDomain {
		return nil, fmt.Errorf("issue certificate: identity is in trust domain %q, but this CA serves %q", id.TrustDomain, ca.trustDomain)
	}
	if err := issuer.ValidateTTL(req.TTL, ca.allowShortTTL); err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", id.SPIFFEID(), err)
	}
	uri, err := url.Parse(id.SPIFFEID())
	if err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", id.SPIFFEID(), err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		Subject: pkix.Name{
			CommonName:         id.NodeID,
			OrganizationalUnit: []string{id.Service},
			Organization:       []string{id.Env},
		},
		URIs:        []*url.URL{uri},
		KeyUsage:    keyUsage,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	st := ca.state.Load()
	leaf, now, ttl, err := ca.signLeaf(st.active, tmpl, req.TTL, pub)
	if err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", id.SPIFFEID(), err)
	}
	chain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})
	chain = append(chain, st.leafChainTail()...)
	return &issuer.Certificate{Leaf: leaf, ChainPEM: chain, IssuedAt: now, TTL: ttl}, nil
}

// csrPublicKey parses a DER CSR, checks its signature and returns its public
// key if it is of an accepted type, with the key usage a leaf for it gets.
func csrPublicKey(der []byte) (crypto.PublicKey, x509.KeyUsage, error) {
	if len(der) == 0 {
		return nil, 0, errors.New("no certificate signing request")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, 0, fmt.Errorf("parse certificate signing request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, 0, fmt.Errorf("certificate signing request signature: %w", err)
	}
	ku, err := leafKeyUsage(csr.PublicKey)
	if err != nil {
		return nil, 0, fmt.Errorf("%w in certificate signing request", err)
	}
	return csr.PublicKey, ku, nil
}

// leafKeyUsage returns the key usage a leaf for pub gets, or why pub is not
// an accepted workload key.
func leafKeyUsage(pub crypto.PublicKey) (x509.KeyUsage, error) {
	const want = "use ECDSA P-256 or P-384, or RSA of at least 2048 bits"
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return 0, fmt.Errorf("unsupported ECDSA curve %s (%s)", k.Curve.Params().Name, want)
		}
		return x509.KeyUsageDigitalSignature, nil
	case *rsa.PublicKey:
		if k.N.BitLen() < minRSABits {
			return 0, fmt.Errorf("RSA key of %d bits is too short (%s)", k.N.BitLen(), want)
		}
		return x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, nil
	default:
		return 0, fmt.Errorf("unsupported key type %T (%s)", k, want)
	}
}

// signLeaf sets the validity of tmpl (backdated NotBefore, NotAfter at most
// the intermediate's) and the fields every leaf shares, signs it with the
// intermediate in, and returns the certificate, its issue time and lifetime.
func (ca *CA) signLeaf(in *intermediate, tmpl *x509.Certificate, ttl time.Duration, pub crypto.PublicKey) (*x509.Certificate, time.Time, time.Duration, error) {
	// Certificates keep whole seconds; truncating keeps NotAfter = now+ttl exact.
	now := ca.now().Truncate(time.Second)
	if !now.Before(in.cert.NotAfter) {
		return nil, time.Time{}, 0, fmt.Errorf("intermediate CA expired at %s and was not renewed (see the log lines of its renewal)", in.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(ttl)
	if notAfter.After(in.cert.NotAfter) {
		notAfter = in.cert.NotAfter
	}
	tmpl.NotBefore = now.Add(-issuer.Backdate)
	tmpl.NotAfter = notAfter
	tmpl.BasicConstraintsValid = true
	tmpl.IsCA = false
	tmpl.AuthorityKeyId = in.cert.SubjectKeyId
	leaf, err := sign(tmpl, in.cert, pub, in.key)
	if err != nil {
		return nil, time.Time{}, 0, fmt.Errorf("sign: %w", err)
	}
	return leaf, now, notAfter.Sub(now), nil
}

// ServerCertificate returns a TLS certificate, with a fresh ECDSA P-256 key,
// for the SDS server's gRPC listener: DNS or IP SANs from hosts plus the
// server's SPIFFE ID, signed by the intermediate. Its chain ends with the
// root on purpose: bootstrap clients take the root from the handshake and
// pin it by the digest in their token.
func (ca *CA) ServerCertificate(hosts []string, ttl time.Duration) (tls.Certificate, error) {
	if err := issuer.ValidateTTL(ttl, ca.allowShortTTL); err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	uri, err := url.Parse(issuer.ServerSPIFFEID(ca.trustDomain))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "sds-server"},
		URIs:        []*url.URL{uri},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			continue
		}
		if h == "" || strings.ContainsAny(h, ":/ ") {
			return tls.Certificate{}, fmt.Errorf("server certificate: host %q is neither a DNS name nor an IP address (leave out any scheme or port)", h)
		}
		tmpl.DNSNames = append(tmpl.DNSNames, h)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: generate key: %w", err)
	}
	st := ca.state.Load()
	in := st.serverSigner()
	leaf, _, _, err := ca.signLeaf(in, tmpl, ttl, key.Public())
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	// The cross-signed root (if its root has one) comes right after the
	// intermediate: a sidecar whose bootstrap pinned the old root finds it
	// first when looking for the intermediate's issuer and reaches the old
	// root; one that pinned the new root finds that in its trust store
	// first. Every root of the bundle follows, for bootstrap clients that
	// look for the root their token pins.
	chain := [][]byte{leaf.Raw, in.cert.Raw}
	if in.root.cross != nil {
		chain = append(chain, in.root.cross.Raw)
	}
	for _, r := range st.rootCerts() {
		chain = append(chain, r.Raw)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}
