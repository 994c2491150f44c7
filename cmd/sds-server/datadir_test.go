package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshid/sds-server/issuer/local"
)

// chmodAll sets each path's mode, past the umask.
func chmodAll(t *testing.T, modes map[string]os.FileMode) {
	t.Helper()
	for p, m := range modes {
		if err := os.Chmod(p, m); err != nil {
			t.Fatal(err)
		}
	}
}

// TestServeTightensLoosePermissions loosens every private path of a used
// data dir and checks that serve makes each private again, says so in one
// warning line per path, and still serves the same CA and state.
func TestServeTightensLoosePermissions(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	before := serveOnce(t, dataDir)
	ca := filepath.Join(dataDir, "ca")
	loose := map[string]os.FileMode{
		dataDir:                              0o755,
		filepath.Join(dataDir, "state.db"):   0o644,
		ca:                                   0o775,
		filepath.Join(ca, local.RootKeyFile): 0o640,
		filepath.Join(ca, local.IntermediateKeyFile): 0o666,
	}
	want := map[string]os.FileMode{
		dataDir:                              0o700,
		filepath.Join(dataDir, "state.db"):   0o600,
		ca:                                   0o700,
		filepath.Join(ca, local.RootKeyFile): 0o600,
		filepath.Join(ca, local.IntermediateKeyFile): 0o600,
	}
	chmodAll(t, loose)

	s := startServe(t, dataDir)
	if code := s.stop(t); code != 0 {
		t.Fatalf("serve exited with %d\nstderr: %s", code, s.stderr)
	}
	var warnings []string
	for _, l := range strings.Split(s.stderr.String(), "\n") {
		if strings.Contains(l, "tightened permissions") {
			warnings = append(warnings, l)
		}
	}
	if len(warnings) != len(loose) {
		t.Errorf("%d 'tightened permissions' lines, want one per loosened path (%d):\n%s", len(warnings), len(loose), s.stderr)
	}
	for p, m := range want {
		checkMode(t, p, m)
		line := fmt.Sprintf("path=%s old_mode=%04o new_mode=%04o", p, loose[p], m)
		found := false
		for _, w := range warnings {
			found = found || strings.Contains(w, line) && strings.Contains(w, "level=WARN")
		}
		if !found {
			t.Errorf("no warning line with %q:\n%s", line, s.stderr)
		}
	}
	if !strings.Contains(s.stderr.String(), "replace the CA") {
		t.Errorf("a loosened CA key is fixed without saying it may have been read:\n%s", s.stderr)
	}
	if after := readFiles(t, ca); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("CA files changed while their modes were fixed")
	}

	// Private already: no warning.
	s = startServe(t, dataDir)
	s.stop(t)
	if strings.Contains(s.stderr.String(), "tightened") {
		t.Errorf("serve warns about a private data dir:\n%s", s.stderr)
	}
}

// TestServeRefusesPermissionsItCannotFix gives a loose private path to
// another user: serve must refuse with the path and mode, and change
// nothing.
func TestServeRefusesPermissionsItCannotFix(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a file to another user")
	}
	const nobody = 65534
	for _, c := range []struct {
		name string
		rel  string // under the data dir; "" is the data dir
		mode os.FileMode
		want []string
	}{
		{name: "data dir", rel: "", mode: 0o755, want: []string{"data dir", "mode 0755", "uid 65534"}},
		{name: "state file", rel: "state.db", mode: 0o644, want: []string{"state file", "mode 0644", "uid 65534"}},
		{name: "CA key", rel: filepath.Join("ca", local.IntermediateKeyFile), mode: 0o644, want: []string{"CA key", "mode 0644", "uid 65534"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			clearSDSEnv(t)
			dataDir := shortTempDir(t)
			serveOnce(t, dataDir)
			p := filepath.Join(dataDir, c.rel)
			chmodAll(t, map[string]os.FileMode{p: c.mode})
			if err := os.Chown(p, nobody, nobody); err != nil {
				t.Fatal(err)
			}
			before := readFiles(t, dataDir)
			serveFails(t, dataDir, append(c.want, p)...)
			checkMode(t, p, c.mode)
			if after := readFiles(t, dataDir); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("a refused start changed the data dir")
			}
		})
	}
}

// TestTighten covers each branch of one path's check, including a chmod
// that fails: /proc/self is the caller's own, mode 0555, and procfs
// refuses chmod even to root.
func TestTighten(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "state.db")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		path    string
		mode    os.FileMode // set before, unless 0
		max     os.FileMode
		want    os.FileMode // after, unless 0
		warn    bool
		wantErr []string
	}{
		{name: "missing", path: filepath.Join(dir, "nope"), max: 0o600},
		{name: "private", path: file, mode: 0o600, max: 0o600, want: 0o600},
		{name: "tighter", path: file, mode: 0o400, max: 0o600, want: 0o400},
		{name: "group readable", path: file, mode: 0o640, max: 0o600, want: 0o600, warn: true},
		{name: "world writable", path: file, mode: 0o602, max: 0o600, want: 0o600, warn: true},
		{name: "executable", path: file, mode: 0o700, max: 0o600, want: 0o600, warn: true},
		{name: "chmod fails", path: "/proc/self", max: 0o700, wantErr: []string{"/proc/self", "mode 0555", "cannot be made 0500"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.mode != 0 {
				chmodAll(t, map[string]os.FileMode{c.path: c.mode})
			}
			var buf bytes.Buffer
			log := slog.New(slog.NewTextHandler(&buf, nil))
			err := tighten(log, privatePath{what: "test path", path: c.path, max: c.max}, os.Geteuid())
			switch {
			case c.wantErr != nil && err == nil:
				t.Fatalf("no error, want one saying %q", c.wantErr)
			case c.wantErr != nil:
				for _, w := range c.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
			case err != nil:
				t.Fatal(err)
			}
			if c.want != 0 {
				checkMode(t, c.path, c.want)
			}
			if got := strings.Count(buf.String(), "tightened permissions"); got != map[bool]int{true: 1}[c.warn] {
				t.Errorf("log %q: want a warning: %v", buf.String(), c.warn)
			}
		})
	}
}
