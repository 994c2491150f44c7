package e2e

import (
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

// TestDemo runs the `make demo` program (examples/emojivoto/demo) headless
// and checks what the README promises of it: "all sidecars serving" within
// 60 s, a certificate rotation within 2 minutes, the scripted 403, and after
// Ctrl-C (SIGINT) exit 0 with nothing left running or listening.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("the demo runs for about a minute")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	demoBin, appBin := filepath.Join(dir, "emojivoto-demo"), filepath.Join(dir, "emojivoto")
	for pkg, out := range map[string]string{"./examples/emojivoto/demo": demoBin, "./examples/emojivoto/app": appBin} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
	}

	cmd := exec.Command(demoBin, "-server-bin", bin, "-envoy-bin", envoyBin, "-app-bin", appBin,
		"-policy-dir", filepath.Join(root, "examples", "emojivoto", "policies"), "-duration", "150s")
	cmd.Dir = root
	started := time.Now()
	demo := start(t, "demo", cmd)
	// Should the test fail half-way, stop the children too: each runs in a
	// process group of its own, which stopping the demo's does not reach.
	t.Cleanup(func() {
		for _, pid := range childPIDs(demo.out.String()) {
			if processAlive(pid) {
				_ = syscall.Kill(-pid, syscall.SIGKILL)
			}
		}
	})

	waitLine := func(what string, re *regexp.Regexp, within time.Duration) []string {
		t.Helper()
		var m []string
		eventually(t, within-time.Since(started), what, func() error {
			if !demo.alive() {
				t.Fatalf("the demo exited before %s:\n%s", what, tail(demo.out.String(), 40))
			}
			if m = re.FindStringSubmatch(demo.out.String()); m == nil {
				return fmt.Errorf("no %q line yet", re)
			}
			return nil
		})
		return m
	}
	waitLine(`"all sidecars serving"`, regexp.MustCompile(`(?m)^all sidecars serving`), 60*time.Second)
	serving := time.Since(started)
	waitLine("the scripted 403", regexp.MustCompile(`(?m)^scripted: vote-bot -> voting POST /vote: 403 RBAC: access denied`), 70*time.Second)
	rot := waitLine(`a "rotated:" line`, regexp.MustCompile(`(?m)^rotated: (\S+) ([0-9a-f]+) -> ([0-9a-f]+)`), 2*time.Minute)
	rotated := time.Since(started)
	if rot[2] == rot[3] {
		t.Errorf("rotation line with the same serial on both sides: %q", rot[0])
	}
	t.Logf("all sidecars serving after %s; first rotation (%s) after %s", serving.Round(100*time.Millisecond), rot[1], rotated.Round(100*time.Millisecond))
	out := demo.out.String()
	for _, want := range []string{"spiffe://mesh.local/ns/default/sa/vote-bot", "vote-bot -> web", "--cert-ttl 60s --allow-short-ttl", "(temporary: removed on exit)"} {
		if !strings.Contains(out, want) {
			t.Errorf("the demo output lacks %q", want)
		}
	}

	// Ctrl-C: the demo alone gets it, as from a terminal (its children
	// are in process groups of their own).
	if err := syscall.Kill(demo.pid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-demo.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("the demo did not exit within 20 s of SIGINT:\n%s", tail(demo.out.String(), 20))
	}
	if code := demo.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("demo exit code %d after SIGINT, want 0:\n%s", code, tail(demo.out.String(), 20))
	}
	out = demo.out.String()

	// Nothing listening...
	m := regexp.MustCompile(`(?m)^ports: (.+)$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no ports line in the demo output")
	}
	fields := strings.Fields(m[1])
	if len(fields) < 10 {
		t.Errorf("ports line lists %d addresses, want every listener (at least 10): %q", len(fields), m[1])
	}
	for _, f := range fields {
		name, addr, ok := strings.Cut(f, "=")
		if !ok {
			t.Errorf("ports line field %q is not name=host:port", f)
			continue
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Errorf("%s (%s) still accepts connections after the demo exited", name, addr)
		}
	}
	// ... and nothing running: neither the children it reported, nor any
	// process whose command line names its temporary directory.
	pids := childPIDs(out)
	if len(pids) != 9 {
		t.Errorf("the demo reported %d children, want 9 (sds-server, 4 apps, 4 Envoys)", len(pids))
	}
	dm := regexp.MustCompile(`(?m)^data dir: (\S+)`).FindStringSubmatch(out)
	if dm == nil {
		t.Fatalf("no data dir line in the demo output")
	}
	for _, pid := range pids {
		// Alive with one of the demo's binaries or its directory in its
		// command line: not a reused PID.
		c := cmdline(pid)
		if processAlive(pid) && (strings.Contains(c, dm[1]) || strings.Contains(c, appBin) || strings.Contains(c, bin) || strings.Contains(c, envoyBin)) {
			t.Errorf("child pid %d still running after the demo exited: %s", pid, c)
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, _ := strconv.Atoi(filepath.Base(p))
		if c := cmdline(pid); strings.Contains(c, dm[1]) && processAlive(pid) {
			t.Errorf("process %d still running with the demo's directory in its command line: %s", pid, c)
		}
	}
	if _, err := os.Stat(dm[1]); err == nil {
		t.Errorf("the demo left its temporary directory %s", dm[1])
	}
	for _, want := range []string{"interrupted: stopping", "nothing left running"} {
		if !strings.Contains(out, want) {
			t.Errorf("the demo output lacks %q", want)
		}
	}
}

var startedRE = regexp.MustCompile(`(?m)^started: .+ pid=(\d+)$`)

func childPIDs(out string) []int {
	var pids []int
	for _, m := range startedRE.FindAllStringSubmatch(out, -1) {
		pid, _ := strconv.Atoi(m[1])
		pids = append(pids, pid)
	}
	return pids
}

// processAlive reports whether pid exists and is not a zombie.
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...: comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
}
