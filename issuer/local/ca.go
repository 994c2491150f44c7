// Package local is the built-in certificate authority of sds-server: a root
// and an intermediate kept as PEM files in one directory, created on first
// start. The intermediate signs workload certificates and the SDS server's
// own TLS certificate; the root is the mesh trust bundle.
package local

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// Names of the CA files inside the CA directory.
const (
	RootCertFile         = "root.crt"
	RootKeyFile          = "root.key"
	IntermediateCertFile = "intermediate.crt"
	IntermediateKeyFile  = "intermediate.key"
)

// rootYears is the lifetime of a root created by Open.
const rootYears = 10

// Defaults of the intermediate's lifecycle (Options).
const (
	// DefaultIntermediateTTL is the lifetime of a new intermediate: a year.
	DefaultIntermediateTTL = 8760 * time.Hour
	// DefaultIntermediateRenewBefore is the part of an intermediate's life
	// still left when its successor is made: a third.
	DefaultIntermediateRenewBefore = 1.0 / 3
	// MinIntermediateTTL is the shortest intermediate lifetime accepted
	// without AllowShortTTL.
	MinIntermediateTTL = 24 * time.Hour
	// minShortIntermediateTTL is the shortest accepted even with
	// AllowShortTTL (tests, demos).
	minShortIntermediateTTL = 30 * time.Second
)

// Options configures the built-in CA.
type Options struct {
	// TrustDomain is the SPIFFE trust domain the CA certifies, e.g.
	// "mesh.local". It names the CA certificates' organization, and Issue
	// refuses identities of any other trust domain.
	TrustDomain string
	// Now is the clock; nil means time.Now. Tests pin it.
	Now func() time.Time
	// AllowShortTTL accepts lifetimes shorter than issuer.MinTTL, and
	// intermediate lifetimes shorter than MinIntermediateTTL (tests, demos).
	AllowShortTTL bool
	// IntermediateTTL is the lifetime of each new intermediate (cut short
	// at the root's expiry); zero means DefaultIntermediateTTL.
	IntermediateTTL time.Duration
	// IntermediateRenewBefore is the fraction of an intermediate's lifetime
	// still left when its successor is made, in (0, 1); zero means
	// DefaultIntermediateRenewBefore.
	IntermediateRenewBefore float64
	// Logger receives the lifecycle log lines; nil discards them.
	Logger *slog.Logger
	// Observe, if set, is called after every lifecycle change is on disk
	// and in force (and after every failed renewal), from the goroutine
	// that made it. The SDS server uses it to publish the revocation lists
	// at once, move its own certificate and count renewals.
	Observe func(Event)
}

// ValidateLifecycle checks the intermediate lifetime and renewal point,
// with an error naming the configuration key at fault.
func ValidateLifecycle(ttl time.Duration, renewBefore float64, allowShort bool) error {
	switch {
	case ttl < minShortIntermediateTTL:
		return fmt.Errorf("ca.intermediate_ttl %s: want at least %s", ttl, minShortIntermediateTTL)
	case ttl < MinIntermediateTTL && !allowShort:
		return fmt.Errorf("ca.intermediate_ttl %s is shorter than %s; set allow_short_ttl: true to allow it (tests and demos only)", ttl, MinIntermediateTTL)
	case !(renewBefore > 0 && renewBefore < 1):
		return fmt.Errorf("ca.intermediate_renew_before %g: want a fraction of the intermediate's lifetime between 0 and 1 (default 0.333: renew when a third of it is left)", renewBefore)
	}
	return nil
}

// CA is the built-in certificate authority. What it signs with is an
// immutable snapshot (signerState) behind an atomic pointer, replaced whole
// when the intermediate renews, so every method is safe for concurrent use
// and signing never waits for a lock.
type CA struct {
	trustDomain   string
	now           func() time.Time
	allowShortTTL bool
	interTTL      time.Duration
	renewBefore   float64
	log           *slog.Logger
	observe       func(Event)
	disk          diskWriter

	state atomic.Pointer[signerState]
	// published records when a revocation list signed by the staged
	// intermediate was first signed (SignCRL): the staged one signs
	// certificates only some time after that.
	published atomic.Pointer[publication]
	// kick wakes Run when something it waits for happened.
	kick chan struct{}
	// renewMu serialises lifecycle changes (never held while signing).
	renewMu sync.Mutex
}

var _ issuer.Issuer = (*CA)(nil)

// Open loads the CA kept in dir, or creates one there if dir holds none of
// its files. A CA that is only partly present, unreadable or inconsistent is
// an error naming the file at fault: Open never replaces an existing CA,
// since that would silently invalidate every certificate of the mesh.
//
// An expired intermediate is renewed at once (under the same root); Open
// fails, saying why, only if that is impossible.
func Open(ctx context.Context, dir string, opts Options) (*CA, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := issuer.ValidateTrustDomain(opts.TrustDomain); err != nil {
		return nil, fmt.Errorf("open CA: %w", err)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.IntermediateTTL == 0 {
		opts.IntermediateTTL = DefaultIntermediateTTL
	}
	if opts.IntermediateRenewBefore == 0 {
		opts.IntermediateRenewBefore = DefaultIntermediateRenewBefore
	}
	if err := ValidateLifecycle(opts.IntermediateTTL, opts.IntermediateRenewBefore, opts.AllowShortTTL); err != nil {
		return nil, fmt.Errorf("open CA: %w", err)
	}
	ca := newCA(opts, dir)
	st, err := ca.openState(dir)
	if err != nil {
		return nil, err
	}
	ca.state.Store(st)
	if err := ca.renewExpired(ctx); err != nil {
		return nil, err
	}
	return ca, nil
}

// openState loads the CA's state from dir: the state file if there is one,
// else the first layout's four files, else a new CA.
func (ca *CA) openState(dir string) (*signerState, error) {
	sf, ok, err := readState(dir)
	if err != nil {
		return nil, err
	}
	if ok {
		return loadState(dir, sf)
	}
	var present, missing []string
	for _, name := range []string{RootCertFile, RootKeyFile, IntermediateCertFile, IntermediateKeyFile} {
		p := filepath.Join(dir, name)
		switch _, err := os.Stat(p); {
		case err == nil:
			present = append(present, p)
		case errors.Is(err, fs.ErrNotExist):
			missing = append(missing, p)
		default:
			return nil, fmt.Errorf("load CA: %w", err)
		}
	}
	switch {
	case len(present) == 0:
		return ca.create(dir)
	case len(missing) > 0:
		return nil, fmt.Errorf("load CA: %s: missing, but %s exist: restore the missing files from a backup, or move %s away to create a new CA (every issued certificate will then be untrusted)",
			strings.Join(missing, ", "), strings.Join(present, ", "), dir)
	}
	return loadState(dir, legacyState())
}

// Root returns the root certificate over the intermediate that signs
// workload certificates now. Callers must not modify it.
func (ca *CA) Root() *x509.Certificate { return ca.state.Load().active.root.cert }

// Intermediate returns the certificate that signs workload certificates
// now. Callers must not modify it.
func (ca *CA) Intermediate() *x509.Certificate { return ca.state.Load().active.cert }

// IntermediateNotAfter returns when the intermediate that signs now
// expires. Issued certificates never outlive it; it is renewed well before.
func (ca *CA) IntermediateNotAfter() time.Time { return ca.state.Load().active.cert.NotAfter }

// Roots returns the trust bundle: the root alone, or both roots during a
// rotation's first two phases (the new one first: new bootstrap tokens pin
// it). It implements issuer.Issuer and never blocks.
func (ca *CA) Roots(context.Context) ([]*x509.Certificate, error) {
	return ca.state.Load().rootCerts(), nil
}

func newCA(opts Options, dir string) *CA {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &CA{
		trustDomain:   opts.TrustDomain,
		now:           opts.Now,
		allowShortTTL: opts.AllowShortTTL,
		interTTL:      opts.IntermediateTTL,
		renewBefore:   opts.IntermediateRenewBefore,
		log:           log,
		observe:       opts.Observe,
		disk:          diskWriter{dir: dir},
		kick:          make(chan struct{}, 1),
	}
}

// create makes a new root and intermediate and stores them in dir, in the
// first layout (no state file until the first renewal).
func (ca *CA) create(dir string) (*signerState, error) {
	now := ca.now().Truncate(time.Second)
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("create CA: generate root key: %w", err)
	}
	rootTmpl := caTemplate("sds-server root CA", ca.trustDomain, now, now.AddDate(rootYears, 0, 0))
	rootTmpl.MaxPathLen = 1
	root, err := sign(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: root certificate: %w", err)
	}
	rootKeyDER, err := x509.MarshalPKCS8PrivateKey(rootKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: encode root key: %w", err)
	}
	r := &rootCA{name: legacyRootName, cert: root, certFile: RootCertFile, keyFile: RootKeyFile, status: rootStatusActive}
	inter, files, err := ca.newIntermediate(1, r, rootKey, now)
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	files = append([]file{
		{RootKeyFile, "PRIVATE KEY", rootKeyDER, 0o600},
		{RootCertFile, "CERTIFICATE", root.Raw, 0o644},
	}, files...)
	if err := writeFiles(dir, files); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	return &signerState{roots: []*rootCA{r}, active: inter}, nil
}

// newIntermediate makes intermediate generation gen under root r (signed
// with rootKey), valid from now for the configured lifetime, cut short at
// the root's expiry, and returns it with its files (key first) to write.
func (ca *CA) newIntermediate(gen int, r *rootCA, rootKey crypto.Signer, now time.Time) (*intermediate, []file, error) {
	if !now.Before(r.cert.NotAfter) {
		return nil, nil, fmt.Errorf("the root CA %s expired at %s: a new root is needed", r.certFile, r.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate intermediate key: %w", err)
	}
	notAfter := now.Add(ca.interTTL)
	if notAfter.After(r.cert.NotAfter) {
		notAfter = r.cert.NotAfter
	}
	// Each generation has its own subject name: a sidecar looks up the
	// revocation list of a certificate's issuer by name, and must find
	// the list of the generation that signed it.
	cn := "sds-server intermediate CA"
	if gen > 1 {
		cn += " " + strconv.Itoa(gen)
	}
	tmpl := caTemplate(cn, ca.trustDomain, now, notAfter)
	tmpl.MaxPathLen, tmpl.MaxPathLenZero = 0, true
	cert, err := sign(tmpl, r.cert, key.Public(), rootKey)
	if err != nil {
		return nil, nil, fmt.Errorf("intermediate certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode intermediate key: %w", err)
	}
	certFile, keyFile := intermediateFiles(gen)
	in := newIntermediateState(gen, r, cert, key, certFile, keyFile)
	return in, []file{
		{keyFile, "PRIVATE KEY", keyDER, 0o600},
		{certFile, "CERTIFICATE", cert.Raw, 0o644},
	}, nil
}

func caTemplate(cn, trustDomain string, now, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn, Organization: []string{trustDomain}},
		NotBefore:             now.Add(-issuer.Backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

// sign fills in a random serial number, signs tmpl with parent's key and
// returns the parsed certificate.
func sign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

var serialLimit = new(big.Int).Lsh(big.NewInt(1), 128)

// randomSerial returns a random positive serial number of at most 128 bits.
func randomSerial() (*big.Int, error) {
	for {
		n, err := rand.Int(rand.Reader, serialLimit)
		if err != nil {
			return nil, fmt.Errorf("generate serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

// file is one PEM file to write.
type file struct {
	name, pemType string
	der           []byte
	perm          fs.FileMode
}

// writeFiles stores files in dir, creating it with mode 0700. Every file is written completely to a temporary file first and all
// are renamed into place only then, so a crash leaves either whole files
// or, in a short window, a partial set that Open reports instead of using.
func writeFiles(dir string, files []file) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o700); err != nil { // it may have existed, empty
		return err
	}
	return writeFilesHook(dir, files, func(string) error { return nil })
}

// writeFilesHook is writeFiles in an existing dir, calling step after each
// write, rename and sync; an error from step stops there (tests simulate
// a crash with it).
func writeFilesHook(dir string, files []file, step func(string) error) error {
	tmps := make([]string, 0, len(files))
	defer func() {
		for _, tmp := range tmps {
			os.Remove(tmp) // best effort; fails harmlessly once renamed
		}
	}()
	for _, f := range files {
		data := pem.EncodeToMemory(&pem.Block{Type: f.pemType, Bytes: f.der})
		tmp, err := writeTemp(dir, f.name, data, f.perm)
		if err != nil {
			return err
		}
		tmps = append(tmps, tmp)
		if err := step("write " + f.name); err != nil {
			return err
		}
	}
	for i, f := range files {
		if err := os.Rename(tmps[i], filepath.Join(dir, f.name)); err != nil {
			return err
		}
		if err := step("rename " + f.name); err != nil {
			return err
		}
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	return step("sync dir")
}

// writeTemp writes data to a new temporary file in dir with mode perm,
// flushed to disk, and returns its path.
func writeTemp(dir, name string, data []byte, perm fs.FileMode) (string, error) {
	f, err := os.CreateTemp(dir, "."+name+".*.tmp") // created with mode 0600
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("write %s: %w", filepath.Join(dir, name), err)
	}
	return f.Name(), nil
}

// syncDir makes the renames in dir durable.
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// checkCA reports whether c may sign certificates.
func checkCA(c *x509.Certificate) error {
	if !c.BasicConstraintsValid || !c.IsCA {
		return errors.New("not a CA certificate (basic constraints CA:TRUE missing)")
	}
	if c.KeyUsage != 0 && c.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("CA certificate lacks the certSign key usage")
	}
	return nil
}

// readPEM reads the single PEM block of type typ in path.
func readPEM(path, typ string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	block, rest := pem.Decode(data)
	switch {
	case block == nil:
		return nil, fmt.Errorf("load CA: %s: no PEM block found", path)
	case block.Type != typ:
		hint := ""
		if typ == "PRIVATE KEY" {
			hint = " (keys must be unencrypted PKCS#8; convert with: openssl pkcs8 -topk8 -nocrypt)"
		}
		return nil, fmt.Errorf("load CA: %s: PEM block is %q, want %q%s", path, block.Type, typ, hint)
	case len(bytes.TrimSpace(rest)) > 0:
		return nil, fmt.Errorf("load CA: %s: unexpected data after the %s PEM block", path, typ)
	}
	return block.Bytes, nil
}

func readCert(path string) (*x509.Certificate, error) {
	der, err := readPEM(path, "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: not a valid certificate: %w", path, err)
	}
	return c, nil
}

// readKey reads the PKCS#8 private key in path, refusing a file readable by
// others (as ssh does), and checks that it belongs to cert.
func readKey(path string, cert *x509.Certificate) (crypto.Signer, error) {
	if runtime.GOOS != "windows" {
		fi, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("load CA: %w", err)
		}
		if perm := fi.Mode().Perm(); perm&^0o600 != 0 {
			return nil, fmt.Errorf("load CA: %s: permissions %04o are too open for a private key; run: chmod 600 %s", path, perm, path)
		}
	}
	der, err := readPEM(path, "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: not a valid PKCS#8 private key: %w", path, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("load CA: %s: unsupported private key type %T", path, k)
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("load CA: %s: private key does not match the certificate %s", path, strings.TrimSuffix(path, ".key")+".crt")
	}
	return signer, nil
}
