package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestExitCodes(t *testing.T) {
	dataDir := t.TempDir() // empty: no server, no socket
	sock := filepath.Join(dataDir, "admin.sock")
	notCreated := filepath.Join(t.TempDir(), "data") // serve must fail before creating it
	dd := []string{"--data-dir", dataDir}

	tests := []struct {
		name string
		args []string
		code int
		// For code 1: every string must appear in the single stderr line.
		// For code 2: in the reason line. For code 0: in stdout.
		want []string
		// For code 2: the command whose --help the hint names.
		help string
	}{
		{name: "version", args: []string{"version"}, code: 0, want: []string{"sds-server " + version}},
		{name: "help flag", args: []string{"--help"}, code: 0, want: []string{"Usage:", "serve"}},
		{name: "no subcommand shows help", args: nil, code: 0, want: []string{"Usage:", "serve", "token"}},
		{name: "group without subcommand shows help", args: []string{"token"}, code: 0, want: []string{"Usage:", "create", "revoke"}},

		{name: "unknown flag", args: []string{"--bogus"}, code: 2, want: []string{"--bogus"}, help: "sds-server"},
		{name: "unknown flag on serve", args: []string{"serve", "--bogus"}, code: 2, want: []string{"--bogus"}, help: "sds-server serve"},
		{name: "unknown flag on token create", args: []string{"token", "create", "--service", "web", "--bogus"}, code: 2, want: []string{"--bogus"}, help: "sds-server token create"},
		{name: "bad flag value", args: []string{"serve", "--cert-ttl", "forever"}, code: 2, want: []string{"cert-ttl"}, help: "sds-server serve"},
		{name: "unknown subcommand", args: []string{"frobnicate"}, code: 2, want: []string{`"frobnicate"`}, help: "sds-server"},
		{name: "unknown subcommand of a group", args: []string{"token", "frobnicate"}, code: 2, want: []string{`"frobnicate"`}, help: "sds-server token"},
		{name: "unknown subcommand of bootstrap", args: []string{"bootstrap", "istio"}, code: 2, want: []string{`"istio"`}, help: "sds-server bootstrap"},
		{name: "extra argument to serve", args: []string{"serve", "extra"}, code: 2, want: []string{`"extra"`}, help: "sds-server serve"},
		{name: "extra argument to version", args: []string{"version", "extra"}, code: 2, want: []string{`"extra"`}, help: "sds-server version"},
		{name: "extra argument to token list", args: append([]string{"token", "list", "extra"}, dd...), code: 2, want: []string{`"extra"`}, help: "sds-server token list"},
		{name: "token revoke without ID", args: append([]string{"token", "revoke"}, dd...), code: 2, help: "sds-server token revoke"},
		{name: "token revoke with two IDs", args: append([]string{"token", "revoke", "a", "b"}, dd...), code: 2, help: "sds-server token revoke"},
		{name: "token create without --service", args: append([]string{"token", "create"}, dd...), code: 2, want: []string{"--service"}, help: "sds-server token create"},

		{name: "token list without a server", args: append([]string{"token", "list"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "token create without a server", args: append([]string{"token", "create", "--service", "web"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "token revoke without a server", args: append([]string{"token", "revoke", "0123456789abcdef"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "node show without ID", args: append([]string{"node", "show"}, dd...), code: 2, help: "sds-server node show"},
		{name: "status with an argument", args: append([]string{"status", "now"}, dd...), code: 2, want: []string{`"now"`}, help: "sds-server status"},
		{name: "status without a server", args: append([]string{"status"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "acl status without a server", args: append([]string{"acl", "status"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "node revoke with both token flags", args: append([]string{"node", "revoke", "n-1", "--keep-token", "--revoke-token"}, dd...), code: 2, want: []string{"--keep-token", "--revoke-token"}, help: "sds-server node revoke"},
		{name: "node revoke without a server", args: append([]string{"node", "revoke", "n-1", "--keep-token"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "node show without a server", args: append([]string{"node", "show", "sidecar-1"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "node list without a server", args: append([]string{"node", "list"}, dd...), code: 1, want: []string{sock, "sds-server serve"}},
		{name: "explicit admin socket without a server", args: []string{"node", "list", "--admin-socket", filepath.Join(dataDir, "other.sock")}, code: 1, want: []string{filepath.Join(dataDir, "other.sock"), "sds-server serve"}},

		// serve refuses a bad configuration before touching the data dir.
		{name: "serve short ttl", args: []string{"serve", "--data-dir", notCreated, "--cert-ttl", "1m"}, code: 1, want: []string{"allow_short_ttl"}},
		{name: "serve bad trust domain", args: []string{"serve", "--data-dir", notCreated, "--trust-domain", "Mesh Local"}, code: 1, want: []string{"trust_domain"}},
		{name: "serve bad log level", args: []string{"serve", "--data-dir", notCreated, "--log-level", "loud"}, code: 1, want: []string{"log_level"}},
		{name: "serve missing config file", args: []string{"serve", "--data-dir", notCreated, "--config", filepath.Join(dataDir, "nope.yaml")}, code: 1, want: []string{filepath.Join(dataDir, "nope.yaml")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearSDSEnv(t)
			r := runCLI(t, tt.args...)
			var where string
			switch tt.code {
			case 0:
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0\nstderr: %s", r.code, r.stderr)
				}
				where = r.stdout
			case 1:
				checkOneLineError(t, r)
				where = r.stderr
				if r.stdout != "" {
					t.Errorf("stdout = %q, want nothing", r.stdout)
				}
			case 2:
				checkUsageError(t, r)
				where = strings.SplitN(r.stderr, "\n", 2)[0]
				if hint := "Run '" + tt.help + " --help' for usage.\n"; !strings.HasSuffix(r.stderr, hint) {
					t.Errorf("stderr %q does not end with %q", r.stderr, hint)
				}
			}
			for _, w := range tt.want {
				if !strings.Contains(where, w) {
					t.Errorf("output %q does not mention %q", where, w)
				}
			}
			if _, err := os.Stat(notCreated); err == nil {
				t.Fatalf("%s was created", notCreated)
			}
			if _, err := os.Stat(sock); err == nil {
				t.Fatalf("%s was created", sock)
			}
		})
	}
}
