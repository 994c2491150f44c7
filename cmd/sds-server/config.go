package main

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/sds"
)

// config is the server configuration. Keys (file key / SDS_* env / flag) are
// part of the interface scripts depend on: see DESIGN.md "Operating it".
type config struct {
	DataDir       string        `mapstructure:"data_dir"`
	ListenAddr    string        `mapstructure:"listen_addr"`
	MetricsAddr   string        `mapstructure:"metrics_addr"`
	AdminSocket   string        `mapstructure:"admin_socket"`
	TrustDomain   string        `mapstructure:"trust_domain"`
	CertTTL       time.Duration `mapstructure:"cert_ttl"`
	AllowShortTTL bool          `mapstructure:"allow_short_ttl"`
	RenewWindow   string        `mapstructure:"renew_window"`
	CRLPeriod     time.Duration `mapstructure:"crl_period"`
	DefaultPolicy string        `mapstructure:"default_policy"`
	PolicyDir     string        `mapstructure:"policy_dir"`
	// ServerNames are the DNS names and IPs in the SDS listener's certificate.
	ServerNames []string `mapstructure:"server_names"`
	LogLevel    string   `mapstructure:"log_level"`
	// CA chooses and configures the certificate authority backend.
	CA caConfig `mapstructure:"ca"`
	// Limits bound what clients can make the server hold (limits.go).
	Limits limitsConfig `mapstructure:"limits"`
}

// caConfig is the ca.* keys (env SDS_CA_*): the built-in CA (local, the
// default) or a step-ca that signs every certificate (stepca).
type caConfig struct {
	Backend         string `mapstructure:"backend"`
	URL             string `mapstructure:"url"`
	RootFingerprint string `mapstructure:"root_fingerprint"`
	RootFile        string `mapstructure:"root_file"`
	Provisioner     string `mapstructure:"provisioner"`
	KeyFile         string `mapstructure:"key_file"`
	PasswordFile    string `mapstructure:"password_file"`
	// IntermediateTTL and IntermediateRenewBefore drive the built-in CA's
	// intermediate renewal (lifetime of each new one; fraction of its life
	// left when its successor is made).
	IntermediateTTL         time.Duration `mapstructure:"intermediate_ttl"`
	IntermediateRenewBefore float64       `mapstructure:"intermediate_renew_before"`
	// RootsRefresh is how often the trust bundle is re-read from the CA
	// (step-ca's /roots): how soon a root added or removed reaches ROOTCA.
	RootsRefresh time.Duration `mapstructure:"roots_refresh"`
}

// CA backends.
const (
	backendLocal  = "local"
	backendStepCA = "stepca"
)

// defaults are the embedded defaults: `sds-server serve` with no config at
// all runs on them.
var defaults = map[string]any{
	"data_dir":        "./data",
	"listen_addr":     "127.0.0.1:8443",
	"metrics_addr":    "127.0.0.1:9102",
	"admin_socket":    "", // <data_dir>/admin.sock
	"trust_domain":    "mesh.local",
	"cert_ttl":        issuer.DefaultTTL,
	"allow_short_ttl": false,
	"renew_window":    "0.5-0.8",
	"crl_period":      sds.DefaultCRLPeriod,
	"default_policy":  "deny",
	"policy_dir":      "", // <data_dir>/policies
	"server_names":    []string{"localhost", "127.0.0.1", "::1"},
	"log_level":       "info",
	// Nested keys need defaults too, or SDS_CA_* would go unseen.
	"ca.backend":                   backendLocal,
	"ca.url":                       "",
	"ca.root_fingerprint":          "",
	"ca.root_file":                 "",
	"ca.provisioner":               "",
	"ca.key_file":                  "",
	"ca.password_file":             "",
	"ca.intermediate_ttl":          local.DefaultIntermediateTTL,
	"ca.intermediate_renew_before": local.DefaultIntermediateRenewBefore,
	"ca.roots_refresh":             time.Minute,
}

// flagKeys maps flag names to config keys, for binding.
var flagKeys = map[string]string{
	"data-dir":        "data_dir",
	"listen-addr":     "listen_addr",
	"metrics-addr":    "metrics_addr",
	"admin-socket":    "admin_socket",
	"trust-domain":    "trust_domain",
	"cert-ttl":        "cert_ttl",
	"allow-short-ttl": "allow_short_ttl",
	"renew-window":    "renew_window",
	"crl-period":      "crl_period",
	"default-policy":  "default_policy",
	"policy-dir":      "policy_dir",
	"server-names":    "server_names",
	"log-level":       "log_level",
}

func addGlobalFlags(root *cobra.Command) {
	f := root.PersistentFlags()
	f.String("config", "", "config file (YAML, JSON or TOML); keys as in the README")
	f.String("data-dir", "./data", "directory holding the CA, the state file and the admin socket (SDS_DATA_DIR)")
	f.String("admin-socket", "", "admin API Unix socket (SDS_ADMIN_SOCKET; default <data-dir>/admin.sock)")
	f.String("trust-domain", "mesh.local", "SPIFFE trust domain (SDS_TRUST_DOMAIN)")
	f.String("log-level", "info", "log level: debug, info, warn, error (SDS_LOG_LEVEL)")
}

// loadConfig layers the configuration: flags over SDS_* environment over the
// config file over the embedded defaults (viper's own precedence).
func loadConfig(cmd *cobra.Command) (*config, error) {
	v := viper.New()
	for k, d := range defaults {
		v.SetDefault(k, d)
	}
	for k, d := range limitDefaults() {
		v.SetDefault(k, d)
	}
	v.SetEnvPrefix("SDS")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	var bindErr error
	bind := func(fs *pflag.FlagSet) {
		fs.VisitAll(func(fl *pflag.Flag) {
			if key, ok := flagKeys[fl.Name]; ok {
				bindErr = errors.Join(bindErr, v.BindPFlag(key, fl))
			}
		})
	}
	bind(cmd.Flags())
	bind(cmd.InheritedFlags())
	if bindErr != nil {
		return nil, bindErr
	}
	if err := checkEmptyEnv(v, cmd.Flags(), cmd.InheritedFlags()); err != nil {
		return nil, err
	}
	if path, _ := cmd.Flags().GetString("config"); path != "" {
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("read config file %s: %w", path, err)
		}
		if err := checkKeyCase(path); err != nil {
			return nil, fmt.Errorf("read config file %s: %w", path, err)
		}
	}
	var c config
	if err := v.UnmarshalExact(&c); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if c.AdminSocket == "" {
		c.AdminSocket = filepath.Join(c.DataDir, "admin.sock")
	}
	if c.PolicyDir == "" {
		c.PolicyDir = filepath.Join(c.DataDir, "policies")
	}
	return &c, nil
}

// validate checks what serve needs, with one actionable message per mistake.
func (c *config) validate() error {
	if c.DataDir == "" {
		return errors.New("data_dir is empty")
	}
	if err := issuer.ValidateTrustDomain(c.TrustDomain); err != nil {
		return fmt.Errorf("trust_domain: %w", err)
	}
	if err := issuer.ValidateTTL(c.CertTTL, c.AllowShortTTL); err != nil {
		return fmt.Errorf("cert_ttl: %w", err)
	}
	if c.DefaultPolicy != "deny" && c.DefaultPolicy != "allow" {
		return fmt.Errorf("default_policy %q: use deny (services without a policy file refuse every request) or allow", c.DefaultPolicy)
	}
	if c.CRLPeriod < 10*time.Second {
		return fmt.Errorf("crl_period %s: want at least 10s (the list is re-signed at half of it)", c.CRLPeriod)
	}
	if _, err := sds.ParseRenewWindow(c.RenewWindow); err != nil {
		return err
	}
	if c.ListenAddr == "" {
		return errors.New("listen_addr is empty")
	}
	if err := c.Limits.validate(); err != nil {
		return err
	}
	return c.CA.validate(c.AllowShortTTL)
}

func (c *caConfig) validate(allowShortTTL bool) error {
	if c.RootsRefresh < time.Second {
		return fmt.Errorf("ca.roots_refresh %s: want at least 1s (how often the trust bundle is re-read from the CA)", c.RootsRefresh)
	}
	switch c.Backend {
	case backendLocal:
		return local.ValidateLifecycle(c.IntermediateTTL, c.IntermediateRenewBefore, allowShortTTL)
	case backendStepCA:
	default:
		return fmt.Errorf("ca.backend %q: use %s (the built-in CA) or %s", c.Backend, backendLocal, backendStepCA)
	}
	for _, k := range []struct{ key, val string }{
		{"ca.url", c.URL}, {"ca.provisioner", c.Provisioner}, {"ca.key_file", c.KeyFile},
	} {
		if k.val == "" {
			return fmt.Errorf("%s is required with ca.backend %s", k.key, backendStepCA)
		}
	}
	if c.RootFingerprint == "" && c.RootFile == "" {
		return fmt.Errorf("ca.root_fingerprint or ca.root_file is required with ca.backend %s: sds-server must know step-ca's root", backendStepCA)
	}
	return nil
}
