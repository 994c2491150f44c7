package stepcainit

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestLoadDescribesWhatInitCreated(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "step ca") // a space: the YAML must quote it
	created, err := Init(Options{Dir: dir, Address: "127.0.0.1:9443", Provisioner: "sds"})
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if *loaded != *created {
		t.Errorf("Load = %+v\nInit = %+v", *loaded, *created)
	}

	var cfg struct {
		CA map[string]string `json:"ca"`
	}
	if err := yaml.UnmarshalStrict(loaded.SDSServerConfig(), &cfg); err != nil {
		t.Fatalf("SDSServerConfig is not the YAML of a ca: section: %v\n%s", err, loaded.SDSServerConfig())
	}
	want := map[string]string{
		"backend": "stepca", "url": created.URL, "root_fingerprint": created.Fingerprint, "provisioner": "sds",
		"key_file": created.KeyFile, "password_file": created.ProvisionerPasswordFile,
	}
	for k, v := range want {
		if cfg.CA[k] != v {
			t.Errorf("ca.%s = %q, want %q", k, cfg.CA[k], v)
		}
	}
	if len(cfg.CA) != len(want) {
		t.Errorf("ca: has keys %v, want exactly %v", cfg.CA, want)
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name   string
		change func(t *testing.T, ca *CA)
		want   string
	}{
		{"no directory", func(t *testing.T, ca *CA) { os.RemoveAll(ca.Dir) }, "defaults.json"},
		{"another root", func(t *testing.T, ca *CA) {
			other, err := Init(Options{Dir: filepath.Join(t.TempDir(), "other")})
			if err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(other.RootFile)
			os.WriteFile(ca.RootFile, b, 0o644)
		}, "does not have the fingerprint"},
		{"no JWK provisioner", func(t *testing.T, ca *CA) {
			b, _ := os.ReadFile(ca.ConfigFile)
			os.WriteFile(ca.ConfigFile, []byte(strings.ReplaceAll(string(b), `"JWK"`, `"ACME"`)), 0o644)
		}, "no JWK provisioner"},
		{"broken ca.json", func(t *testing.T, ca *CA) { os.WriteFile(ca.ConfigFile, []byte("{"), 0o644) }, "ca.json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ca, err := Init(Options{Dir: filepath.Join(t.TempDir(), "ca")})
			if err != nil {
				t.Fatal(err)
			}
			tt.change(t, ca)
			if _, err := Load(ca.Dir); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Load error %v, want one saying %q", err, tt.want)
			}
		})
	}
}
