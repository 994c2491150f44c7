package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

// loadVia parses args with the real command tree (so flags, persistent flags
// and their defaults are exactly what users get), then calls loadConfig on the
// command args select instead of running it.
func loadVia(t *testing.T, args ...string) (*config, error) {
	t.Helper()
	var out, errb syncBuffer
	root := newRootCommand(&out, &errb)
	cmd, _, err := root.Find(args)
	if err != nil {
		t.Fatalf("find %v: %v", args, err)
	}
	var (
		cfg    *config
		cfgErr error
		ran    bool
	)
	cmd.RunE = func(c *cobra.Command, _ []string) error {
		ran = true
		cfg, cfgErr = loadConfig(c)
		return nil
	}
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		t.Fatalf("execute %v: %v", args, err)
	}
	if !ran {
		t.Fatalf("execute %v did not reach %s", args, cmd.CommandPath())
	}
	return cfg, cfgErr
}

func writeFile(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// documented keeps the keys this test covers: the stable keys of DESIGN.md
// "Operating it", plus server_names and log_level. Keys added later do not
// break it.
func documented(c config) config {
	return config{
		DataDir: c.DataDir, ListenAddr: c.ListenAddr, MetricsAddr: c.MetricsAddr, AdminSocket: c.AdminSocket,
		TrustDomain: c.TrustDomain, CertTTL: c.CertTTL, AllowShortTTL: c.AllowShortTTL, PolicyDir: c.PolicyDir,
		ServerNames: c.ServerNames, LogLevel: c.LogLevel,
	}
}

func TestLoadConfigLayering(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, filepath.Join(dir, "sds.yaml"), `
data_dir: /file/data
listen_addr: 127.0.0.1:9000
metrics_addr: 127.0.0.1:9001
trust_domain: file.example
cert_ttl: 30m
allow_short_ttl: true
log_level: debug
`)
	// Sets the remaining keys of the file, so env and flags are checked
	// against a file value for every one of them.
	fileAll := writeFile(t, filepath.Join(dir, "all.yaml"), `
data_dir: /file/data
admin_socket: /file/admin.sock
policy_dir: /file/policies
server_names: [file.example]
`)
	env := map[string]string{
		"SDS_DATA_DIR":        "/env/data",
		"SDS_LISTEN_ADDR":     "127.0.0.1:7000",
		"SDS_METRICS_ADDR":    "127.0.0.1:7001",
		"SDS_TRUST_DOMAIN":    "env.example",
		"SDS_CERT_TTL":        "2h",
		"SDS_ALLOW_SHORT_TTL": "false",
		"SDS_LOG_LEVEL":       "warn",
	}
	defaults := config{
		DataDir:     "./data",
		ListenAddr:  "127.0.0.1:8443",
		MetricsAddr: "127.0.0.1:9102",
		AdminSocket: filepath.Join("./data", "admin.sock"),
		TrustDomain: "mesh.local",
		CertTTL:     time.Hour,
		PolicyDir:   filepath.Join("./data", "policies"),
		ServerNames: []string{"localhost", "127.0.0.1", "::1"},
		LogLevel:    "info",
	}
	with := func(f func(*config)) config { c := defaults; f(&c); return c }

	tests := []struct {
		name string
		args []string
		env  map[string]string
		want config
	}{
		{
			name: "embedded defaults",
			args: []string{"serve"},
			want: defaults,
		},
		{
			name: "defaults for a client command",
			args: []string{"token", "list"},
			want: defaults,
		},
		{
			name: "file over defaults",
			args: []string{"serve", "--config", file},
			want: with(func(c *config) {
				c.DataDir, c.AdminSocket, c.PolicyDir = "/file/data", "/file/data/admin.sock", "/file/data/policies"
				c.ListenAddr, c.MetricsAddr = "127.0.0.1:9000", "127.0.0.1:9001"
				c.TrustDomain, c.CertTTL, c.AllowShortTTL, c.LogLevel = "file.example", 30*time.Minute, true, "debug"
			}),
		},
		{
			name: "file sets derived paths and lists",
			args: []string{"serve", "--config", fileAll},
			want: with(func(c *config) {
				c.DataDir, c.AdminSocket, c.PolicyDir = "/file/data", "/file/admin.sock", "/file/policies"
				c.ServerNames = []string{"file.example"}
			}),
		},
		{
			name: "env over file",
			args: []string{"serve", "--config", file},
			env:  env,
			want: with(func(c *config) {
				c.DataDir, c.AdminSocket, c.PolicyDir = "/env/data", "/env/data/admin.sock", "/env/data/policies"
				c.ListenAddr, c.MetricsAddr = "127.0.0.1:7000", "127.0.0.1:7001"
				c.TrustDomain, c.CertTTL, c.AllowShortTTL, c.LogLevel = "env.example", 2*time.Hour, false, "warn"
			}),
		},
		{
			name: "env over defaults, every key",
			args: []string{"serve"},
			env: map[string]string{
				"SDS_ADMIN_SOCKET": "/env/admin.sock", "SDS_POLICY_DIR": "/env/policies",
				"SDS_ALLOW_SHORT_TTL": "true", "SDS_CERT_TTL": "90s",
			},
			want: with(func(c *config) {
				c.AdminSocket, c.PolicyDir, c.AllowShortTTL, c.CertTTL = "/env/admin.sock", "/env/policies", true, 90*time.Second
			}),
		},
		{
			name: "env over file for derived paths",
			args: []string{"serve", "--config", fileAll},
			env:  map[string]string{"SDS_ADMIN_SOCKET": "/env/admin.sock", "SDS_POLICY_DIR": "/env/policies"},
			want: with(func(c *config) {
				c.DataDir, c.AdminSocket, c.PolicyDir = "/file/data", "/env/admin.sock", "/env/policies"
				c.ServerNames = []string{"file.example"}
			}),
		},
		{
			name: "env data dir reaches client commands",
			args: []string{"token", "create", "--service", "web"},
			env:  map[string]string{"SDS_DATA_DIR": "/env/data"},
			want: with(func(c *config) {
				c.DataDir, c.AdminSocket, c.PolicyDir = "/env/data", "/env/data/admin.sock", "/env/data/policies"
			}),
		},
		{
			name: "flags over env over file",
			args: []string{
				"serve", "--config", file, "--data-dir", "/flag/data", "--listen-addr", "127.0.0.1:6000",
				"--trust-domain", "flag.example", "--cert-ttl", "3h", "--allow-short-ttl=true",
				"--log-level", "error", "--server-names", "a.example,127.0.0.2",
			},
			env: env,
			want: with(func(c *config) {
				c.DataDir, c.AdminSocket, c.PolicyDir = "/flag/data", "/flag/data/admin.sock", "/flag/data/policies"
				c.ListenAddr, c.MetricsAddr = "127.0.0.1:6000", "127.0.0.1:7001"
				c.TrustDomain, c.CertTTL, c.AllowShortTTL, c.LogLevel = "flag.example", 3*time.Hour, true, "error"
				c.ServerNames = []string{"a.example", "127.0.0.2"}
			}),
		},
		{
			// A flag given explicitly wins even when its value is the
			// flag's default, and an empty --metrics-addr (disable) wins
			// over a non-empty env value.
			name: "explicit flag equal to its default, and empty flag, over env",
			args: []string{
				"serve", "--listen-addr", "127.0.0.1:8443", "--metrics-addr", "", "--cert-ttl", "1h",
				"--allow-short-ttl=false", "--admin-socket", "/flag/admin.sock", "--policy-dir", "/flag/policies",
			},
			env: map[string]string{
				"SDS_LISTEN_ADDR": "127.0.0.1:7000", "SDS_METRICS_ADDR": "127.0.0.1:7001", "SDS_CERT_TTL": "2h",
				"SDS_ALLOW_SHORT_TTL": "true", "SDS_ADMIN_SOCKET": "/env/admin.sock", "SDS_POLICY_DIR": "/env/policies",
			},
			want: with(func(c *config) {
				c.MetricsAddr, c.AdminSocket, c.PolicyDir = "", "/flag/admin.sock", "/flag/policies"
			}),
		},
		{
			name: "persistent flag before the subcommand",
			args: []string{"--data-dir", "/flag/data", "token", "list"},
			env:  map[string]string{"SDS_DATA_DIR": "/env/data"},
			want: with(func(c *config) {
				c.DataDir, c.AdminSocket, c.PolicyDir = "/flag/data", "/flag/data/admin.sock", "/flag/data/policies"
			}),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearSDSEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			got, err := loadVia(t, tt.args...)
			if err != nil {
				t.Fatalf("loadConfig: %v", err)
			}
			if got := documented(*got); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("config\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestLoadConfigErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.yaml")
	unknown := writeFile(t, filepath.Join(dir, "unknown.yaml"), "listen_addr: 127.0.0.1:9000\nlisten_adress: 127.0.0.1:9001\n")
	badYAML := writeFile(t, filepath.Join(dir, "bad.yaml"), "listen_addr: [unclosed\n")
	badTTL := writeFile(t, filepath.Join(dir, "ttl.yaml"), "cert_ttl: forever\n")
	unreadable := writeFile(t, filepath.Join(dir, "unreadable.yaml"), "listen_addr: 127.0.0.1:9000\n")
	if err := os.Chmod(unreadable, 0); err != nil {
		t.Fatal(err)
	}
	asDir := filepath.Join(dir, "dir.yaml")
	if err := os.Mkdir(asDir, 0o700); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		wantAll  []string // every one of these in the error
		needUser bool     // file permissions do not stop root
	}{
		{name: "unknown key in file", args: []string{"serve", "--config", unknown}, wantAll: []string{"listen_adress"}},
		{name: "missing config file", args: []string{"serve", "--config", missing}, wantAll: []string{missing}},
		{name: "missing config file, client command", args: []string{"token", "list", "--config", missing}, wantAll: []string{missing}},
		{name: "unreadable config file", args: []string{"serve", "--config", unreadable}, wantAll: []string{unreadable}, needUser: true},
		{name: "config path is a directory", args: []string{"serve", "--config", asDir}, wantAll: []string{asDir}},
		{name: "invalid YAML", args: []string{"serve", "--config", badYAML}, wantAll: []string{badYAML}},
		{name: "bad duration in file", args: []string{"serve", "--config", badTTL}, wantAll: []string{"cert_ttl"}},
		{name: "bad duration in env", args: []string{"serve"}, env: map[string]string{"SDS_CERT_TTL": "forever"}, wantAll: []string{"cert_ttl"}},
		{name: "bad bool in env", args: []string{"serve"}, env: map[string]string{"SDS_ALLOW_SHORT_TTL": "maybe"}, wantAll: []string{"allow_short_ttl"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.needUser && os.Geteuid() == 0 {
				t.Skip("running as root: permissions do not make a file unreadable")
			}
			clearSDSEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			cfg, err := loadVia(t, tt.args...)
			if err == nil {
				t.Fatalf("loadConfig succeeded with %+v, want an error", *cfg)
			}
			for _, w := range tt.wantAll {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	clearSDSEnv(t)
	defaults, err := loadVia(t, "serve") // the embedded defaults are valid
	if err != nil {
		t.Fatal(err)
	}
	good := *defaults
	tests := []struct {
		name    string
		mod     func(*config)
		wantErr []string // empty: valid
	}{
		{name: "defaults", mod: func(*config) {}},
		{name: "5m is long enough", mod: func(c *config) { c.CertTTL = 5 * time.Minute }},
		{name: "short ttl refused", mod: func(c *config) { c.CertTTL = time.Minute }, wantErr: []string{"cert_ttl", "allow_short_ttl"}},
		{name: "short ttl allowed", mod: func(c *config) { c.CertTTL, c.AllowShortTTL = time.Minute, true }},
		{name: "zero ttl", mod: func(c *config) { c.CertTTL = 0 }, wantErr: []string{"cert_ttl"}},
		{name: "negative ttl even when short allowed", mod: func(c *config) { c.CertTTL, c.AllowShortTTL = -time.Minute, true }, wantErr: []string{"cert_ttl"}},
		{name: "upper-case trust domain", mod: func(c *config) { c.TrustDomain = "Mesh.Local" }, wantErr: []string{"trust_domain"}},
		{name: "trust domain with a space", mod: func(c *config) { c.TrustDomain = "mesh local" }, wantErr: []string{"trust_domain"}},
		{name: "trust domain with a scheme", mod: func(c *config) { c.TrustDomain = "spiffe://mesh.local" }, wantErr: []string{"trust_domain"}},
		{name: "empty trust domain", mod: func(c *config) { c.TrustDomain = "" }, wantErr: []string{"trust_domain"}},
		{name: "empty data dir", mod: func(c *config) { c.DataDir = "" }, wantErr: []string{"data_dir"}},
		{name: "empty listen addr", mod: func(c *config) { c.ListenAddr = "" }, wantErr: []string{"listen_addr"}},
		{name: "default intermediate lifecycle", mod: func(c *config) {
			if c.CA.IntermediateTTL != 8760*time.Hour || c.CA.IntermediateRenewBefore != 1.0/3 {
				t.Errorf("defaults: ca.intermediate_ttl %s, ca.intermediate_renew_before %g; want 8760h, 1/3", c.CA.IntermediateTTL, c.CA.IntermediateRenewBefore)
			}
		}},
		{name: "short intermediate ttl refused", mod: func(c *config) { c.CA.IntermediateTTL = 90 * time.Second }, wantErr: []string{"ca.intermediate_ttl", "allow_short_ttl"}},
		{name: "short intermediate ttl allowed", mod: func(c *config) { c.CA.IntermediateTTL, c.AllowShortTTL = 90*time.Second, true }},
		{name: "intermediate renew before out of range", mod: func(c *config) { c.CA.IntermediateRenewBefore = 1.5 }, wantErr: []string{"ca.intermediate_renew_before"}},
		{name: "intermediate keys unused by step-ca", mod: func(c *config) {
			c.CA = caConfig{Backend: backendStepCA, URL: "https://127.0.0.1:9000", Provisioner: "p", KeyFile: "k", RootFile: "r", RootsRefresh: time.Minute}
		}},
		{name: "roots refresh too short", mod: func(c *config) { c.CA.RootsRefresh = 500 * time.Millisecond }, wantErr: []string{"ca.roots_refresh", "at least 1s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.mod(&c)
			err := c.validate()
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatalf("validate: %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("validate accepted %+v", c)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestLoadConfigEmptyEnv covers every key with its SDS_* variable set to "":
// keys with a documented empty meaning take it (over the file's value, as
// any env value does); every other key is refused with a message naming the
// variable, unless a flag overrides it.
func TestLoadConfigEmptyEnv(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, filepath.Join(dir, "sds.yaml"), `
data_dir: /file/data
metrics_addr: 127.0.0.1:9001
admin_socket: /file/admin.sock
policy_dir: /file/policies
ca:
  url: https://ca.example:9000
`)
	type row struct {
		name    string
		args    []string
		env     map[string]string
		check   func(*config) string // "" when fine
		wantErr []string
	}
	tests := []row{
		{
			name: "empty SDS_METRICS_ADDR disables metrics",
			args: []string{"serve"}, env: map[string]string{"SDS_METRICS_ADDR": ""},
			check: func(c *config) string {
				if c.MetricsAddr != "" {
					return "metrics_addr " + c.MetricsAddr + ", want empty (disabled)"
				}
				return ""
			},
		},
		{
			name: "empty SDS_METRICS_ADDR over the file's address",
			args: []string{"serve", "--config", file}, env: map[string]string{"SDS_METRICS_ADDR": ""},
			check: func(c *config) string {
				if c.MetricsAddr != "" {
					return "metrics_addr " + c.MetricsAddr + ", want empty (disabled)"
				}
				return ""
			},
		},
		{
			name: "empty derived paths mean their defaults under data_dir",
			args: []string{"serve", "--config", file}, env: map[string]string{"SDS_ADMIN_SOCKET": "", "SDS_POLICY_DIR": ""},
			check: func(c *config) string {
				if c.AdminSocket != "/file/data/admin.sock" || c.PolicyDir != "/file/data/policies" {
					return "admin_socket " + c.AdminSocket + ", policy_dir " + c.PolicyDir + ", want the defaults under /file/data"
				}
				return ""
			},
		},
		{
			name: "empty ca.url is not set",
			args: []string{"serve", "--config", file}, env: map[string]string{"SDS_CA_URL": ""},
			check: func(c *config) string {
				if c.CA.URL != "" {
					return "ca.url " + c.CA.URL + ", want empty"
				}
				return ""
			},
		},
		{
			name: "a flag overrides an empty variable",
			args: []string{"serve", "--log-level", "debug", "--cert-ttl", "2h"}, env: map[string]string{"SDS_LOG_LEVEL": "", "SDS_CERT_TTL": ""},
			check: func(c *config) string {
				if c.LogLevel != "debug" || c.CertTTL != 2*time.Hour {
					return "log_level " + c.LogLevel + ", cert_ttl " + c.CertTTL.String() + ", want debug and 2h"
				}
				return ""
			},
		},
		{
			name: "empty variable of a client command", args: []string{"token", "list"},
			env: map[string]string{"SDS_DATA_DIR": ""}, wantErr: []string{"SDS_DATA_DIR is set but empty", "./data"},
		},
	}
	// Every key without an empty meaning, including the limits.
	for _, keys := range []map[string]any{defaults, limitDefaults()} {
		for key := range keys {
			if _, ok := emptyMeans[key]; ok {
				continue
			}
			tests = append(tests, row{
				name: "empty " + envName(key) + " refused", args: []string{"serve"},
				env: map[string]string{envName(key): ""}, wantErr: []string{envName(key) + " is set but empty", key + "'s default"},
			})
		}
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearSDSEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			got, err := loadVia(t, tt.args...)
			if len(tt.wantErr) > 0 {
				if err == nil {
					t.Fatalf("loadConfig accepted %+v, want an error", *got)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not mention %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("loadConfig: %v", err)
			}
			if msg := tt.check(got); msg != "" {
				t.Error(msg)
			}
		})
	}
}
