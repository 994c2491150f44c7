package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is an io.Writer the command under test and the test can share.
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

// clearSDSEnv blanks every SDS_* variable for the test: viper treats an empty
// variable as unset, so the caller's environment cannot leak into a test.
func clearSDSEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "SDS_") {
			t.Setenv(name, "") // restored after the test
			os.Unsetenv(name)  // unset, not empty: an empty SDS_* value is a value
		}
	}
}

// shortTempDir returns a fresh directory with a short path, so that a Unix
// socket inside it stays under the sun_path limit whatever the test name.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sds-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// result is the outcome of one run() call.
type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs the CLI in process with a bounded context.
func runCLI(t *testing.T, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var out, errb syncBuffer
	code := run(ctx, args, &out, &errb)
	return result{code, out.String(), errb.String()}
}

// checkOneLineError checks the exit-1 contract: one line on stderr, prefixed
// with the program name.
func checkOneLineError(t *testing.T, r result) {
	t.Helper()
	if r.code != 1 {
		t.Fatalf("exit code %d, want 1\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if !strings.HasPrefix(r.stderr, "sds-server: ") || !strings.HasSuffix(r.stderr, "\n") || strings.Count(r.stderr, "\n") != 1 {
		t.Fatalf("stderr is not exactly one 'sds-server: ...' line: %q", r.stderr)
	}
}

// checkUsageError checks the exit-2 contract: the reason and a pointer to
// --help on stderr, nothing on stdout.
func checkUsageError(t *testing.T, r result) {
	t.Helper()
	if r.code != 2 {
		t.Fatalf("exit code %d, want 2\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "sds-server: ") || !strings.Contains(lines[1], "--help") {
		t.Fatalf("stderr of a usage error = %q, want 'sds-server: <reason>' and a --help hint", r.stderr)
	}
	if r.stdout != "" {
		t.Fatalf("usage error wrote to stdout: %q", r.stdout)
	}
}

// server is an in-process `sds-server serve` started by startServe.
type server struct {
	stdout, stderr *syncBuffer
	cancel         context.CancelFunc
	done           chan int
	code           int
	stopped        bool
}

// startServe runs `serve` in process on dataDir with loopback-only, ephemeral
// listeners and no metrics listener, and waits until it reports its address.
func startServe(t *testing.T, dataDir string, extra ...string) *server {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{stdout: &syncBuffer{}, stderr: &syncBuffer{}, cancel: cancel, done: make(chan int, 1)}
	args := append([]string{"serve", "--data-dir", dataDir, "--listen-addr", "127.0.0.1:0", "--metrics-addr", ""}, extra...)
	go func() { s.done <- run(ctx, args, s.stdout, s.stderr) }()
	t.Cleanup(func() { s.stop(t) })
	deadline := time.After(15 * time.Second)
	for !strings.Contains(s.stdout.String(), "sds:") {
		select {
		case code := <-s.done:
			s.stopped, s.code = true, code
			t.Fatalf("serve exited with %d before serving\nstdout: %s\nstderr: %s", code, s.stdout, s.stderr)
		case <-deadline:
			t.Fatalf("serve did not print its address within 15s\nstdout: %s\nstderr: %s", s.stdout, s.stderr)
		case <-time.After(5 * time.Millisecond):
		}
	}
	return s
}

// stop cancels the server's context and returns its exit code.
func (s *server) stop(t *testing.T) int {
	t.Helper()
	if s.stopped {
		return s.code
	}
	s.cancel()
	select {
	case s.code = <-s.done:
		s.stopped = true
	case <-time.After(15 * time.Second):
		t.Fatalf("serve did not exit within 15s of cancellation\nstderr: %s", s.stderr)
	}
	return s.code
}

// readFiles returns the contents of every regular file under dir, by path
// relative to dir; a missing dir gives an empty map.
func readFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) && p == dir {
				return filepath.SkipDir
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = string(b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
