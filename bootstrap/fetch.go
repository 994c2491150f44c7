package bootstrap

import (
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
)

// FetchTimeout bounds FetchRoot's connection and handshake.
const FetchTimeout = 10 * time.Second

// serverSPIFFEPath is the path of issuer.ServerSPIFFEID in any trust domain.
const serverSPIFFEPath = "/sds-server"

// FetchRoot downloads the root CA of the sds-server at serverAddr
// (HOST:PORT) without trusting the network: it takes the certificate chain
// the server presents in the TLS handshake (leaf, intermediates, root),
// keeps the certificate whose digest is the one tok pins, and checks that
// the server's leaf chains to it and carries the server's SPIFFE ID
// (spiffe://<trust domain>/sds-server). It returns the root and its PEM.
func FetchRoot(ctx context.Context, serverAddr string, tok Token) (*x509.Certificate, []byte, error) {
	host, _, err := net.SplitHostPort(serverAddr)
	if err != nil {
		return nil, nil, fmt.Errorf("fetch root CA: server address %q: want HOST:PORT: %w", serverAddr, err)
	}
	if len(tok.Digest) != DigestLen || !isBase36(tok.Digest) {
		return nil, nil, errors.New("fetch root CA: the token has no valid root digest")
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
		return nil, nil, fmt.Errorf("fetch root CA from %s: %w", serverAddr, err)
	}
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	_ = conn.Close()
	if len(certs) == 0 {
		return nil, nil, fmt.Errorf("fetch root CA: %s presented no certificate", serverAddr)
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
		return nil, nil, fmt.Errorf("root CA presented by %s does not match the token's digest %s (got sha256 digests %s); refusing it",
			serverAddr, tok.Digest, strings.Join(got, ", "))
	}
	if !root.IsCA || !root.BasicConstraintsValid {
		return nil, nil, fmt.Errorf("fetch root CA: the certificate of %s matching the token's digest is not a CA certificate; refusing it", serverAddr)
	}

	leaf := certs[0]
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	for i, c := range certs[1:] {
		if i+1 != rootIdx {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, nil, fmt.Errorf("fetch root CA: the certificate presented by %s does not chain to the pinned root CA: %w", serverAddr, err)
	}
	ok := false
	var uris []string
	for _, u := range leaf.URIs {
		uris = append(uris, u.String())
		if u.Scheme == "spiffe" && u.Host != "" && u.Path == serverSPIFFEPath && u.RawQuery == "" && u.Fragment == "" {
			ok = true
		}
	}
	if !ok {
		return nil, nil, fmt.Errorf("fetch root CA: the certificate presented by %s is not an sds-server certificate: want URI SAN spiffe://<trust domain>%s, got %v",
			serverAddr, serverSPIFFEPath, uris)
	}
	return root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}), nil
}
