package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// apiLooseACL lets web GET and POST /users; apiTightACL takes POST away.
const (
	apiLooseACL = `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]},
 {"permission": {"method": "POST", "resource": "/users"}, "allow": ["web"]}]`
	apiTightACL = `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]},
 {"permission": {"method": "PUT",  "resource": "/users"}, "allow": ["api"]}]`
)

// TestACLSymlink serves api's ACL through a symbolic link to a file outside
// policy_dir (issue 11, finding 4: such edits were never applied). The
// target is tightened in place (the link itself does not change): web's
// POST is refused through the real sidecars within 2 s, GET still passes,
// and `acl status` reports the new policy. Then the link is left dangling:
// the tightened policy stays in force and `acl status` says it is stale,
// and why.
func TestACLSymlink(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	policyDir := filepath.Join(t.TempDir(), "policies")
	target := filepath.Join(t.TempDir(), "api-acl.json")
	if err := os.WriteFile(target, []byte(apiLooseACL), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(policyDir, "default"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, filepath.Join(policyDir, "default", "api.json")); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, bin, "--policy-dir", policyDir, "--default-policy", "deny")
	api := startSidecar(t, srv, envoyBin, "api")
	web := startSidecar(t, srv, envoyBin, "web", api)
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	status := func(method string) int {
		code, _, err := call(fresh, web, "api", method, "/users")
		if err != nil {
			t.Fatalf("web -> api %s /users: %v", method, err)
		}
		return code
	}
	eventually(t, 20*time.Second, "web -> api POST /users allowed by the loose ACL", func() error {
		if code, _, err := call(fresh, web, "api", "POST", "/users"); err != nil || code != 200 {
			return fmt.Errorf("status %d, err %v", code, err)
		}
		return nil
	})
	apiLine := regexp.MustCompile(`(?m)^default/api\s+default/api\.json\s+(\S+)\s+(\d+)\s+\S+\s+(.*)$`)
	// acl status exits 1 while a file is invalid, 0 otherwise.
	aclStatus := func() (state string, entries int, errText string) {
		out, errOut, code := srv.cliResult("acl", "status")
		m := apiLine.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("acl status has no line for default/api (exit %d, %s):\n%s", code, errOut, out)
		}
		n, _ := strconv.Atoi(m[2])
		if wantCode := map[bool]int{true: 0, false: 1}[m[3] == "-"]; code != wantCode {
			t.Errorf("acl status exit %d with error %q, want %d", code, m[3], wantCode)
		}
		return m[1], n, strings.TrimSpace(m[3])
	}
	if state, n, e := aclStatus(); state != "active" || n != 2 || e != "-" {
		t.Fatalf("acl status before the edit: %s, %d entries, error %q; want active, 2, -", state, n, e)
	}

	// Tighten the target in place: same inode, same length, link unchanged.
	if len(apiTightACL) != len(apiLooseACL) {
		t.Fatalf("the two ACLs must have the same length (%d, %d), so that only the content changes", len(apiTightACL), len(apiLooseACL))
	}
	if err := os.WriteFile(target, []byte(apiTightACL), 0o644); err != nil {
		t.Fatal(err)
	}
	edited := time.Now()
	var applied time.Duration
	for time.Since(edited) < 5*time.Second {
		if status("POST") == 403 && status("GET") == 200 {
			applied = time.Since(edited)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if applied == 0 {
		t.Fatalf("the tightened ACL behind the symlink was not applied within 5 s")
	}
	t.Logf("edit through the symlink applied after %s", applied)
	if applied > 2*time.Second {
		t.Fatalf("the tightened ACL behind the symlink took %s to apply, want under 2 s", applied)
	}
	if state, n, e := aclStatus(); state != "active" || n != 2 || e != "-" {
		t.Errorf("acl status after the edit: %s, %d entries, error %q; want active, 2, -", state, n, e)
	}
	var rep struct {
		Services []struct {
			Service  string    `json:"service"`
			LoadedAt time.Time `json:"loaded_at"`
		} `json:"services"`
	}
	srv.admin(t, "GET", "/v1/acl", &rep)
	if len(rep.Services) != 1 || rep.Services[0].LoadedAt.Before(edited.Add(-time.Second)) {
		t.Errorf("GET /v1/acl: %+v, want api's policy loaded after the edit (%s)", rep.Services, edited.UTC())
	}

	// A dangling link keeps the last good policy, visibly.
	if err := os.Remove(target); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "acl status reporting the dangling link", func() error {
		if state, _, e := aclStatus(); state != "stale" || !strings.Contains(e, "symbolic link to "+target+": no such file or directory") {
			return fmt.Errorf("state %s, error %q", state, e)
		}
		return nil
	})
	if post, get := status("POST"), status("GET"); post != 403 || get != 200 {
		t.Errorf("with the link dangling: POST %d, GET %d; want the last good policy's 403, 200", post, get)
	}
	if !strings.Contains(srv.out.String(), "invalid policy file") {
		t.Errorf("no log line for the dangling link")
	}
}

// TestACLCheckSignal: `acl check` stops at once on SIGTERM, in the middle of
// a long check, with a one-line message (issue 11, finding 9: it used to hang
// on a FIFO with SIGTERM caught and ignored). It also refuses a FIFO at once.
func TestACLCheckSignal(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.json")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, err := exec.CommandContext(testCtx(t, 10*time.Second), bin, "acl", "check", fifo).CombinedOutput()
	if d := time.Since(start); err == nil || d > 2*time.Second || !strings.Contains(string(out), fifo+": a named pipe (FIFO), not a regular file") {
		t.Errorf("acl check of a FIFO: %v after %s:\n%s", err, d, out)
	}

	// A few thousand regex entries take a while to validate; 200 of them
	// would keep acl check busy for tens of seconds.
	var entries []string
	for i := range 8000 {
		entries = append(entries, fmt.Sprintf(`{"permission": {"method": "GET", "resource": "/r%d/[a-z]+/[0-9]{1,4}"}, "allow": ["web"]}`, i))
	}
	many := filepath.Join(dir, "many.json")
	if err := os.WriteFile(many, []byte("["+strings.Join(entries, ",")+"]"), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"acl", "check"}
	for range 200 {
		args = append(args, many)
	}
	cmd := exec.Command(bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// Busy checking: 0.2 s of CPU used, well past start-up.
	eventually(t, 10*time.Second, "acl check busy", func() error {
		if ticks := cpuTicks(cmd.Process.Pid); ticks < 20 {
			return fmt.Errorf("%d CPU ticks", ticks)
		}
		return nil
	})
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	signalled := time.Now()
	select {
	case err := <-done:
		took := time.Since(signalled)
		t.Logf("acl check exited %s after SIGTERM: %v", took, err)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Errorf("acl check after SIGTERM: %v, want exit status 1", err)
		}
		if took > time.Second {
			t.Errorf("acl check took %s to exit after SIGTERM, want under 1 s", took)
		}
		if !regexp.MustCompile(`^sds-server: acl check interrupted after \d+ of 200 file\(s\)\n$`).MatchString(stderr.String()) {
			t.Errorf("stderr %q, want one line saying it was interrupted", stderr.String())
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("acl check still running 10 s after SIGTERM")
	}
}

// cpuTicks returns the user+system CPU time of a process in clock ticks
// (1/100 s), from /proc/PID/stat; 0 when it cannot be read.
func cpuTicks(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	return utime + stime
}
