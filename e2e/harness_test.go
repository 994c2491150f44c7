// Package e2e runs sds-server with real Envoy processes on loopback.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/sds-server/internal/freeport"
)

// tool returns the path of an external binary from env, or skips the test
// (fails it under `make test`, which sets SDS_REQUIRE_E2E=1 after installing
// everything).
func tool(t *testing.T, env, rel string) string {
	t.Helper()
	p := os.Getenv(env)
	if p == "" {
		p, _ = filepath.Abs(filepath.Join("..", rel))
	}
	if _, err := os.Stat(p); err != nil {
		if os.Getenv("SDS_REQUIRE_E2E") == "1" {
			t.Fatalf("%s not found at %s (run `make tools build`)", env, p)
		}
		t.Skipf("%s not found at %s; run `make e2e`", env, p)
	}
	return p
}

// ports hands out the loopback ports of the processes the tests start.
var ports freeport.Picker

// freePort returns a loopback TCP port that was free a moment ago, outside
// the ephemeral range so no outgoing connection can take it before the
// process that is told it binds it (see internal/freeport).
func freePort(t *testing.T) int {
	t.Helper()
	p, err := ports.Pick()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// syncBuffer is a goroutine-safe log sink for a child process.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is a child process the test owns; it is killed at cleanup and its
// output dumped if the test failed.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

func start(t *testing.T, name string, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{name: name, cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("---- %s output ----\n%s", name, tail(p.out.String(), 60))
		}
	})
	return p
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM, then SIGKILL after 5 s.
func (p *proc) stop() {
	if !p.alive() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// eventually polls cond every 100 ms until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s: %v", what, timeout, err)
}

// server is a running `sds-server serve`.
type server struct {
	*proc
	bin, dataDir, addr, metrics string
	dir                         string
	args                        []string
}

var listenRE = regexp.MustCompile(`(?m)^\s+sds:\s+(\S+)`)

// startServer runs sds-server serve in a temp data dir with extra args and
// waits until it prints where it listens.
func startServer(t *testing.T, bin string, extra ...string) *server {
	t.Helper()
	dir := t.TempDir()
	s := &server{bin: bin, dataDir: filepath.Join(dir, "data"), metrics: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	args := []string{"serve", "--data-dir", s.dataDir, "--listen-addr", "127.0.0.1:0", "--metrics-addr", s.metrics}
	if !slices.ContainsFunc(extra, func(a string) bool { return strings.HasPrefix(a, "--default-policy") }) {
		// Tests of identity and rotation are not about ACLs: let every mesh
		// identity through unless the test says otherwise.
		args = append(args, "--default-policy", "allow")
	}
	s.args = append(args, extra...)
	s.dir = dir
	s.launch(t)
	return s
}

// restart stops the server and starts it again on the same data dir and
// listen address, as an operator's restart would.
func (s *server) restart(t *testing.T) {
	t.Helper()
	s.stop()
	for i, a := range s.args {
		if a == "--listen-addr" {
			s.args[i+1] = s.addr
		}
	}
	s.launch(t)
}

func (s *server) launch(t *testing.T) {
	t.Helper()
	cmd := exec.Command(s.bin, s.args...)
	cmd.Dir = s.dir
	s.proc = start(t, "sds-server", cmd)
	eventually(t, 15*time.Second, "sds-server listening", func() error {
		if !s.alive() {
			t.Fatalf("sds-server exited:\n%s", s.out.String())
		}
		m := listenRE.FindStringSubmatch(s.out.String())
		if m == nil {
			return fmt.Errorf("no listen line yet")
		}
		s.addr = m[1]
		return nil
	})
}

// admin calls the server's admin API over its Unix socket and decodes the
// JSON answer into out.
func (s *server) admin(t *testing.T, method, path string, out any) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", filepath.Join(s.dataDir, "admin.sock"))
		}}}
	req, _ := http.NewRequest(method, "http://sds-server"+path, nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("admin %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		t.Fatalf("admin %s %s: %s %s", method, path, resp.Status, b)
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("admin %s %s: %v", method, path, err)
	}
}

// cli runs an sds-server subcommand against the server's data dir and
// returns stdout; it fails the test on a non-zero exit.
func (s *server) cli(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := s.cliResult(args...)
	if code != 0 {
		t.Fatalf("sds-server %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

func (s *server) cliResult(args ...string) (stdout, stderr string, code int) {
	args = append(args, "--data-dir", s.dataDir)
	cmd := exec.Command(s.bin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
		e.WriteString(err.Error())
	}
	return o.String(), e.String(), code
}

// envoy is a running Envoy sidecar.
type envoy struct {
	*proc
	admin string
}

// startEnvoy runs Envoy on config and waits until its admin says LIVE.
func startEnvoy(t *testing.T, bin, name, config, admin string) *envoy {
	t.Helper()
	cmd := exec.Command(bin, "-c", config, "--use-dynamic-base-id", "-l", "info", "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v")
	e := &envoy{proc: start(t, "envoy "+name, cmd), admin: admin}
	eventually(t, 30*time.Second, "envoy "+name+" live", func() error {
		if !e.alive() {
			t.Fatalf("envoy %s exited:\n%s", name, tail(e.out.String(), 40))
		}
		body, err := httpGet("http://" + admin + "/ready")
		if err != nil {
			return err
		}
		if strings.TrimSpace(body) != "LIVE" {
			return fmt.Errorf("state %q", strings.TrimSpace(body))
		}
		return nil
	})
	return e
}

var plainClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func httpGet(url string) (string, error) {
	resp, err := plainClient.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), err
}

// lines splits non-empty output lines.
func lines(s string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// testCtx returns a context bounded by the test's deadline.
func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// runCmd runs a command and returns its combined output.
func runCmd(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// background runs functions on tickers (traffic, pollers) until stop, which
// waits for them; stop also runs at cleanup. Every loop is bounded by the
// test's life.
type background struct {
	done chan struct{}
	wg   sync.WaitGroup
	stop func()
}

func newBackground(t *testing.T) *background {
	b := &background{done: make(chan struct{})}
	b.stop = sync.OnceFunc(func() { close(b.done); b.wg.Wait() })
	t.Cleanup(b.stop)
	return b
}

// every calls f every d until stop.
func (b *background) every(d time.Duration, f func()) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		tick := time.NewTicker(d)
		defer tick.Stop()
		for {
			select {
			case <-b.done:
				return
			case <-tick.C:
				f()
			}
		}
	}()
}
