package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// A key spelled in two cases used to load whichever spelling viper's map
// iteration visited last: data_dir flipped between /x and /y from one load
// to the next (found by FuzzConfig).
func TestLoadConfigKeyCaseClash(t *testing.T) {
	clearSDSEnv(t)
	dir := t.TempDir()
	tests := []struct {
		name, file, text string
		want             string // in the error; empty: loads
	}{
		{"YAML top level", "a.yaml", "DATA_DIR: /x\ndata_dir: /y\n", `keys "DATA_DIR" and "data_dir" are the same key spelled differently`},
		{"YAML three spellings", "b.yml", "data_dir: /x\nData_Dir: /y\nDATA_DIR: /z\n", `keys "DATA_DIR" and "Data_Dir"`},
		{"YAML nested", "c.yaml", "ca:\n  url: https://a\n  URL: https://b\n", `keys "ca.URL" and "ca.url"`},
		{"YAML nested table names", "d.yaml", "ca:\n  url: https://a\nCA:\n  backend: local\n", `keys "CA" and "ca"`},
		{"JSON", "e.json", `{"trust_domain": "a.example", "Trust_Domain": "b.example"}`, `keys "Trust_Domain" and "trust_domain"`},
		{"TOML", "f.toml", "log_level = \"info\"\nLOG_LEVEL = \"debug\"\n", `keys "LOG_LEVEL" and "log_level"`},
		{"one spelling in upper case loads", "g.yaml", "DATA_DIR: /x\nca:\n  URL: https://a\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := writeFile(t, filepath.Join(dir, tt.file), tt.text)
			cfg, err := loadVia(t, "serve", "--config", file)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("loadConfig: %v", err)
				}
				if cfg.DataDir != "/x" || cfg.CA.URL != "https://a" {
					t.Errorf("loaded data_dir %q, ca.url %q; want /x and https://a", cfg.DataDir, cfg.CA.URL)
				}
				return
			}
			if err == nil {
				t.Fatalf("loadConfig accepted %q: %+v", tt.text, *cfg)
			}
			for _, w := range []string{file, tt.want, "keep one"} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}
