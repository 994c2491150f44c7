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
	PolicyDir     string        `mapstructure:"policy_dir"`
	// ServerNames are the DNS names and IPs in the SDS listener's certificate.
	ServerNames []string `mapstructure:"server_names"`
	LogLevel    string   `mapstructure:"log_level"`
}

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
	"policy_dir":      "", // <data_dir>/policies
	"server_names":    []string{"localhost", "127.0.0.1", "::1"},
	"log_level":       "info",
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
	if path, _ := cmd.Flags().GetString("config"); path != "" {
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
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
	if _, err := sds.ParseRenewWindow(c.RenewWindow); err != nil {
		return err
	}
	if c.ListenAddr == "" {
		return errors.New("listen_addr is empty")
	}
	return nil
}
