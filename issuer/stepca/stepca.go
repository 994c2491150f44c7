// Package stepca is the step-ca backend of sds-server: a real step-ca
// (github.com/smallstep/certificates) signs every workload certificate and
// the SDS listener's own one, through step-ca's own Go client.
//
// sds-server holds a JWK provisioner: for each CSR it signs a one-time token
// that carries the identity (subject = node ID, sans = [SPIFFE ID], and the
// custom claim "sds" with the service and environment) and posts it with the
// CSR to step-ca's sign endpoint. The provisioner's x509 template
// (deploy/step-ca/sds-server.tpl) builds the certificate from the token
// alone; Issue checks that what comes back carries exactly the identity it
// asked for before anyone sees it.
//
// Trust comes from a root pinned by fingerprint or file: the trust bundle is
// step-ca's roots endpoint read over TLS verified against that root.
package stepca

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/certificates/ca"
	"github.com/smallstep/certificates/errs"
	"go.step.sm/crypto/jose"

	"github.com/meshid/sds-server/issuer"
)

// Defaults of Options.
const (
	DefaultTimeout         = 10 * time.Second
	DefaultConnectAttempts = 5
	DefaultConnectBackoff  = time.Second
	maxConnectBackoff      = 8 * time.Second
)

// step-ca's own lifetime bounds, which apply when the provisioner sets no
// claims of its own (unless ca.json's authority.claims changes them, which
// step-ca does not publish).
const (
	stepDefaultMinTLS = 5 * time.Minute
	stepDefaultMaxTLS = 24 * time.Hour
)

// Options configures the step-ca backend. The comments name the config keys
// of `sds-server serve` that fill them.
type Options struct {
	// URL of step-ca, e.g. https://ca.internal:9000 (ca.url). Its host must be
	// one of step-ca's dnsNames: step-ca checks it as the tokens' audience.
	URL string
	// RootFingerprint is the hex SHA-256 of step-ca's root certificate
	// (ca.root_fingerprint, as `step certificate fingerprint` prints it).
	// RootFile is a PEM file holding that root (ca.root_file). At least one
	// is required; with both, the file's root must have the fingerprint.
	RootFingerprint string
	RootFile        string
	// Provisioner names the JWK provisioner (ca.provisioner). KeyFile holds
	// its private key (ca.key_file): the JWE that `step ca provisioner add
	// --create` or `step crypto jwk create` writes, or a PEM key; PasswordFile
	// holds the password that decrypts it (ca.password_file).
	Provisioner  string
	KeyFile      string
	PasswordFile string
	// TrustDomain is the SPIFFE trust domain certified.
	TrustDomain string
	// TTL is the workload certificate lifetime (cert_ttl): Open checks that
	// the provisioner accepts it. AllowShortTTL allows under issuer.MinTTL.
	TTL           time.Duration
	AllowShortTTL bool
	// Timeout bounds each request to step-ca; default DefaultTimeout.
	Timeout time.Duration
	// ConnectAttempts and ConnectBackoff say how often Open tries to reach
	// step-ca, waiting ConnectBackoff, then twice that, ... (at most 8 s)
	// between attempts. Defaults 5 and 1 s: about 15 s in all.
	ConnectAttempts int
	ConnectBackoff  time.Duration
	// Logger receives one warning per failed attempt that Open retries
	// (attempt N of M, the wait, the error), so a start-up waiting for
	// step-ca is not silent; nil logs nothing.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// StateFile keeps the roots learned from step-ca (<data_dir>/stepca-roots.json),
	// so that a restart after step-ca dropped the configured root still
	// authenticates step-ca; empty keeps them in memory only.
	StateFile string
}

// Bounds are the certificate lifetimes a provisioner accepts: step-ca
// measures NotAfter - NotBefore, backdate included.
type Bounds struct {
	Min, Max time.Duration
	// FromProvisioner says whether each bound is the provisioner's own claim
	// (true) or step-ca's default (false).
	MinFromProvisioner, MaxFromProvisioner bool
}

func (b Bounds) String() string {
	src := func(own bool) string {
		if own {
			return ""
		}
		return " (step-ca default)"
	}
	return fmt.Sprintf("minTLSCertDuration %s%s, maxTLSCertDuration %s%s", b.Min, src(b.MinFromProvisioner), b.Max, src(b.MaxFromProvisioner))
}

// Issuer signs certificates with step-ca. It implements issuer.Issuer and
// issuer.Revoker, and is safe for concurrent use: everything but the HTTP
// clients and what the last signature showed (atomics) is immutable.
type Issuer struct {
	url           *url.URL
	client        *ca.Client
	httpc         *http.Client // verified TLS to step-ca, for what ca.Client lacks (the CRL)
	provisioner   string
	audience      string
	jwk           *jose.JSONWebKey
	pin           []string // fingerprints of the configured pin
	stateFile     string
	log           *slog.Logger
	bounds        Bounds
	trustDomain   string
	allowShortTTL bool
	timeout       time.Duration
	now           func() time.Time

	// inter is the intermediate that signed the last workload certificate,
	// the CA whose CRL applies to them; leafCRLDP the CRL distribution
	// points that certificate carried.
	inter     atomic.Pointer[x509.Certificate]
	leafCRLDP atomic.Pointer[[]string]
	// crlDP is the distribution point of step-ca's CRL, put in every
	// workload certificate so that the CRL applies to it.
	crlDP atomic.Pointer[string]
	// trust is the set of roots step-ca is authenticated by and its
	// certificates must chain to (trust.go); trustMu serialises its updates.
	trust   atomic.Pointer[trustSet]
	trustMu sync.Mutex
	// servingRoot is the root the last ServerCertificate chains to: what
	// bootstrap clients see in the handshake, so new tokens pin it.
	servingRoot atomic.Pointer[x509.Certificate]
	// onInterChange is called when step-ca starts signing with another
	// intermediate (OnIntermediateChange).
	onInterChange atomic.Pointer[func()]
}

var (
	_ issuer.Issuer  = (*Issuer)(nil)
	_ issuer.Revoker = (*Issuer)(nil)
)

// Open connects to step-ca and checks everything a later Issue depends on:
// the root (pinned by fingerprint or file), the provisioner and its key,
// the TTL against the provisioner's bounds, and one probe certificate
// signed through the provisioner's template. An unreachable step-ca is
// retried (ConnectAttempts); every other problem fails at once, with an
// error saying what to fix.
func Open(ctx context.Context, opts Options) (*Issuer, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	u, err := url.Parse(opts.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("step-ca URL %q: want https://HOST[:PORT]", opts.URL)
	}
	jwk, err := loadKey(opts.KeyFile, opts.PasswordFile)
	if err != nil {
		return nil, err
	}
	var fileRoots []*x509.Certificate
	if opts.RootFile != "" {
		if fileRoots, err = readRoots(opts.RootFile, opts.RootFingerprint); err != nil {
			return nil, err
		}
	}
	iss := &Issuer{
		url:           u,
		provisioner:   opts.Provisioner,
		audience:      u.ResolveReference(&url.URL{Path: "/1.0/sign"}).String(),
		jwk:           jwk,
		trustDomain:   opts.TrustDomain,
		allowShortTTL: opts.AllowShortTTL,
		timeout:       opts.Timeout,
		now:           opts.Now,
		stateFile:     opts.StateFile,
		log:           opts.Logger,
	}
	if opts.Logger == nil {
		iss.log = slog.New(slog.DiscardHandler)
	}
	if len(fileRoots) > 0 {
		for _, r := range fileRoots {
			iss.pin = append(iss.pin, fingerprint(r))
		}
	} else {
		iss.pin = []string{opts.RootFingerprint}
	}
	learned, err := loadTrustState(opts.StateFile, iss.pin)
	if err != nil {
		return nil, err
	}
	var prov *provisioner.JWK
	err = retry(ctx, opts.Logger, opts.ConnectAttempts, opts.ConnectBackoff, func() error {
		if err := iss.connect(ctx, opts.RootFingerprint, fileRoots, learned); err != nil {
			return err
		}
		prov, err = iss.findProvisioner(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := checkProvisionerKey(prov, jwk, opts.KeyFile); err != nil {
		return nil, err
	}
	iss.bounds = provisionerBounds(prov)
	if err := iss.checkTTL(opts.TTL); err != nil {
		return nil, err
	}
	iss.learnCRLDistributionPoint(ctx)
	// One real signature through the template: proves that step-ca accepts
	// the tokens (audience, key, clocks), that the template yields the
	// identity, and that the lifetime passes step-ca's global claims too.
	err = retry(ctx, opts.Logger, opts.ConnectAttempts, opts.ConnectBackoff, func() error { return iss.probe(ctx, opts.TTL) })
	if err != nil {
		return nil, err
	}
	return iss, nil
}

func (o *Options) defaults() error {
	switch {
	case o.URL == "":
		return errors.New("step-ca: no URL")
	case o.RootFingerprint == "" && o.RootFile == "":
		return errors.New("step-ca: set the root fingerprint or the root file, to authenticate step-ca")
	case o.Provisioner == "":
		return errors.New("step-ca: no provisioner name")
	case o.KeyFile == "":
		return errors.New("step-ca: no provisioner key file")
	}
	if err := issuer.ValidateTrustDomain(o.TrustDomain); err != nil {
		return fmt.Errorf("step-ca: %w", err)
	}
	if err := issuer.ValidateTTL(o.TTL, o.AllowShortTTL); err != nil {
		return fmt.Errorf("step-ca: %w", err)
	}
	if o.RootFingerprint != "" {
		fp := normalizeFingerprint(o.RootFingerprint)
		if b, err := hex.DecodeString(fp); err != nil || len(b) != sha256.Size {
			return fmt.Errorf("step-ca root fingerprint %q: want the 64 hex digits of the root certificate's SHA-256", o.RootFingerprint)
		}
		o.RootFingerprint = fp
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.ConnectAttempts <= 0 {
		o.ConnectAttempts = DefaultConnectAttempts
	}
	if o.ConnectBackoff <= 0 {
		o.ConnectBackoff = DefaultConnectBackoff
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return nil
}

// normalizeFingerprint accepts upper case and ':' or '-' separators.
func normalizeFingerprint(s string) string {
	return strings.ToLower(strings.NewReplacer(":", "", "-", "", " ", "").Replace(strings.TrimSpace(s)))
}

func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// loadKey reads and decrypts the provisioner's private key.
func loadKey(keyFile, passwordFile string) (*jose.JSONWebKey, error) {
	data, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("step-ca provisioner key file: %w", err)
	}
	var pass []byte
	if passwordFile != "" {
		p, err := os.ReadFile(passwordFile)
		if err != nil {
			return nil, fmt.Errorf("step-ca provisioner password file: %w", err)
		}
		// Like step: the first line is the password.
		pass = []byte(strings.TrimRight(strings.SplitN(string(p), "\n", 2)[0], "\r"))
		if len(pass) == 0 {
			return nil, fmt.Errorf("step-ca provisioner password file %s is empty", passwordFile)
		}
	}
	if _, err := jose.ParseEncrypted(strings.TrimSpace(string(data))); err == nil && pass == nil {
		return nil, fmt.Errorf("step-ca provisioner key file %s is encrypted: set the password file", keyFile)
	}
	opts := []jose.Option{jose.WithFilename(keyFile)}
	if pass != nil {
		opts = append(opts, jose.WithPassword(pass))
	}
	jwk, err := jose.ParseKey(data, opts...)
	if err != nil {
		if strings.Contains(err.Error(), "invalid password") || strings.Contains(err.Error(), "decrypt") {
			return nil, fmt.Errorf("step-ca provisioner key file %s: the password in %s does not decrypt it (wrong password?)", keyFile, passwordFile)
		}
		return nil, fmt.Errorf("step-ca provisioner key file %s: %w", keyFile, err)
	}
	if jwk.IsPublic() {
		return nil, fmt.Errorf("step-ca provisioner key file %s holds a public key; it must hold the provisioner's private key", keyFile)
	}
	if jwk.Algorithm == "" {
		return nil, fmt.Errorf("step-ca provisioner key file %s: unsupported key type %T", keyFile, jwk.Key)
	}
	return jwk, nil
}

// readRoots reads the root file and, given a fingerprint, checks it.
func readRoots(path, fp string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("step-ca root file: %w", err)
	}
	var roots []*x509.Certificate
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("step-ca root file %s: %w", path, err)
		}
		if fp == "" || fingerprint(c) == fp {
			roots = append(roots, c)
		}
	}
	switch {
	case len(roots) > 0:
		return roots, nil
	case fp != "":
		return nil, fmt.Errorf("step-ca root file %s holds no certificate with the root fingerprint %s", path, fp)
	default:
		return nil, fmt.Errorf("step-ca root file %s: no PEM certificate found", path)
	}
}

// transport is the HTTP transport to step-ca. Its timeouts make a dead or
// silent step-ca an error, not a hang, even where a caller forgot a
// deadline. GetClientCertificate keeps step's client from presenting a
// default identity from $STEPPATH.
func (iss *Issuer) transport(tlsConf *tls.Config) *http.Transport {
	tlsConf.MinVersion = tls.VersionTLS12
	tlsConf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: iss.timeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsConf,
		TLSHandshakeTimeout:   iss.timeout,
		ResponseHeaderTimeout: iss.timeout,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   16,
		ForceAttemptHTTP2:     true,
	}
}

// connect pins the root and makes the verified client. With a fingerprint,
// the roots are first read without verification (step's bootstrap) and the
// one with the fingerprint is pinned; then the roots are read again over TLS
// verified against it. learned are the roots a previous run followed step-ca
// to (the state file): trusted too, so that a step-ca that has dropped the
// configured root after a rotation is still authenticated.
func (iss *Issuer) connect(ctx context.Context, fp string, fileRoots, learned []*x509.Certificate) error {
	pinned := fileRoots
	if len(pinned) == 0 {
		insecure, err := ca.NewClient(iss.url.String(), ca.WithTransport(iss.transport(&tls.Config{InsecureSkipVerify: true})), ca.WithTimeout(iss.timeout)) //nolint:gosec // checked against the fingerprint below
		if err != nil {
			return permanent(fmt.Errorf("step-ca client: %w", err))
		}
		resp, err := insecure.RootsWithContext(ctx)
		insecure.CloseIdleConnections()
		if err != nil {
			return iss.requestError("read roots", err)
		}
		var seen []string
		for _, c := range resp.Certificates {
			if c.Certificate == nil {
				continue
			}
			if got := fingerprint(c.Certificate); got == fp {
				pinned = []*x509.Certificate{c.Certificate}
				break
			} else {
				seen = append(seen, got)
			}
		}
		if len(pinned) == 0 && len(learned) == 0 {
			return permanent(fmt.Errorf("step-ca at %s has no root with fingerprint %s (its roots: %s): check the root fingerprint; if step-ca's root was rotated, pin the new root", iss.url, fp, strings.Join(seen, ", ")))
		}
	}
	trusted := slices.Clone(pinned)
	for _, r := range learned {
		if !slices.ContainsFunc(trusted, r.Equal) {
			trusted = append(trusted, r)
		}
	}
	iss.trust.Store(newTrustSet(trusted))
	// Verified against the trust set at each handshake (verifyConnection),
	// so the pin can move without a new client.
	tr := iss.transport(&tls.Config{InsecureSkipVerify: true, VerifyConnection: iss.verifyConnection}) //nolint:gosec // verified by VerifyConnection
	client, err := ca.NewClient(iss.url.String(), ca.WithTransport(tr), ca.WithTimeout(iss.timeout))
	if err != nil {
		return permanent(fmt.Errorf("step-ca client: %w", err))
	}
	served, err := rootsOf(ctx, iss, client)
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(served, func(c *x509.Certificate) bool { return slices.ContainsFunc(trusted, c.Equal) }) {
		var fps []string
		for _, r := range trusted {
			fps = append(fps, fingerprint(r))
		}
		return permanent(fmt.Errorf("step-ca at %s does not list the pinned root (%s) among its roots", iss.url, strings.Join(fps, ", ")))
	}
	iss.client = client
	iss.httpc = &http.Client{Transport: tr, Timeout: iss.timeout}
	return iss.follow(served)
}

// rootsOf reads the roots step-ca serves through client.
func rootsOf(ctx context.Context, iss *Issuer, client *ca.Client) ([]*x509.Certificate, error) {
	resp, err := client.RootsWithContext(ctx)
	if err != nil {
		return nil, iss.requestError("read roots", err)
	}
	var served []*x509.Certificate
	for _, c := range resp.Certificates {
		if c.Certificate != nil && c.Certificate.IsCA && !slices.ContainsFunc(served, c.Certificate.Equal) {
			served = append(served, c.Certificate)
		}
	}
	if len(served) == 0 {
		return nil, permanent(fmt.Errorf("step-ca at %s serves no root certificate at /roots", iss.url))
	}
	return served, nil
}

// follow makes the roots step-ca served (over TLS verified by the current
// trust set) the trust set, logs what changed and keeps it in the state
// file. A failed write is logged, not returned: the new set is right, only
// a restart would fall back to the older one.
func (iss *Issuer) follow(served []*x509.Certificate) error {
	iss.trustMu.Lock()
	defer iss.trustMu.Unlock()
	cur := iss.trust.Load()
	roots := orderRoots(served, cur.roots, iss.servingRoot.Load(), iss.inter.Load())
	if cur.equal(roots) {
		return nil
	}
	var added, removed []string
	for _, r := range roots {
		if !cur.contains(r) {
			added = append(added, fingerprint(r))
		}
	}
	for _, r := range cur.roots {
		if !slices.ContainsFunc(roots, r.Equal) {
			removed = append(removed, fingerprint(r))
		}
	}
	iss.trust.Store(newTrustSet(roots))
	if len(added) > 0 || len(removed) > 0 {
		iss.log.Info("step-ca roots changed", "url", iss.url.String(), "added", added, "removed", removed, "pinned_root", fingerprint(roots[0]), "roots", len(roots))
	}
	if err := saveTrustState(iss.stateFile, iss.pin, roots); err != nil {
		iss.log.Error("could not save the roots learned from step-ca; a restart will trust the configured root only", "file", iss.stateFile, "error", err)
	}
	return nil
}

// findProvisioner looks the JWK provisioner up by name.
func (iss *Issuer) findProvisioner(ctx context.Context) (*provisioner.JWK, error) {
	var names []string
	cursor := ""
	for page := 0; page < 100; page++ {
		opts := []ca.ProvisionerOption{}
		if cursor != "" {
			opts = append(opts, ca.WithProvisionerCursor(cursor))
		}
		resp, err := iss.client.ProvisionersWithContext(ctx, opts...)
		if err != nil {
			return nil, iss.requestError("list provisioners", err)
		}
		for _, p := range resp.Provisioners {
			if p.GetName() != iss.provisioner {
				names = append(names, fmt.Sprintf("%s (%s)", p.GetName(), p.GetType()))
				continue
			}
			jwk, ok := p.(*provisioner.JWK)
			if !ok {
				return nil, permanent(fmt.Errorf("step-ca provisioner %q is of type %s; sds-server needs a JWK provisioner", iss.provisioner, p.GetType()))
			}
			return jwk, nil
		}
		if cursor = resp.NextCursor; cursor == "" {
			break
		}
	}
	return nil, permanent(fmt.Errorf("step-ca at %s has no provisioner named %q (it has: %s)", iss.url, iss.provisioner, strings.Join(names, ", ")))
}

// checkProvisionerKey checks that the key file holds the provisioner's key.
func checkProvisionerKey(prov *provisioner.JWK, jwk *jose.JSONWebKey, keyFile string) error {
	if prov.Key == nil {
		return fmt.Errorf("step-ca provisioner %q publishes no key", prov.Name)
	}
	pub := jwk.Public()
	want, err1 := prov.Key.Thumbprint(crypto.SHA256)
	got, err2 := pub.Thumbprint(crypto.SHA256)
	if err1 != nil || err2 != nil || string(want) != string(got) {
		return fmt.Errorf("step-ca provisioner key file %s holds key %q, but provisioner %q uses key %q", keyFile, jwk.KeyID, prov.Name, prov.Key.KeyID)
	}
	jwk.KeyID = prov.Key.KeyID // the token's kid names the provisioner's key
	return nil
}

func provisionerBounds(p *provisioner.JWK) Bounds {
	b := Bounds{Min: stepDefaultMinTLS, Max: stepDefaultMaxTLS}
	if c := p.Claims; c != nil {
		if c.MinTLSDur != nil && c.MinTLSDur.Duration > 0 {
			b.Min, b.MinFromProvisioner = c.MinTLSDur.Duration, true
		}
		if c.MaxTLSDur != nil && c.MaxTLSDur.Duration > 0 {
			b.Max, b.MaxFromProvisioner = c.MaxTLSDur.Duration, true
		}
	}
	return b
}

// checkTTL checks a workload lifetime against the provisioner's bounds:
// step-ca sees ttl plus the backdate. Only bounds the provisioner sets are
// enforced here; step-ca's defaults may have been changed in ca.json, so
// those are left to the probe.
func (iss *Issuer) checkTTL(ttl time.Duration) error {
	if err := issuer.ValidateTTL(ttl, iss.allowShortTTL); err != nil {
		return err
	}
	d := ttl + issuer.Backdate
	b := iss.bounds
	if (b.MinFromProvisioner && d < b.Min) || (b.MaxFromProvisioner && d > b.Max) {
		return fmt.Errorf("certificate lifetime %s is outside the bounds of step-ca provisioner %q: sds-server requests %s (lifetime + %s backdate), the provisioner allows %s; change cert_ttl or the provisioner's claims",
			ttl, iss.provisioner, d, issuer.Backdate, b)
	}
	return nil
}

// Bounds returns the lifetime bounds of the provisioner.
func (iss *Issuer) Bounds() Bounds { return iss.bounds }

// Root returns the root new bootstrap tokens pin: the one that signed
// step-ca's current intermediate (after the first signature), which the
// SDS listener's certificate chains to.
func (iss *Issuer) Root() *x509.Certificate { return iss.trust.Load().roots[0] }

// Roots returns step-ca's roots, read over TLS verified against the roots
// trusted so far, Root first. It implements issuer.Issuer. What step-ca
// serves becomes the trust set: a root added to step-ca is trusted from
// now on, a root removed is no longer (see trustSet).
func (iss *Issuer) Roots(ctx context.Context) ([]*x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, iss.timeout)
	defer cancel()
	served, err := rootsOf(ctx, iss, iss.client)
	if err != nil {
		return nil, err
	}
	if err := iss.follow(served); err != nil {
		return nil, err
	}
	return slices.Clone(iss.trust.Load().roots), nil
}

// requestError describes a failed request to step-ca. Transport failures
// and 5xx answers are transient (retried by Open); other answers are not.
func (iss *Issuer) requestError(what string, err error) error {
	var apiErr *errs.Error
	if errors.As(err, &apiErr) {
		e := fmt.Errorf("step-ca at %s: %s: HTTP %d: %s", iss.url, what, apiErr.StatusCode(), apiErr.Message())
		if apiErr.StatusCode() >= 500 {
			return e
		}
		return permanent(e)
	}
	var uerr *url.Error
	var certErr *tls.CertificateVerificationError
	if errors.As(err, &certErr) {
		return permanent(fmt.Errorf("step-ca at %s: TLS certificate not trusted by the pinned root: %v", iss.url, certErr.Err))
	}
	if errors.As(err, &uerr) {
		err = uerr.Err
	}
	return &transientError{url: iss.url.String(), what: what, err: unwrapClientError(err)}
}

// transientError is a request to step-ca that failed on the way (refused,
// reset, timed out): step-ca may be down or slow.
type transientError struct {
	url, what string
	err       error
}

func (e *transientError) Error() string {
	return fmt.Sprintf("step-ca at %s: %s: %v", e.url, e.what, e.err)
}

func (e *transientError) Unwrap() error { return e.err }

// unwrapClientError drops the "client GET https://... failed:" prefix
// step's client adds, since the caller names the URL already.
func unwrapClientError(err error) error {
	if u := errors.Unwrap(err); u != nil && strings.HasPrefix(err.Error(), "client ") {
		return u
	}
	return err
}

// permanentError marks an error retrying cannot fix.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

func permanent(err error) error { return permanentError{err} }

// retry runs f up to attempts times with doubling backoff while it fails
// with a transient error, and says how long it tried. Each failure it
// retries is logged to log (if not nil).
func retry(ctx context.Context, log *slog.Logger, attempts int, backoff time.Duration, f func() error) error {
	start := time.Now()
	var err error
	for i := 1; ; i++ {
		if err = f(); err == nil {
			return nil
		}
		var p permanentError
		if errors.As(err, &p) {
			return p.error
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w (gave up: %v)", err, ctx.Err())
		}
		if i >= attempts {
			took := time.Since(start).Round(10 * time.Millisecond)
			var te *transientError
			if errors.As(err, &te) {
				return fmt.Errorf("step-ca at %s is unreachable (gave up after %d attempts in %s): %s: %w", te.url, attempts, took, te.what, te.err)
			}
			return fmt.Errorf("%w (gave up after %d attempts in %s)", err, attempts, took)
		}
		if log != nil {
			log.Warn("step-ca not reachable yet; retrying", "attempt", i, "attempts", attempts, "retry_in", backoff, "error", err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (gave up: %v)", err, ctx.Err())
		case <-t.C:
		}
		backoff = min(2*backoff, maxConnectBackoff)
	}
}

// Intermediate returns the intermediate that signed the last workload
// certificate, nil before the first: what the expiry metric reports.
func (iss *Issuer) Intermediate() *x509.Certificate { return iss.inter.Load() }
