package authz

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestReadFile covers what ReadFile refuses before it can block or exhaust
// memory, and what it follows. Each case must return within a second: a
// FIFO or /dev/zero that is opened or read unbounded would hang the test.
func TestReadFile(t *testing.T) {
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	writeFiles(t, dir, map[string]string{
		"ok.json":    `[]`,
		"limit.json": "[" + strings.Repeat(" ", MaxFileSize-2) + "]",
		"big.json":   "[" + strings.Repeat(" ", MaxFileSize-1) + "]",
		"sub/":       "",
	})
	if err := syscall.Mkfifo(p("fifo.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", p("sock.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for link, target := range map[string]string{
		"link.json": "ok.json", "dangling.json": "missing.json",
		"loop-a.json": "loop-b.json", "loop-b.json": "loop-a.json", "fifo-link.json": "fifo.json",
	} {
		if err := os.Symlink(target, p(link)); err != nil {
			t.Fatal(err)
		}
	}

	tests := []struct {
		name    string
		path    string
		wantLen int
		wantErr string
	}{
		{"regular file", p("ok.json"), 2, ""},
		{"exactly the limit", p("limit.json"), MaxFileSize, ""},
		{"one byte over the limit", p("big.json"), 0, "larger than 1048576 bytes"},
		{"symlink to a file", p("link.json"), 2, ""},
		{"dangling symlink", p("dangling.json"), 0, "symbolic link to missing.json: no such file or directory"},
		{"symlink loop", p("loop-a.json"), 0, "symbolic link to loop-b.json: too many levels of symbolic links"},
		{"missing", p("missing.json"), 0, "no such file or directory"},
		{"FIFO", p("fifo.json"), 0, "a named pipe (FIFO), not a regular file"},
		{"symlink to a FIFO", p("fifo-link.json"), 0, "a named pipe (FIFO), not a regular file"},
		{"socket", p("sock.json"), 0, "a socket, not a regular file"},
		{"directory", p("sub"), 0, "a directory, not a regular file"},
		{"/dev/zero", "/dev/zero", 0, "a character device, not a regular file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			data, err := ReadFile(tc.path)
			if d := time.Since(start); d > time.Second {
				t.Errorf("ReadFile took %s", d)
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("ReadFile: %v", err)
			case tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr):
				t.Fatalf("ReadFile error = %v, want %q", err, tc.wantErr)
			case len(data) != tc.wantLen:
				t.Fatalf("ReadFile returned %d bytes, want %d", len(data), tc.wantLen)
			}
		})
	}
}

// TestLoadFileMatchesLoadDir: what `acl check` loads (LoadFile) is what the
// server loads from policy_dir (LoadDir), file by file, errors included.
func TestLoadFileMatchesLoadDir(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"prod/ok.json":      `[{"permission": {"method": "GET", "resource": "/x"}, "allow": ["web"]}]`,
		"prod/yaml.yaml":    "- permission: {method: GET, resource: /x}\n  allow: [staging/web]\n",
		"prod/big.json":     "[" + strings.Repeat(" ", MaxFileSize) + "]",
		"prod/limit.json":   "[" + strings.Repeat(" ", MaxFileSize-2) + "]",
		"prod/method.json":  `[{"permission": {"method": "FETCH", "resource": "/x"}, "allow": ["web"]}]`,
		"prod/regex.json":   `[{"permission": {"method": "GET", "resource": "/x("}, "allow": ["web"]}]`,
		"prod/syntax.json":  `[{`,
		"prod/allow.json":   `[{"permission": {"method": "GET", "resource": "/x"}, "allow": ["Bad Name"]}]`,
		"prod/unknown.json": `[{"permission": {"method": "GET", "resource": "/x"}, "allow": ["web"], "deny": ["x"]}]`,
	})
	if err := syscall.Mkfifo(filepath.Join(dir, "prod", "fifo.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("missing.json", filepath.Join(dir, "prod", "dangling.json")); err != nil {
		t.Fatal(err)
	}
	d, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Policies) != 11 {
		t.Fatalf("LoadDir found %d destinations, want 11", len(d.Policies))
	}
	// Run from dir, so that the file names LoadFile is given are the
	// relative paths LoadDir reports.
	t.Chdir(dir)
	for k, r := range d.Policies {
		acl, err := LoadFile(r.Path, k.Env)
		if got, want := errText(err), errText(r.Err); got != want {
			t.Errorf("%s: LoadFile error %q, LoadDir error %q", r.Path, got, want)
		}
		if len(acl) != len(r.ACL) {
			t.Errorf("%s: LoadFile %d entries, LoadDir %d", r.Path, len(acl), len(r.ACL))
		}
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
