// Package issuer defines how sds-server obtains workload certificates: the
// Issuer interface that every CA backend implements, the workload Identity it
// certifies, and the lifetime rules shared by all backends.
package issuer

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"regexp"
	"time"
)

// Identity is what a workload certificate certifies. Every field comes from
// the authenticated credential of a stream, never from the sidecar's request.
type Identity struct {
	TrustDomain string // e.g. "mesh.local"
	Env         string // environment, the SPIFFE namespace
	Service     string // service name, the SPIFFE service account
	NodeID      string // random node ID assigned at admission
}

// SPIFFEID returns the canonical identity of the workload,
// spiffe://<trust_domain>/ns/<env>/sa/<service>: what RBAC matches.
func (i Identity) SPIFFEID() string { return SPIFFEID(i.TrustDomain, i.Env, i.Service) }

// SPIFFEID builds the canonical SPIFFE ID of a service in an environment.
func SPIFFEID(trustDomain, env, service string) string {
	return "spiffe://" + trustDomain + "/ns/" + env + "/sa/" + service
}

// ServerSPIFFEID is the URI SAN of the SDS server's own certificate. It lies
// outside the /ns/ namespace of workloads, so no workload certificate can
// ever impersonate the server.
func ServerSPIFFEID(trustDomain string) string { return "spiffe://" + trustDomain + "/sds-server" }

var (
	nameRE        = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)
	trustDomainRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$`)
)

// ValidateName reports whether s can be a service or environment name: lower
// case letters, digits, '.', '_' and '-', at most 63 characters, starting and
// ending with a letter or digit. what names the field in the error.
func ValidateName(what, s string) error {
	if !nameRE.MatchString(s) {
		return fmt.Errorf("invalid %s %q: use 1-63 lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit", what, s)
	}
	return nil
}

// ValidateTrustDomain reports whether s is a usable SPIFFE trust domain.
func ValidateTrustDomain(s string) error {
	if !trustDomainRE.MatchString(s) {
		return fmt.Errorf("invalid trust domain %q: use lower-case letters, digits, '.' and '-'", s)
	}
	return nil
}

// Validate checks every field of the identity.
func (i Identity) Validate() error {
	if err := ValidateTrustDomain(i.TrustDomain); err != nil {
		return err
	}
	if err := ValidateName("environment", i.Env); err != nil {
		return err
	}
	if err := ValidateName("service", i.Service); err != nil {
		return err
	}
	if i.NodeID == "" {
		return errors.New("identity has no node ID")
	}
	return nil
}

// Lifetime rules shared by every backend.
const (
	// DefaultTTL is the default lifetime of a workload certificate.
	DefaultTTL = time.Hour
	// MinTTL is the shortest lifetime accepted without AllowShortTTL.
	MinTTL = 5 * time.Minute
	// Backdate is how far NotBefore is set before the issue time, for clock skew.
	Backdate = time.Minute
)

// ValidateTTL applies the lifetime rules: positive, and at least MinTTL
// unless short lifetimes are explicitly allowed (tests, demos).
func ValidateTTL(ttl time.Duration, allowShort bool) error {
	switch {
	case ttl <= 0:
		return fmt.Errorf("certificate lifetime %s must be positive", ttl)
	case ttl < MinTTL && !allowShort:
		return fmt.Errorf("certificate lifetime %s is shorter than %s; set allow_short_ttl: true to allow it (tests and demos only)", ttl, MinTTL)
	}
	return nil
}

// Request asks an issuer for a workload certificate.
type Request struct {
	// Identity is the authenticated identity to certify.
	Identity Identity
	// CSR is a DER PKCS#10 request signed by the workload key. Issuers use
	// only its public key (after checking its signature): every name and
	// attribute comes from Identity.
	CSR []byte
	// PublicKey, when set, is a workload key generated in this process, and
	// NewCSR makes the CSR for it when an issuer needs one (use CSRDER).
	// An in-process issuer (the built-in CA) certifies PublicKey directly: a
	// CSR proves possession of the key to a remote CA, but in process it is
	// sds-server proving to itself that it holds the key it generated a
	// moment before, for a signature and a verification (a third of a
	// millisecond, a sixth of an admission's CPU).
	PublicKey crypto.PublicKey
	NewCSR    func() ([]byte, error)
	// TTL is the requested lifetime, counted from the issue time.
	TTL time.Duration
}

// CSRDER returns the request's CSR: CSR if set, else the one NewCSR makes.
func (r Request) CSRDER() ([]byte, error) {
	if len(r.CSR) > 0 || r.NewCSR == nil {
		return r.CSR, nil
	}
	csr, err := r.NewCSR()
	if err != nil {
		return nil, fmt.Errorf("create certificate signing request: %w", err)
	}
	return csr, nil
}

// Certificate is an issued workload certificate.
type Certificate struct {
	// Leaf is the workload certificate.
	Leaf *x509.Certificate
	// Chain is the leaf followed by the intermediates, in PEM: what Envoy
	// serves as certificate_chain.
	ChainPEM []byte
	// IssuedAt is the issue time; NotBefore is backdated from it.
	IssuedAt time.Time
	// TTL is the requested lifetime from IssuedAt (NotAfter = IssuedAt+TTL).
	TTL time.Duration
}

// Issuer is a certificate authority backend.
type Issuer interface {
	// Issue signs a workload certificate for req. It must be safe for
	// concurrent use and must not block forever: honour ctx.
	Issue(ctx context.Context, req Request) (*Certificate, error)
	// Roots returns every root currently trusted by the mesh (the trust
	// bundle). Never empty on success.
	Roots(ctx context.Context) ([]*x509.Certificate, error)
}

// RevokedCertificate is one entry of a certificate revocation list.
type RevokedCertificate struct {
	SerialNumber *big.Int
	RevokedAt    time.Time
}

// CRL is a signed certificate revocation list.
type CRL struct {
	// PEM is the list as a PEM "X509 CRL" block, what Envoy's validation
	// context takes.
	PEM []byte
	// ThisUpdate and NextUpdate bound its validity: past NextUpdate a peer
	// may refuse every certificate, so it must be replaced before then.
	ThisUpdate, NextUpdate time.Time
}

// CRLSigner is implemented by issuers that sign revocation lists for the
// certificates they issued (the CA that signed the leaves signs the list).
type CRLSigner interface {
	// SignCRL signs a list with the given number (increasing with every
	// list) holding revoked, valid from thisUpdate to nextUpdate.
	SignCRL(ctx context.Context, number *big.Int, revoked []RevokedCertificate, thisUpdate, nextUpdate time.Time) (*CRL, error)
}

// Revoker is implemented by issuers whose CA keeps its own revocation
// records and signs its own list (step-ca), where sds-server holds no CA
// key and so cannot sign a CRL itself: revocations are reported to the CA,
// and the CA's list is what sidecars get in ROOTCA. It is used only when
// the issuer is not a CRLSigner.
type Revoker interface {
	// Revoke records at the CA that the certificate with this serial number
	// is revoked, with a free-text reason. Revoking a certificate the CA has
	// already revoked is not an error. It must honour ctx.
	Revoke(ctx context.Context, serial *big.Int, reason string) error
	// CRL returns the CA's current revocation list, its signature checked
	// against the CA that issues the workload certificates. It fails with
	// an error wrapping ErrCRLNotApplicable when the list exists but cannot
	// be used by sidecars (see there).
	CRL(ctx context.Context) (*CRL, error)
}

// ErrCRLNotApplicable says a CA's revocation list must not be handed to
// sidecars: for instance it names an issuing distribution point that the
// workload certificates do not carry, so a TLS peer would find no list in
// scope for them and refuse every certificate. Revocation then relies on
// the other means (the deny list, the stream cut); it is a configuration
// matter, not an outage.
var ErrCRLNotApplicable = errors.New("the CA's revocation list does not apply to the workload certificates")
