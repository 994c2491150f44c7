package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestReadTokenFilePipe reads the token from a pipe, as with
// `--token-file <(vault read ...)`, where the path is /dev/fd/N.
func TestReadTokenFilePipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := w.WriteString("  SDSTKN-1-abc\n"); err != nil {
		t.Fatal(err)
	}
	w.Close()
	got, err := readTokenFile(fmt.Sprintf("/dev/fd/%d", r.Fd()))
	if err != nil || got != "SDSTKN-1-abc" {
		t.Fatalf("readTokenFile(pipe) = %q, %v; want the trimmed token", got, err)
	}
}

// TestTokenCreateStdoutIsPrivate: `token create > FILE` leaves FILE 0600,
// and a stdout file that cannot be made private gets no token (and none is
// created).
func TestTokenCreateStdoutIsPrivate(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	startServe(t, dataDir)
	p := filepath.Join(t.TempDir(), "web.token")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var errb syncBuffer
	if code := run(ctx, []string{"token", "create", "--service", "web", "--data-dir", dataDir}, f, &errb); code != 0 {
		t.Fatalf("token create > %s: exit %d: %s", p, code, errb.String())
	}
	checkMode(t, p, 0o600)
	if b, _ := os.ReadFile(p); !strings.HasPrefix(string(b), "SDSTKN-") {
		t.Errorf("%s holds %q, want the token", p, b)
	}

	proc, err := os.OpenFile("/proc/self/comm", os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("open /proc/self/comm: %v", err)
	}
	defer proc.Close()
	var refused syncBuffer
	code := run(ctx, []string{"token", "create", "--service", "web", "--data-dir", dataDir}, proc, &refused)
	checkOneLineError(t, result{code: code, stderr: refused.String()})
	if !strings.Contains(refused.String(), "cannot be made private") {
		t.Errorf("stderr %q does not say why", refused.String())
	}
	lr := runCLI(t, "token", "list", "--data-dir", dataDir)
	if n := strings.Count(lr.stdout, "default/web"); n != 1 {
		t.Errorf("%d tokens listed, want 1: a refused token create created one\n%s", n, lr.stdout)
	}
}
