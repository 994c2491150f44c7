package stepca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/smallstep/certificates/api"
	"github.com/smallstep/cli-utils/token"
	"github.com/smallstep/cli-utils/token/provision"
	"go.step.sm/crypto/randutil"

	"github.com/meshid/sds-server/issuer"
)

// tokenLifetime is how long a one-time token is valid: it is used at once.
const tokenLifetime = 5 * time.Minute

// sdsClaim is the custom token claim the template reads (deploy/step-ca).
type sdsClaim struct {
	Kind string `json:"kind"`         // "workload" or "server"
	OU   string `json:"ou,omitempty"` // service
	O    string `json:"o,omitempty"`  // environment
	// CRL is the distribution point of step-ca's CRL, for workloads.
	CRL string `json:"crl,omitempty"`
}

// signRequest is one certificate to have step-ca sign.
type signRequest struct {
	csr      *x509.CertificateRequest
	subject  string   // token subject: the certificate's CN
	sans     []string // token SANs: the certificate's SANs
	claim    sdsClaim
	issuedAt time.Time
	notAfter time.Time // zero: step-ca's default lifetime for the provisioner
}

// Issue has step-ca sign a workload certificate for req. The CSR's
// signature is checked and its names must be the identity's (step-ca
// insists on that), but the certificate's names come from the token. What
// step-ca returns is checked to carry exactly the identity asked for, the
// CSR's key, and to chain to the trust bundle. Issue implements
// issuer.Issuer; ctx bounds it, and so does the per-request timeout.
func (iss *Issuer) Issue(ctx context.Context, req issuer.Request) (*issuer.Certificate, error) {
	id := req.Identity
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	if id.TrustDomain != iss.trustDomain {
		return nil, fmt.Errorf("issue certificate: identity is in trust domain %q, but this issuer serves %q", id.TrustDomain, iss.trustDomain)
	}
	spiffeID := id.SPIFFEID()
	if err := iss.checkTTL(req.TTL); err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", spiffeID, err)
	}
	der, err := req.CSRDER()
	if err != nil {
		return nil, err
	}
	csr, err := parseCSR(der)
	if err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", spiffeID, err)
	}
	if err := csrMatches(csr, id.NodeID, spiffeID); err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", spiffeID, err)
	}
	now := iss.now().Truncate(time.Second)
	leaf, chain, err := iss.sign(ctx, signRequest{
		csr: csr, subject: id.NodeID, sans: []string{spiffeID},
		claim:    sdsClaim{Kind: "workload", OU: id.Service, O: id.Env, CRL: iss.crlDistributionPoint()},
		issuedAt: now, notAfter: now.Add(req.TTL),
	})
	if err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", spiffeID, err)
	}
	if err := checkWorkload(leaf, id); err != nil {
		return nil, &identityError{fmt.Errorf("issue certificate for %s: step-ca returned a certificate without the identity asked for (is deploy/step-ca/sds-server.tpl the x509 template of provisioner %q?): %w",
			spiffeID, iss.provisioner, err)}
	}
	iss.leafCRLDP.Store(&leaf.CRLDistributionPoints)
	if len(chain) > 1 {
		if old := iss.inter.Swap(chain[1]); old != nil && !old.Equal(chain[1]) {
			iss.intermediateChanged(old, chain[1])
		}
	}
	// IssuedAt is the requested issue time: NotBefore is backdated from it.
	issuedAt := leaf.NotBefore.Add(issuer.Backdate)
	pemChain := make([]byte, 0, 1600)
	for _, c := range chain {
		pemChain = append(pemChain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return &issuer.Certificate{Leaf: leaf, ChainPEM: pemChain, IssuedAt: issuedAt, TTL: leaf.NotAfter.Sub(issuedAt)}, nil
}

// ServerCertificate returns a TLS certificate, with a fresh ECDSA P-256
// key, for the SDS server's gRPC listener, signed by step-ca: DNS or IP SANs
// from hosts plus the server's SPIFFE ID, serverAuth only. ttl is a maximum,
// cut to what the provisioner allows. The chain ends with the pinned root on
// purpose: bootstrap clients take the root from the handshake and pin it by
// the digest in their token.
func (iss *Issuer) ServerCertificate(hosts []string, ttl time.Duration) (tls.Certificate, error) {
	if err := issuer.ValidateTTL(ttl, iss.allowShortTTL); err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	serverID := issuer.ServerSPIFFEID(iss.trustDomain)
	uri, err := url.Parse(serverID)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: "sds-server"}, URIs: []*url.URL{uri}}
	var sans []string
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h == "" || strings.ContainsAny(h, ":/ ") {
			return tls.Certificate{}, fmt.Errorf("server certificate: host %q is neither a DNS name nor an IP address (leave out any scheme or port)", h)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
		sans = append(sans, h)
	}
	sans = append(sans, serverID)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: generate key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	now := iss.now().Truncate(time.Second)
	req := signRequest{csr: csr, subject: "sds-server", sans: sans, claim: sdsClaim{Kind: "server"}, issuedAt: now}
	// Within the provisioner's maximum, backdate included. When the maximum
	// is step-ca's default, which ca.json may have lowered, ask for none and
	// get the provisioner's default lifetime, which step-ca keeps below it.
	if iss.bounds.MaxFromProvisioner {
		req.notAfter = now.Add(min(ttl, iss.bounds.Max-issuer.Backdate))
	} else if ttl < stepDefaultMaxTLS-issuer.Backdate {
		req.notAfter = now.Add(ttl)
	}
	ctx, cancel := context.WithTimeout(context.Background(), iss.timeout)
	defer cancel()
	leaf, chain, err := iss.sign(ctx, req)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	if !slices.Equal(uriStrings(leaf.URIs), []string{serverID}) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) {
		return tls.Certificate{}, fmt.Errorf("server certificate: step-ca returned URIs %v and extended key usages %v, want %s and serverAuth (is deploy/step-ca/sds-server.tpl the x509 template of provisioner %q?)",
			uriStrings(leaf.URIs), leaf.ExtKeyUsage, serverID, iss.provisioner)
	}
	out := tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, c := range chain {
		out.Certificate = append(out.Certificate, c.Raw)
	}
	last := chain[len(chain)-1]
	root := iss.trust.Load().issuerOf(last)
	if root != nil && !root.Equal(last) {
		out.Certificate = append(out.Certificate, root.Raw)
	}
	if root != nil {
		iss.servingRoot.Store(root)
	}
	return out, nil
}

// probe signs a throwaway workload certificate of lifetime ttl, to prove at
// start-up that the whole path works: token, template, lifetime.
func (iss *Issuer) probe(ctx context.Context, ttl time.Duration) error {
	id := issuer.Identity{TrustDomain: iss.trustDomain, Env: "sds-probe", Service: "sds-probe", NodeID: "sds-server-startup-probe"}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return permanent(err)
	}
	uri, _ := url.Parse(id.SPIFFEID())
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: id.NodeID, OrganizationalUnit: []string{id.Service}, Organization: []string{id.Env}},
		URIs:    []*url.URL{uri},
	}, key)
	if err != nil {
		return permanent(err)
	}
	ctx, cancel := context.WithTimeout(ctx, iss.timeout)
	defer cancel()
	_, err = iss.Issue(ctx, issuer.Request{Identity: id, CSR: der, TTL: ttl})
	var sErr *signError
	var idErr *identityError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &idErr):
		return permanent(err)
	case errors.As(err, &sErr) && sErr.status == 403:
		return permanent(fmt.Errorf("step-ca provisioner %q refused a certificate of lifetime %s (%s requested, backdate included; the provisioner's bounds: %s, unless ca.json's authority.claims changes the defaults): %w",
			iss.provisioner, ttl, ttl+issuer.Backdate, iss.bounds, err))
	case errors.As(err, &sErr) && sErr.status == 401:
		return permanent(fmt.Errorf("step-ca refused sds-server's token (check that the provisioner key matches, that the URL's host is one of step-ca's dnsNames, and the clocks): %w", err))
	case errors.As(err, &sErr) && sErr.status < 500:
		return permanent(err)
	}
	return err // transport failures, timeouts and 5xx are transient
}

// identityError is a certificate from step-ca that lacks the identity asked
// for: a misconfigured template, never served.
type identityError struct{ error }

func (e *identityError) Unwrap() error { return e.error }

// signError is an error answer of step-ca's sign endpoint.
type signError struct {
	status int
	err    error
}

func (e *signError) Error() string { return e.err.Error() }
func (e *signError) Unwrap() error { return e.err }

// sign mints a one-time token for r and has step-ca sign r's CSR. It returns
// the leaf and the chain (leaf first, intermediates, as step-ca sent it),
// verified against the pinned root and checked to hold the CSR's key.
func (iss *Issuer) sign(ctx context.Context, r signRequest) (*x509.Certificate, []*x509.Certificate, error) {
	ott, err := iss.token(r.subject, r.sans, r.claim)
	if err != nil {
		return nil, nil, fmt.Errorf("sign one-time token: %w", err)
	}
	sreq := &api.SignRequest{
		CsrPEM:    api.NewCertificateRequest(r.csr),
		OTT:       ott,
		NotBefore: api.NewTimeDuration(r.issuedAt.Add(-issuer.Backdate)),
	}
	if !r.notAfter.IsZero() {
		sreq.NotAfter = api.NewTimeDuration(r.notAfter)
	}
	ctx, cancel := context.WithTimeout(ctx, iss.timeout)
	defer cancel()
	resp, err := iss.client.SignWithContext(ctx, sreq)
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("step-ca at %s: sign: %w", iss.url, ctx.Err())
		}
		e := iss.requestError("sign", err)
		var apiErr interface{ StatusCode() int }
		if errors.As(err, &apiErr) {
			return nil, nil, &signError{status: apiErr.StatusCode(), err: e}
		}
		return nil, nil, e
	}
	var chain []*x509.Certificate
	for _, c := range resp.CertChainPEM {
		if c.Certificate != nil {
			chain = append(chain, c.Certificate)
		}
	}
	if len(chain) == 0 && resp.ServerPEM.Certificate != nil { // step-ca before certChain
		chain = append(chain, resp.ServerPEM.Certificate)
		if resp.CaPEM.Certificate != nil {
			chain = append(chain, resp.CaPEM.Certificate)
		}
	}
	if len(chain) == 0 {
		return nil, nil, fmt.Errorf("step-ca at %s: sign: no certificate in the answer", iss.url)
	}
	leaf := chain[0]
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(r.csr.PublicKey) {
		return nil, nil, fmt.Errorf("step-ca at %s: sign: the certificate is not for the CSR's key", iss.url)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: iss.trust.Load().pool, Intermediates: inter, CurrentTime: leaf.NotBefore.Add(issuer.Backdate),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, nil, fmt.Errorf("step-ca at %s: sign: the certificate does not chain to the pinned root: %w", iss.url, err)
	}
	return leaf, chain, nil
}

// token signs a one-time token of the JWK provisioner, as step's
// ca.Provisioner.Token does, plus the "sds" claim the template reads.
func (iss *Issuer) token(subject string, sans []string, claim sdsClaim) (string, error) {
	jti, err := randutil.Hex(64)
	if err != nil {
		return "", err
	}
	now := time.Now()
	tok, err := provision.New(subject,
		token.WithJWTID(jti),
		token.WithKid(iss.jwk.KeyID),
		token.WithIssuer(iss.provisioner),
		token.WithAudience(iss.audience),
		token.WithValidity(now, now.Add(tokenLifetime)),
		token.WithSANS(sans),
		token.WithSHA(fingerprint(iss.Root())),
		token.WithClaim("sds", claim),
	)
	if err != nil {
		return "", err
	}
	return tok.SignedString(iss.jwk.Algorithm, iss.jwk.Key)
}

func parseCSR(der []byte) (*x509.CertificateRequest, error) {
	if len(der) == 0 {
		return nil, errors.New("no certificate signing request")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("parse certificate signing request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("certificate signing request signature: %w", err)
	}
	return csr, nil
}

// csrMatches checks what step-ca checks of a workload CSR against the
// token, for a clear error here rather than a 403 there: a CN, if any, that
// is the node ID, no SANs but the SPIFFE ID.
func csrMatches(csr *x509.CertificateRequest, nodeID, spiffeID string) error {
	if csr.Subject.CommonName != "" && csr.Subject.CommonName != nodeID {
		return fmt.Errorf("certificate signing request has CN %q, want %q or none", csr.Subject.CommonName, nodeID)
	}
	if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return errors.New("certificate signing request has DNS, IP or e-mail SANs; a workload certificate has only its SPIFFE ID")
	}
	if got := uriStrings(csr.URIs); len(got) > 0 && !slices.Equal(got, []string{spiffeID}) {
		return fmt.Errorf("certificate signing request has URI SANs %v, want [%s] or none", got, spiffeID)
	}
	return nil
}

// checkWorkload checks that leaf carries exactly id: the SPIFFE ID as its
// only SAN, Subject CN/OU/O, and both TLS usages.
func checkWorkload(leaf *x509.Certificate, id issuer.Identity) error {
	var problems []string
	if got := uriStrings(leaf.URIs); !slices.Equal(got, []string{id.SPIFFEID()}) {
		problems = append(problems, fmt.Sprintf("URI SANs %v", got))
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) > 0 {
		problems = append(problems, "DNS, IP or e-mail SANs")
	}
	s := leaf.Subject
	if s.CommonName != id.NodeID || !slices.Equal(s.OrganizationalUnit, []string{id.Service}) || !slices.Equal(s.Organization, []string{id.Env}) {
		problems = append(problems, fmt.Sprintf("subject %q", s.String()))
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) {
		problems = append(problems, "no clientAuth+serverAuth extended key usage")
	}
	if leaf.IsCA {
		problems = append(problems, "a CA certificate")
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

func uriStrings(us []*url.URL) []string {
	out := make([]string, 0, len(us))
	for _, u := range us {
		out = append(out, u.String())
	}
	return out
}

// crlDistributionPoint is the URL of step-ca's CRL, or "" when it has none.
func (iss *Issuer) crlDistributionPoint() string {
	if p := iss.crlDP.Load(); p != nil {
		return *p
	}
	return ""
}
