package main

import (
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// configSeeds are config files: valid ones, in each format viper reads, and
// mistakes an operator makes.
var configSeeds = []struct {
	ext, text string
}{
	{"yaml", ""},
	{"yaml", "data_dir: /var/lib/sds\nlisten_addr: 127.0.0.1:8443\ntrust_domain: mesh.local\ncert_ttl: 1h\n"},
	{"yaml", `
data_dir: ./data
listen_addr: 127.0.0.1:9000
metrics_addr: ""
admin_socket: /run/sds/admin.sock
trust_domain: prod.example
cert_ttl: 30m
allow_short_ttl: true
renew_window: 0.6-0.7
crl_period: 1h
default_policy: allow
policy_dir: /etc/sds/policies
server_names: [sds.example, 10.0.0.1, "::1"]
log_level: debug
ca:
  backend: stepca
  url: https://127.0.0.1:9000
  root_fingerprint: 0123456789abcdef
  provisioner: sds-server
  key_file: /etc/sds/provisioner.json
  password_file: /etc/sds/password
`},
	{"yaml", "listen_addr: 127.0.0.1:9000\nlisten_adress: 127.0.0.1:9001\n"},
	{"yaml", "listen_addr: [unclosed\n"},
	{"yaml", "cert_ttl: forever\n"},
	{"yaml", "cert_ttl: 1m\n"},
	{"yaml", "cert_ttl: 5\n"},
	{"yaml", "allow_short_ttl: maybe\n"},
	{"yaml", "crl_period: 1s\n"},
	{"yaml", "renew_window: 0.9-0.1\n"},
	{"yaml", "default_policy: permit\n"},
	{"yaml", "trust_domain: Mesh.Local\n"},
	{"yaml", "data_dir: ''\n"},
	{"yaml", "server_names: localhost\n"},
	{"yaml", "server_names: {a: b}\n"},
	{"yaml", "ca: stepca\n"},
	{"yaml", "ca:\n  backend: stepca\n"},
	{"yaml", "ca:\n  backend: vault\n  colour: blue\n"},
	{"yaml", "a: &a [*a]\n"},
	{"yaml", "- 1\n- 2\n"},
	{"yaml", "? [a, b]\n: c\n"},
	{"yaml", "data_dir: !!binary aGVsbG8=\n"},
	{"yaml", "DATA_DIR: /x\nData_Dir: /y\n"},
	{"yaml", "data_dir: /x\ndata_dir: /y\n"},
	{"yaml", "zz: 1\naa: 2\nmm: 3\n"},
	{"json", `{"data_dir": "/var/lib/sds", "cert_ttl": "2h", "server_names": ["a", "b"], "ca": {"backend": "local"}}`},
	{"json", `{"cert_ttl": 3600000000000}`},
	{"json", `{"cert_ttl": -1}`},
	{"json", `{"ca": null}`},
	{"json", `[]`},
	{"json", `{"data_dir": "/x"`},
	{"json", `{"unknown": {"nested": true}}`},
	{"toml", "data_dir = \"/var/lib/sds\"\ncert_ttl = \"2h\"\n[ca]\nbackend = \"local\"\n"},
	{"toml", "data_dir = \n"},
	{"toml", "[ca]\nbackend = 1\n"},
}

// configExts are the extensions the fuzzed file gets, by the fuzzed index.
var configExts = []string{"yaml", "json", "toml", "yml"}

// loadFuzzConfig runs `sds-server serve --config file` as a user would,
// except that the command loads and validates the configuration and stops
// there instead of serving.
func loadFuzzConfig(t *testing.T, file string) (*config, error) {
	t.Helper()
	root := newRootCommand(io.Discard, io.Discard)
	serve, _, err := root.Find([]string{"serve"})
	if err != nil {
		t.Fatalf("find serve: %v", err)
	}
	var cfg *config
	serve.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := loadConfig(cmd)
		if err != nil {
			return err
		}
		if err := c.validate(); err != nil {
			return err
		}
		cfg = c
		return nil
	}
	root.SetArgs([]string{"serve", "--config", file})
	if err := root.Execute(); err != nil {
		return nil, err
	}
	if cfg == nil {
		t.Fatal("serve did not run")
	}
	return cfg, nil
}

// FuzzConfig writes any bytes as a YAML, JSON or TOML config file and loads
// it through the real command tree (viper's layering on the embedded
// defaults, then validate): no panic; an error is non-empty, one line once
// the CLI prints it, and the same on a second load (no map-order
// dependence); an accepted config is complete (data dir, admin socket,
// policy dir) and loads the same twice.
func FuzzConfig(f *testing.F) {
	// The caller's SDS_* variables must not mix into the fuzzed files.
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "SDS_") {
			f.Setenv(name, "")
		}
	}
	for _, s := range configSeeds {
		for i, ext := range configExts {
			if ext == s.ext {
				f.Add([]byte(s.text), uint8(i))
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte, ext uint8) {
		file := filepath.Join(t.TempDir(), "sds."+configExts[int(ext)%len(configExts)])
		if err := os.WriteFile(file, data, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := loadFuzzConfig(t, file)
		cfg2, err2 := loadFuzzConfig(t, file)
		if err != nil {
			msg := err.Error()
			if strings.TrimSpace(msg) == "" {
				t.Fatalf("empty error for %q", data)
			}
			if line := "sds-server: " + oneLine(msg); strings.ContainsAny(line, "\n\r") {
				t.Fatalf("error for %q is not printed on one line: %q", data, line)
			}
			if err2 == nil || err2.Error() != msg {
				t.Fatalf("loading %q twice: error %q, then %v", data, msg, err2)
			}
			return
		}
		if err2 != nil || !reflect.DeepEqual(cfg, cfg2) {
			t.Fatalf("loading %q twice: %+v, then %+v, %v", data, cfg, cfg2, err2)
		}
		if cfg.DataDir == "" || cfg.AdminSocket == "" || cfg.PolicyDir == "" || cfg.ListenAddr == "" {
			t.Fatalf("accepted config %q is incomplete: %+v", data, cfg)
		}
	})
}
