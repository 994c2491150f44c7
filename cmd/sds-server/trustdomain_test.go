package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBootstrapEnvoyTrustDomain runs bootstrap envoy against a server in
// trust domain example.org: without a trust domain given, the bootstrap
// pins the server's; a disagreeing one, from the flag, SDS_TRUST_DOMAIN or
// the config file, is refused in one line naming both, and nothing is
// written.
func TestBootstrapEnvoyTrustDomain(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	s := startServe(t, dataDir, "--trust-domain", "example.org")
	m := sdsAddrRE.FindStringSubmatch(s.stdout.String())
	if m == nil {
		t.Fatalf("no sds address in %q", s.stdout)
	}
	addr := m[1]
	cr := runCLI(t, "token", "create", "--service", "web", "--uses", "0", "--data-dir", dataDir)
	if cr.code != 0 {
		t.Fatalf("token create: exit %d: %s", cr.code, cr.stderr)
	}
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "web.token")
	if err := os.WriteFile(tokFile, []byte(cr.stdout), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgMesh := writeFile(t, filepath.Join(dir, "mesh.yaml"), "trust_domain: mesh.local\n")
	cfgExample := writeFile(t, filepath.Join(dir, "example.yaml"), "trust_domain: example.org\n")
	cfgOther := writeFile(t, filepath.Join(dir, "other.yaml"), "log_level: info\n")
	const serverID = "spiffe://example.org/sds-server"

	tests := []struct {
		name   string
		env    string // SDS_TRUST_DOMAIN
		extra  []string
		source string // "" when the bootstrap must succeed
	}{
		{name: "learned from the server"},
		{name: "learned, config file without trust_domain", extra: []string{"--config", cfgOther}},
		{name: "flag agrees", extra: []string{"--trust-domain", "example.org"}},
		{name: "config file agrees", extra: []string{"--config", cfgExample}},
		{name: "flag disagrees", extra: []string{"--trust-domain", "mesh.local"}, source: "--trust-domain"},
		{name: "flag disagrees with the default value", extra: []string{"--trust-domain", "mesh.local", "--config", cfgExample}, source: "--trust-domain"},
		{name: "SDS_TRUST_DOMAIN disagrees", env: "mesh.local", source: "SDS_TRUST_DOMAIN"},
		{name: "config file disagrees", extra: []string{"--config", cfgMesh}, source: "trust_domain in " + cfgMesh},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.env != "" {
				t.Setenv("SDS_TRUST_DOMAIN", tt.env)
			} else {
				clearSDSEnv(t) // unset: an empty SDS_* value is a value
			}
			out := filepath.Join(dir, strings.Repeat("o", i+1)+".yaml")
			args := append([]string{"bootstrap", "envoy", "--server", addr, "--token-file", tokFile,
				"--service-port", "8080", "--listen", "127.0.0.1:15001", "--timeout", "5s", "-o", out}, tt.extra...)
			r := runCLI(t, args...)
			if tt.source == "" {
				if r.code != 0 {
					t.Fatalf("exit %d: %s", r.code, r.stderr)
				}
				b, err := os.ReadFile(out)
				if err != nil {
					t.Fatal(err)
				}
				if !strings.Contains(string(b), serverID) || strings.Contains(string(b), "mesh.local") {
					t.Errorf("bootstrap does not pin the server's %s alone:\n%s", serverID, b)
				}
				return
			}
			checkOneLineError(t, r)
			for _, w := range []string{"trust domain mismatch", tt.source + ` is "mesh.local"`, `trust domain "example.org"`, addr, serverID, "drop " + tt.source, "nothing was written"} {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr %q does not say %q", r.stderr, w)
				}
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("a refused bootstrap wrote %s (stat: %v)", out, err)
			}
			if r.stdout != "" {
				t.Errorf("a refused bootstrap printed %q", r.stdout)
			}
		})
	}
}

// TestServeWarnsOnTrustDomainChange restarts a server on its data dir with
// another trust domain and checks it warns once, naming both; a restart
// with the CA's own trust domain does not warn.
func TestServeWarnsOnTrustDomainChange(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	serveOnce(t, dataDir) // creates the CA for mesh.local

	warnings := func(stderr string) []string {
		var out []string
		for _, l := range strings.Split(stderr, "\n") {
			if strings.Contains(l, "level=WARN") && strings.Contains(l, "trust_domain") {
				out = append(out, l)
			}
		}
		return out
	}
	s := startServe(t, dataDir, "--trust-domain", "example.org")
	s.stop(t)
	w := warnings(s.stderr.String())
	if len(w) != 1 {
		t.Fatalf("serve with another trust domain logged %d trust-domain warnings, want 1\nstderr: %s", len(w), s.stderr)
	}
	for _, want := range []string{"trust_domain=example.org", "ca_trust_domain=mesh.local", "re-bootstrap"} {
		if !strings.Contains(w[0], want) {
			t.Errorf("warning %q does not say %q", w[0], want)
		}
	}

	s = startServe(t, dataDir)
	s.stop(t)
	if w := warnings(s.stderr.String()); len(w) != 0 {
		t.Errorf("serve with the CA's trust domain warned: %q", w)
	}
}
