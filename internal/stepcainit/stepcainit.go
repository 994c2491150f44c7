// Package stepcainit creates a working step-ca directory for sds-server: a
// root and an intermediate, the JWK provisioner sds-server signs its
// one-time tokens with (its key encrypted under a password, both in files),
// the x509 template of deploy/step-ca, and ca.json. The files and their
// layout are those of `step ca init` (certs/, secrets/, config/ca.json,
// config/defaults.json, templates/), written with step-ca's own config and
// key types; step-ca's pki package itself is not used because it works on
// the process-wide $STEPPATH and prints to stdout.
//
// It serves `make stepca` (through e2e/stepcainit), the e2e tests and the
// unit tests of issuer/stepca, which run the authority in process.
package stepcainit

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	authconfig "github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/certificates/db"
	"go.step.sm/crypto/jose"
	"go.step.sm/crypto/pemutil"

	stepcatemplate "github.com/meshid/sds-server/deploy/step-ca"
)

// Options says what step-ca to create. Zero values take the defaults.
type Options struct {
	// Dir is the step-ca directory (its $STEPPATH). It must not exist or be
	// empty.
	Dir string
	// Address is where step-ca listens; default 127.0.0.1:9000.
	Address string
	// DNSNames are the names (and IPs) of step-ca's TLS certificate and the
	// audiences it accepts tokens for; default the host of Address and
	// "localhost".
	DNSNames []string
	// Name names the PKI ("<Name> Root CA"); default "sds-server test".
	Name string
	// Provisioner is the JWK provisioner's name; default "sds-server".
	Provisioner string
	// MinTLSCertDuration, MaxTLSCertDuration and DefaultTLSCertDuration
	// are the provisioner's claims; zero leaves the claim out (step-ca's
	// defaults: 5m, 24h, 24h).
	MinTLSCertDuration, MaxTLSCertDuration, DefaultTLSCertDuration time.Duration
	// NoTemplate leaves the template out of the provisioner, which then
	// uses step-ca's default leaf template (tests of the misconfiguration).
	NoTemplate bool
	// NoDB runs step-ca without a database (used one-time tokens are then
	// remembered in memory only, and nothing can be revoked: no CRL). By
	// default a bbolt file in db/ holds them and the revocations, which
	// needs no cgo.
	NoDB bool
	// NoCRL leaves step-ca's CRL off. By default (with a database) ca.json
	// has "crl": {"enabled": true, "generateOnRevoke": true,
	// "cacheDuration": CRLCacheDuration, "idpURL": CRLURL}: step-ca re-signs
	// its list on every revocation and about every 2/3 of the cache
	// duration, and serves it at /1.0/crl.
	NoCRL bool
	// CRLCacheDuration is how long each CRL of step-ca is valid (its
	// NextUpdate - ThisUpdate); default 1h.
	CRLCacheDuration time.Duration
}

// DefaultCRLCacheDuration is the default of Options.CRLCacheDuration.
const DefaultCRLCacheDuration = time.Hour

// CA describes a created step-ca directory: what sds-server's ca.* keys
// and a step-ca process need.
type CA struct {
	Dir          string
	ConfigFile   string // config/ca.json: step-ca --password-file PasswordFile ConfigFile
	PasswordFile string // secrets/password: decrypts the CA keys
	URL          string // https://<first DNS name>:<port>
	Address      string
	RootFile     string // certs/root_ca.crt
	Fingerprint  string // hex SHA-256 of the root certificate (ca.root_fingerprint)
	Provisioner  string // the JWK provisioner's name (ca.provisioner)
	// KeyFile is the provisioner's private key, a JWE encrypted under the
	// password in ProvisionerPasswordFile (ca.key_file, ca.password_file).
	KeyFile                 string
	ProvisionerPasswordFile string
	TemplateFile            string // templates/x509/sds-server.tpl
	// CRLURL is where step-ca serves its CRL (<URL>/1.0/crl), the issuing
	// distribution point it marks the CRL with; empty when the CRL is off.
	CRLURL string
}

// Init creates a step-ca in opts.Dir.
func Init(opts Options) (*CA, error) {
	if opts.Dir == "" {
		return nil, errors.New("stepcainit: no directory")
	}
	if opts.Address == "" {
		opts.Address = "127.0.0.1:9000"
	}
	host, port, err := net.SplitHostPort(opts.Address)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: address %q: %w", opts.Address, err)
	}
	if len(opts.DNSNames) == 0 {
		opts.DNSNames = []string{host, "localhost"}
		if host == "localhost" {
			opts.DNSNames = []string{host}
		}
	}
	if opts.Name == "" {
		opts.Name = "sds-server test"
	}
	if opts.Provisioner == "" {
		opts.Provisioner = "sds-server"
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, err
	}
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		return nil, fmt.Errorf("stepcainit: %s is not empty", dir)
	}
	for _, sub := range []string{"certs", "secrets", "config", "templates/x509", "db"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, err
		}
	}
	ca := &CA{
		Dir:                     dir,
		ConfigFile:              filepath.Join(dir, "config", "ca.json"),
		PasswordFile:            filepath.Join(dir, "secrets", "password"),
		URL:                     "https://" + net.JoinHostPort(opts.DNSNames[0], port),
		Address:                 opts.Address,
		RootFile:                filepath.Join(dir, "certs", "root_ca.crt"),
		Provisioner:             opts.Provisioner,
		KeyFile:                 filepath.Join(dir, "secrets", "provisioner_key"),
		ProvisionerPasswordFile: filepath.Join(dir, "secrets", "provisioner_password"),
		TemplateFile:            filepath.Join(dir, "templates", "x509", stepcatemplate.FileName),
	}
	caPass, err := randomPassword()
	if err != nil {
		return nil, err
	}
	provPass, err := randomPassword()
	if err != nil {
		return nil, err
	}

	// Root and intermediate, ECDSA P-256, as `step ca init` makes them.
	now := time.Now().Truncate(time.Second)
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	root, err := newCA(opts.Name+" Root CA", now, now.AddDate(10, 0, 0), 1, rootKey.Public(), nil, rootKey)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: root: %w", err)
	}
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	inter, err := newCA(opts.Name+" Intermediate CA", now, now.AddDate(10, 0, 0), 0, interKey.Public(), root, rootKey)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: intermediate: %w", err)
	}
	sum := sha256.Sum256(root.Raw)
	ca.Fingerprint = hex.EncodeToString(sum[:])

	// The provisioner key: the JWE that step-ca keeps as "encryptedKey" in
	// ca.json is also what sds-server reads from its key file.
	pub, jwe, err := jose.GenerateDefaultKeyPair(provPass)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: provisioner key: %w", err)
	}
	encryptedKey, err := jwe.CompactSerialize()
	if err != nil {
		return nil, fmt.Errorf("stepcainit: provisioner key: %w", err)
	}
	prov := &provisioner.JWK{
		Type:         "JWK",
		Name:         opts.Provisioner,
		Key:          pub,
		EncryptedKey: encryptedKey,
	}
	if !opts.NoTemplate {
		prov.Options = &provisioner.Options{X509: &provisioner.X509Options{TemplateFile: ca.TemplateFile}}
	}
	if c := claims(opts); c != nil {
		prov.Claims = c
	}

	cfg := &authconfig.Config{
		Root:             []string{ca.RootFile},
		IntermediateCert: filepath.Join(dir, "certs", "intermediate_ca.crt"),
		IntermediateKey:  filepath.Join(dir, "secrets", "intermediate_ca_key"),
		Address:          opts.Address,
		DNSNames:         opts.DNSNames,
		Logger:           json.RawMessage(`{"format": "text"}`),
		AuthorityConfig: &authconfig.AuthConfig{
			Provisioners: provisioner.List{prov},
		},
		TLS: &authconfig.DefaultTLSOptions,
	}
	if !opts.NoDB {
		cfg.DB = &db.Config{Type: "bbolt", DataSource: filepath.Join(dir, "db", "bbolt.db")}
		// step-ca keeps revocations and its CRL in the database: no CRL
		// without one (step-ca would refuse to start).
		if !opts.NoCRL {
			if opts.CRLCacheDuration <= 0 {
				opts.CRLCacheDuration = DefaultCRLCacheDuration
			}
			ca.CRLURL = ca.URL + "/1.0/crl"
			cfg.CRL = &authconfig.CRLConfig{
				Enabled:          true,
				GenerateOnRevoke: true,
				CacheDuration:    &provisioner.Duration{Duration: opts.CRLCacheDuration},
				IDPurl:           ca.CRLURL,
			}
		}
	}
	template := stepcatemplate.X509
	caJSON, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		return nil, err
	}
	defaults, err := json.MarshalIndent(map[string]string{
		"ca-url": ca.URL, "ca-config": ca.ConfigFile, "fingerprint": ca.Fingerprint, "root": ca.RootFile,
	}, "", "\t")
	if err != nil {
		return nil, err
	}
	rootKeyPEM, err := encryptKey(rootKey, caPass)
	if err != nil {
		return nil, err
	}
	interKeyPEM, err := encryptKey(interKey, caPass)
	if err != nil {
		return nil, err
	}
	for _, f := range []struct {
		path string
		data []byte
		perm os.FileMode
	}{
		{ca.RootFile, certPEM(root), 0o644},
		{cfg.IntermediateCert, certPEM(inter), 0o644},
		{filepath.Join(dir, "secrets", "root_ca_key"), rootKeyPEM, 0o600},
		{cfg.IntermediateKey, interKeyPEM, 0o600},
		{ca.PasswordFile, append(caPass, '\n'), 0o600},
		{ca.KeyFile, []byte(encryptedKey + "\n"), 0o600},
		{ca.ProvisionerPasswordFile, append(provPass, '\n'), 0o600},
		{ca.TemplateFile, template, 0o644},
		{ca.ConfigFile, append(caJSON, '\n'), 0o644},
		{filepath.Join(dir, "config", "defaults.json"), append(defaults, '\n'), 0o644},
	} {
		if err := os.WriteFile(f.path, f.data, f.perm); err != nil {
			return nil, fmt.Errorf("stepcainit: %w", err)
		}
	}
	return ca, nil
}

func claims(opts Options) *provisioner.Claims {
	if opts.MinTLSCertDuration == 0 && opts.MaxTLSCertDuration == 0 && opts.DefaultTLSCertDuration == 0 {
		return nil
	}
	d := func(v time.Duration) *provisioner.Duration {
		if v == 0 {
			return nil
		}
		return &provisioner.Duration{Duration: v}
	}
	return &provisioner.Claims{
		MinTLSDur:     d(opts.MinTLSCertDuration),
		MaxTLSDur:     d(opts.MaxTLSCertDuration),
		DefaultTLSDur: d(opts.DefaultTLSCertDuration),
	}
}

// newCA signs a CA certificate for pub with key, self-signed when parent is
// nil.
func newCA(cn string, notBefore, notAfter time.Time, maxPathLen int, pub crypto.PublicKey, parent *x509.Certificate, key crypto.Signer) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            maxPathLen,
		MaxPathLenZero:        maxPathLen == 0,
	}
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// encryptKey encodes key as step-ca's pki package does: PEM encrypted
// under pass.
func encryptKey(key crypto.PrivateKey, pass []byte) ([]byte, error) {
	b, err := pemutil.Serialize(key, pemutil.WithPassword(pass))
	if err != nil {
		return nil, fmt.Errorf("stepcainit: encrypt key: %w", err)
	}
	return pem.EncodeToMemory(b), nil
}

func randomPassword() ([]byte, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	return []byte(hex.EncodeToString(b)), nil
}
