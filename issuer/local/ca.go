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
	"math/big"
	"os"
	"path/filepath"
	"runtime"
	"strings"
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

// Lifetimes of the CA certificates created by Open.
const (
	rootYears         = 10
	intermediateYears = 1
)

// Options configures the built-in CA.
type Options struct {
	// TrustDomain is the SPIFFE trust domain the CA certifies, e.g.
	// "mesh.local". It names the CA certificates' organization, and Issue
	// refuses identities of any other trust domain.
	TrustDomain string
	// Now is the clock; nil means time.Now. Tests pin it.
	Now func() time.Time
	// AllowShortTTL accepts lifetimes shorter than issuer.MinTTL (tests, demos).
	AllowShortTTL bool
}

// CA is the built-in certificate authority. Its key material is immutable
// after Open, so every method is safe for concurrent use without locking.
type CA struct {
	trustDomain   string
	now           func() time.Time
	allowShortTTL bool

	root     *x509.Certificate
	inter    *x509.Certificate
	interKey crypto.Signer
	interPEM []byte // PEM of inter, appended to every issued chain
}

var _ issuer.Issuer = (*CA)(nil)

// Open loads the CA kept in dir, or creates one there if dir holds none of
// its files. A CA that is only partly present, unreadable or inconsistent is
// an error naming the file at fault: Open never replaces an existing CA,
// since that would silently invalidate every certificate of the mesh.
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
		return create(dir, opts)
	case len(missing) > 0:
		return nil, fmt.Errorf("load CA: %s: missing, but %s exist: restore the missing files from a backup, or move %s away to create a new CA (every issued certificate will then be untrusted)",
			strings.Join(missing, ", "), strings.Join(present, ", "), dir)
	}
	return load(dir, opts)
}

// Root returns the root certificate: the mesh trust anchor. Callers must not
// modify it.
func (ca *CA) Root() *x509.Certificate { return ca.root }

// Intermediate returns the certificate that signs workload certificates.
// Callers must not modify it.
func (ca *CA) Intermediate() *x509.Certificate { return ca.inter }

// IntermediateNotAfter returns when the intermediate expires. Issued
// certificates never outlive it, so an operator (or, later, rotation) must
// replace it well before then.
func (ca *CA) IntermediateNotAfter() time.Time { return ca.inter.NotAfter }

// Roots returns the trust bundle, the root alone. It implements
// issuer.Issuer and never blocks.
func (ca *CA) Roots(context.Context) ([]*x509.Certificate, error) {
	return []*x509.Certificate{ca.root}, nil
}

func newCA(opts Options, root, inter *x509.Certificate, interKey crypto.Signer) *CA {
	return &CA{
		trustDomain:   opts.TrustDomain,
		now:           opts.Now,
		allowShortTTL: opts.AllowShortTTL,
		root:          root,
		inter:         inter,
		interKey:      interKey,
		interPEM:      pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: inter.Raw}),
	}
}

// create makes a new root and intermediate and stores them in dir.
func create(dir string, opts Options) (*CA, error) {
	now := opts.Now().Truncate(time.Second)
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("create CA: generate root key: %w", err)
	}
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("create CA: generate intermediate key: %w", err)
	}
	rootTmpl := caTemplate("sds-server root CA", opts.TrustDomain, now, now.AddDate(rootYears, 0, 0))
	rootTmpl.MaxPathLen = 1
	root, err := sign(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: root certificate: %w", err)
	}
	interTmpl := caTemplate("sds-server intermediate CA", opts.TrustDomain, now, now.AddDate(intermediateYears, 0, 0))
	interTmpl.MaxPathLen, interTmpl.MaxPathLenZero = 0, true
	inter, err := sign(interTmpl, root, interKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: intermediate certificate: %w", err)
	}

	rootKeyDER, err := x509.MarshalPKCS8PrivateKey(rootKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: encode root key: %w", err)
	}
	interKeyDER, err := x509.MarshalPKCS8PrivateKey(interKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: encode intermediate key: %w", err)
	}
	files := []file{
		{RootKeyFile, "PRIVATE KEY", rootKeyDER, 0o600},
		{RootCertFile, "CERTIFICATE", root.Raw, 0o644},
		{IntermediateKeyFile, "PRIVATE KEY", interKeyDER, 0o600},
		{IntermediateCertFile, "CERTIFICATE", inter.Raw, 0o644},
	}
	if err := writeFiles(dir, files); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	return newCA(opts, root, inter, interKey), nil
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
	}
	for i, f := range files {
		if err := os.Rename(tmps[i], filepath.Join(dir, f.name)); err != nil {
			return err
		}
	}
	return syncDir(dir)
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

// load reads and cross-checks the four CA files in dir.
func load(dir string, opts Options) (*CA, error) {
	rootPath, interPath := filepath.Join(dir, RootCertFile), filepath.Join(dir, IntermediateCertFile)
	root, err := readCert(rootPath)
	if err != nil {
		return nil, err
	}
	// The root key is only checked: the intermediate signs everything.
	if _, err := readKey(filepath.Join(dir, RootKeyFile), root); err != nil {
		return nil, err
	}
	inter, err := readCert(interPath)
	if err != nil {
		return nil, err
	}
	interKey, err := readKey(filepath.Join(dir, IntermediateKeyFile), inter)
	if err != nil {
		return nil, err
	}
	if err := checkCA(root); err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", rootPath, err)
	}
	if err := checkCA(inter); err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", interPath, err)
	}
	if err := inter.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("load CA: %s: not signed by the root %s: %w", interPath, rootPath, err)
	}
	return newCA(opts, root, inter, interKey), nil
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
