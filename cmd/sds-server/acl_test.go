package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/sds-server/authz"
)

const validACL = `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]}]`

// oversizedACL is a valid ACL padded past the server's limit (1.28 MB, the
// size the issue found `acl check` accepted while the server refused it).
func oversizedACL() string {
	return "[" + strings.Repeat(" ", 1_280_000) + "]"
}

// TestACLCheck: `acl check` refuses what the server's loader refuses, with
// one line naming the file and why, and returns quickly whatever the path
// is: before, /dev/zero ran it out of memory and a FIFO blocked it for ever.
func TestACLCheck(t *testing.T) {
	clearSDSEnv(t)
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	for name, content := range map[string]string{
		"ok.json":     validACL,
		"big.json":    oversizedACL(),
		"method.json": `[{"permission": {"method": "FETCH", "resource": "/"}, "allow": ["web"]}]`,
	} {
		if err := os.WriteFile(p(name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(p("fifo.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(p("dir.json"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("missing.json", p("dangling.json")); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		file    string
		wantOut string // stdout; "" for a valid file
	}{
		{"valid file", p("ok.json"), ""},
		{"oversized file, the server's limit", p("big.json"), p("big.json") + ": larger than 1048576 bytes"},
		{"/dev/zero", "/dev/zero", "/dev/zero: a character device, not a regular file"},
		{"FIFO", p("fifo.json"), p("fifo.json") + ": a named pipe (FIFO), not a regular file"},
		{"directory", p("dir.json"), p("dir.json") + ": a directory, not a regular file"},
		{"dangling symlink", p("dangling.json"), p("dangling.json") + ": symbolic link to missing.json: no such file or directory"},
		{"invalid entry", p("method.json"), p("method.json") + `:entry 1: method "FETCH" is not one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE or "*"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			r := runCLI(t, "acl", "check", tc.file)
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("acl check took %s", d)
			}
			if tc.wantOut == "" {
				if r.code != 0 || r.stdout != "" || r.stderr != "1 ACL file(s) OK\n" {
					t.Fatalf("acl check %s: exit %d, stdout %q, stderr %q; want 0, nothing, 1 ACL file(s) OK", tc.file, r.code, r.stdout, r.stderr)
				}
				return
			}
			checkOneLineError(t, r)
			if r.stdout != tc.wantOut+"\n" {
				t.Errorf("stdout %q, want %q", r.stdout, tc.wantOut+"\n")
			}
			if r.stderr != "sds-server: 1 of 1 ACL file(s) invalid\n" {
				t.Errorf("stderr %q", r.stderr)
			}
		})
	}
}

// TestACLCheckAgreesWithServer runs `acl check` on every file of a policy
// directory and compares it with what the server's directory loader says
// of the same file: the same verdict and the same words.
func TestACLCheckAgreesWithServer(t *testing.T) {
	clearSDSEnv(t)
	dir := t.TempDir()
	files := map[string]string{
		"prod/ok.json":       validACL,
		"prod/yaml.yaml":     "- permission: {method: GET, resource: /x}\n  allow: [staging/web, '*']\n",
		"prod/empty.json":    `[]`,
		"prod/big.json":      oversizedACL(),
		"prod/limit.json":    "[" + strings.Repeat(" ", authz.MaxFileSize-2) + "]",
		"prod/method.json":   `[{"permission": {"method": "FETCH", "resource": "/"}, "allow": ["web"]}]`,
		"prod/regex.json":    `[{"permission": {"method": "GET", "resource": "/("}, "allow": ["web"]}]`,
		"prod/syntax.json":   `[{"permission": `,
		"prod/caller.json":   `[{"permission": {"method": "GET", "resource": "/"}, "allow": ["Web"]}]`,
		"prod/field.json":    `[{"permission": {"method": "GET", "resource": "/"}, "allow": ["web"], "deny": []}]`,
		"staging/self.yaml":  "- permission: {method: GET, resource: /}\n  allow: [staging/web]\n",
		"staging/empty.yaml": "",
	}
	for name, content := range files {
		path := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "prod", "fifo.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("ok.json", filepath.Join(dir, "prod", "link.json")); err != nil {
		t.Fatal(err)
	}
	d, err := authz.LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Policies) != len(files)+2 || len(d.Stray) != 0 {
		t.Fatalf("the server's loader found %d destinations and %v, want %d and no stray file", len(d.Policies), d.Stray, len(files)+2)
	}
	t.Chdir(dir) // acl check is given the paths the server reports
	valid, invalid := 0, 0
	for k, res := range d.Policies {
		r := runCLI(t, "acl", "check", res.Path)
		if res.Err == nil {
			valid++
			if r.code != 0 {
				t.Errorf("%s: the server loads it (%s), acl check exits %d: %s", res.Path, k, r.code, r.stdout)
			}
			continue
		}
		invalid++
		if r.code != 1 || r.stdout != res.Err.Error()+"\n" {
			t.Errorf("%s: the server says %q, acl check exits %d saying %q", res.Path, res.Err, r.code, r.stdout)
		}
	}
	if valid < 5 || invalid < 8 {
		t.Errorf("%d valid and %d invalid files: the set no longer covers both", valid, invalid)
	}
}

// TestACLCheckInterrupted: when its context ends (SIGINT or SIGTERM, which
// the root command turns into a cancelled context), `acl check` stops at
// once, even in the middle of a file, and says how far it got.
func TestACLCheckInterrupted(t *testing.T) {
	clearSDSEnv(t)
	file := filepath.Join(t.TempDir(), "many.json")
	if err := os.WriteFile(file, manyEntriesACL(t), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"acl", "check"}
	for range 200 {
		args = append(args, file)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(ctx, args, &out, &errb) }()
	time.AfterFunc(100*time.Millisecond, cancel)
	var code int
	select {
	case code = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("acl check did not return within 10 s of its context ending")
	}
	r := result{code, out.String(), errb.String()}
	checkOneLineError(t, r)
	if !strings.HasPrefix(r.stderr, "sds-server: acl check interrupted after ") || !strings.HasSuffix(r.stderr, " of 200 file(s)\n") {
		t.Errorf("stderr %q, want the interruption and how far it got", r.stderr)
	}
}

// manyEntriesACL is a valid ACL of several thousand regex entries, slow
// enough to validate (about 0.4 s) that a check of it can be interrupted.
func manyEntriesACL(t *testing.T) []byte {
	t.Helper()
	type perm struct {
		Method   string `json:"method"`
		Resource string `json:"resource"`
	}
	type entry struct {
		Permission perm     `json:"permission"`
		Allow      []string `json:"allow"`
	}
	entries := make([]entry, 8000)
	for i := range entries {
		entries[i] = entry{perm{"GET", fmt.Sprintf("/r%d/[a-z]+/[0-9]{1,4}", i)}, []string{"web", "api"}}
	}
	b, err := json.Marshal(entries)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
