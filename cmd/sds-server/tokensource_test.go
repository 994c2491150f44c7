package main

import (
	"fmt"
	"os"
	"testing"
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
