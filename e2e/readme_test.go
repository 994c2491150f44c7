package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
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

// Markers around the join script in README.md.
const (
	joinScriptStart = "<!-- join-script:start -->"
	joinScriptEnd   = "<!-- join-script:end -->"
)

// readmeScript returns the shell script between the markers of README.md,
// without its ```sh fence.
func readmeScript(readme, start, end string) (string, error) {
	_, rest, ok := strings.Cut(readme, start)
	if !ok {
		return "", fmt.Errorf("no %s marker", start)
	}
	block, _, ok := strings.Cut(rest, end)
	if !ok {
		return "", fmt.Errorf("no %s marker after %s", end, start)
	}
	block = strings.TrimSpace(block)
	body, ok := strings.CutPrefix(block, "```sh\n")
	if !ok {
		return "", fmt.Errorf("the block after %s does not open with a ```sh fence", start)
	}
	body, ok = strings.CutSuffix(body, "\n```")
	if !ok || strings.Contains(body, "```") {
		return "", fmt.Errorf("the block before %s is not one ```sh fence", end)
	}
	return body + "\n", nil
}

func TestReadmeScriptExtraction(t *testing.T) {
	const s, e = joinScriptStart, joinScriptEnd
	tests := []struct {
		name, in, want, err string
	}{
		{"fenced", "a\n" + s + "\n```sh\necho hi\n```\n" + e + "\nb", "echo hi\n", ""},
		{"no start", "```sh\necho hi\n```\n" + e, "", "no " + s},
		{"no end", s + "\n```sh\necho hi\n```\n", "", "no " + e},
		{"no fence", s + "\necho hi\n" + e, "", "```sh fence"},
		{"two fences", s + "\n```sh\necho 1\n```\n```sh\necho 2\n```\n" + e, "", "one ```sh fence"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readmeScript(tt.in, s, e)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("readmeScript error %v, want one saying %q", err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("readmeScript = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// freePortRun returns the first of n consecutive loopback ports, outside the
// ephemeral range, that were all free a moment ago.
func freePortRun(t *testing.T, n int) int {
	t.Helper()
	for range 50 {
		base := freePort(t)
		ok := true
		for p := base + 1; p < base+n && ok; p++ {
			l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			if err != nil {
				ok = false
				continue
			}
			l.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatalf("found no %d consecutive free loopback ports in 50 tries", n)
	return 0
}

// TestReadmeJoinScript runs README.md's "Joining a sidecar" script verbatim
// with bash from the repository root, with the built sds-server and Envoy on
// PATH, and checks that it ends in a 403 then a 200 and leaves no process
// behind.
func TestReadmeJoinScript(t *testing.T) {
	serverBin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	for _, c := range []string{"bash", "curl", "python3"} {
		if _, err := exec.LookPath(c); err != nil {
			if os.Getenv("SDS_REQUIRE_E2E") == "1" {
				t.Fatalf("the README's join script needs %s: %v", c, err)
			}
			t.Skipf("the README's join script needs %s: %v", c, err)
		}
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	script, err := readmeScript(string(readme), joinScriptStart, joinScriptEnd)
	if err != nil {
		t.Fatalf("README.md: %v", err)
	}
	path := filepath.Join(t.TempDir(), "join.sh")
	if err := os.WriteFile(path, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}

	// A fresh environment: no SDS_* setting of the caller's, the binaries
	// under test first on PATH (the script puts the repository's bin and
	// .tools/bin before them), temporary files where Go removes them.
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, "SDS_") && name != "PATH" && name != "TMPDIR" && name != "JOIN_PORT" {
			env = append(env, kv)
		}
	}
	env = append(env,
		"PATH="+strings.Join([]string{filepath.Dir(serverBin), filepath.Dir(envoyBin), os.Getenv("PATH")}, string(os.PathListSeparator)),
		"TMPDIR="+t.TempDir(),
		"JOIN_PORT="+strconv.Itoa(freePortRun(t, 6)),
	)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", path)
	cmd.Dir, cmd.Env = root, env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// On timeout, the whole process group: bash and what it started.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	elapsed := time.Since(start)
	pgid := cmd.Process.Pid
	t.Cleanup(func() { _ = syscall.Kill(-pgid, syscall.SIGKILL) })
	if err != nil {
		t.Fatalf("the README's join script failed after %s (%v; context: %v):\n%s", elapsed.Round(time.Millisecond), err, ctx.Err(), out)
	}
	t.Logf("the README's join script ran in %s:\n%s", elapsed.Round(time.Millisecond), out)

	denied := regexp.MustCompile(`(?m)^web -> api, no ACL: 403$`).FindIndex(out)
	allowed := regexp.MustCompile(`(?m)^web -> api, ACL allows web: 200$`).FindIndex(out)
	switch {
	case denied == nil:
		t.Errorf("the script's output shows no 403 before the ACL:\n%s", out)
	case allowed == nil:
		t.Errorf("the script's output shows no 200 after the ACL:\n%s", out)
	case allowed[0] < denied[0]:
		t.Errorf("the script's output shows the 200 before the 403:\n%s", out)
	}

	// Its EXIT trap stops everything it started (same process group).
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := syscall.Kill(-pgid, 0)
		if errors.Is(err, syscall.ESRCH) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes of the join script still run 10 s after it exited (kill -0: %v)", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
