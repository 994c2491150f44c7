package bootstrap

import (
	"bytes"
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// FetchTimeout bounds FetchRoot's connection and handshake.
const FetchTimeout = 10 * time.Second

// serverSPIFFEPath is the path of issuer.ServerSPIFFEID in any trust domain.
const serverSPIFFEPath = "/sds-server"

// Server is what FetchServer verified about an sds-server.
type Server struct {
	// Root is the root CA the token pins; RootPEM is its PEM encoding.
	Root    *x509.Certificate
	RootPEM []byte
	// TrustDomain is the trust domain of the server's own certificate
	// (spiffe://<TrustDomain>/sds-server), which chains to Root: the trust
	// domain the server issues identities in.
	TrustDomain string
}

// FetchRoot is FetchServer for callers that only need the root and its PEM.
func FetchRoot(ctx context.Context, serverAddr string, tok Token) (*x509.Certificate, []byte, error) {
	s, err := FetchServer(ctx, serverAddr, tok)
	if err != nil {
		return nil, nil, err
	}
	return s.Root, s.RootPEM, nil
}

// FetchServer downloads the root CA of the sds-server at serverAddr
// (HOST:PORT) without trusting the network: it takes the certificate chain
// the server presents in the TLS handshake (leaf, intermediates, root),
// keeps the certificate whose digest is the one tok pins, and checks that
// the server's leaf chains to it and carries the server's SPIFFE ID
// (spiffe://<trust domain>/sds-server). It returns the root, its PEM and
// the trust domain of that verified SPIFFE ID.
func FetchServer(ctx context.Context, serverAddr string, tok Token) (Server, error) {
	host, _, err := net.SplitHostPort(serverAddr)
	if err != nil {
		return Server{}, fmt.Errorf("fetch root CA: server address %q: want HOST:PORT: %w", serverAddr, err)
	}
	if len(tok.Digest) != DigestLen || !isBase36(tok.Digest) {
		return Server{}, errors.New("fetch root CA: the token has no valid root digest")
	}
	cfg := &tls.Config{
		// The channel is not trusted: the root is checked against the
		// token's digest below, and the leaf against that root.
		InsecureSkipVerify: true, //nolint:gosec // verified by hand below
		MinVersion:         tls.VersionTLS12,
		NextProtos:         []string{"h2"}, // grpc-go refuses a handshake without ALPN h2
	}
	if net.ParseIP(host) == nil {
		cfg.ServerName = host
	}
	ctx, cancel := context.WithTimeout(ctx, FetchTimeout)
	defer cancel()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: FetchTimeout}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", serverAddr)
	if err != nil {
		return Server{}, fmt.Errorf("fetch root CA from %s: %w", serverAddr, err)
	}
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	_ = conn.Close()
	if len(certs) == 0 {
		return Server{}, fmt.Errorf("fetch root CA: %s presented no certificate", serverAddr)
	}

	var root *x509.Certificate
	rootIdx := -1
	got := make([]string, len(certs))
	for i, c := range certs {
		got[i] = RootDigest(c)
		if subtle.ConstantTimeCompare([]byte(got[i]), []byte(tok.Digest)) == 1 && root == nil {
			root, rootIdx = c, i
		}
	}
	if root == nil {
		return Server{}, fmt.Errorf("root CA presented by %s does not match the token's digest %s (got sha256 digests %s); refusing it",
			serverAddr, tok.Digest, strings.Join(got, ", "))
	}
	if !root.IsCA || !root.BasicConstraintsValid {
		return Server{}, fmt.Errorf("fetch root CA: the certificate of %s matching the token's digest is not a CA certificate; refusing it", serverAddr)
	}

	leaf := certs[0]
	roots := x509.NewCertPool()
	roots.AddCert(root)
	for _, c := range anchorsUnder(root, certs[1:], time.Now()) {
		roots.AddCert(c)
	}
	inter := x509.NewCertPool()
	for i, c := range certs[1:] {
		if i+1 != rootIdx {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return Server{}, fmt.Errorf("fetch root CA: the certificate presented by %s does not chain to the pinned root CA: %w", serverAddr, err)
	}
	td, err := serverTrustDomain(leaf)
	if err != nil {
		return Server{}, fmt.Errorf("fetch root CA: the certificate presented by %s %w", serverAddr, err)
	}
	return Server{Root: root, RootPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}), TrustDomain: td}, nil
}

// serverTrustDomain returns the trust domain of leaf's one sds-server
// SPIFFE ID, spiffe://<trust domain>/sds-server. Its errors complete the
// sentence "the certificate presented by ADDR ...".
func serverTrustDomain(leaf *x509.Certificate) (string, error) {
	var uris, tds []string
	for _, u := range leaf.URIs {
		uris = append(uris, u.String())
		if u.Scheme == "spiffe" && u.Host != "" && u.Path == serverSPIFFEPath && u.RawQuery == "" && u.Fragment == "" && u.User == nil {
			tds = append(tds, u.Host)
		}
	}
	switch {
	case len(tds) == 0:
		return "", fmt.Errorf("is not an sds-server certificate: want URI SAN spiffe://<trust domain>%s, got %v", serverSPIFFEPath, uris)
	case len(tds) > 1:
		return "", fmt.Errorf("names %d sds-server trust domains (%s); want exactly one", len(tds), strings.Join(tds, ", "))
	}
	if err := issuer.ValidateTrustDomain(tds[0]); err != nil {
		return "", fmt.Errorf("names the invalid trust domain %q: %w", tds[0], err)
	}
	return tds[0], nil
}

// anchorsUnder returns the CA certificates among presented that the pinned
// root signed directly and that are valid at now, to be trusted as anchors
// beside root.
//
// Why: during and after a root rotation the server presents leaf, the new
// root B's intermediate, B cross-signed by the old root A, and the roots.
// A client pinning A verifies leaf → B's intermediate → cross-signed B → A,
// two CAs under A, while roots made before rotations existed have
// MaxPathLen 1. BoringSSL and OpenSSL (Envoy) do not apply a trust
// anchor's own path length (RFC 5280 6.1: the anchor is not part of the
// path), Go's crypto/x509 does. Trusting what A signed directly is what A
// vouches for anyway: the certificate's signature is checked here against
// A (with A's CA flag and key usage), its validity too, and the chain from
// it to the leaf is still verified with every constraint of the
// certificates in it (the cross-signed B's own path length included). A
// root with name constraints gets no extra anchors, since they would not be
// applied through them.
func anchorsUnder(root *x509.Certificate, presented []*x509.Certificate, now time.Time) []*x509.Certificate {
	if len(root.PermittedDNSDomains)+len(root.ExcludedDNSDomains)+len(root.PermittedIPRanges)+len(root.ExcludedIPRanges)+
		len(root.PermittedEmailAddresses)+len(root.ExcludedEmailAddresses)+len(root.PermittedURIDomains)+len(root.ExcludedURIDomains) > 0 {
		return nil
	}
	var out []*x509.Certificate
	for _, c := range presented {
		if c.Equal(root) || !c.IsCA || !c.BasicConstraintsValid {
			continue
		}
		if !bytes.Equal(c.RawIssuer, root.RawSubject) || now.Before(c.NotBefore) || now.After(c.NotAfter) {
			continue
		}
		if c.CheckSignatureFrom(root) != nil {
			continue
		}
		out = append(out, c)
	}
	return out
}
