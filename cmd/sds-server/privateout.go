package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
)

// privateStdout is called before a secret (a bootstrap holding a token) is
// written to w. When w is a regular file (stdout redirected to a file), it
// takes away every permission of group and others, so the secret is never
// written into a file others can read. A failure means nothing may be
// written: the caller refuses. Terminals and pipes are left alone.
func privateStdout(w io.Writer) error {
	f, ok := w.(*os.File)
	if !ok {
		return nil
	}
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stdout: %w", err)
	}
	perm := fi.Mode().Perm()
	if !fi.Mode().IsRegular() || perm&^0o600 == 0 {
		return nil
	}
	if err := f.Chmod(perm & 0o600); err != nil {
		return fmt.Errorf("stdout is the file %s with mode %04o and cannot be made private (%v); nothing was written: use -o FILE, which writes mode 0600",
			fdPath(f), perm, err)
	}
	return nil
}

// fdPath names the file behind f for messages: os.Stdout's own name is
// "/dev/stdout", which says nothing.
func fdPath(f *os.File) string {
	if p, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(f.Fd()))); err == nil {
		return p
	}
	return f.Name()
}
