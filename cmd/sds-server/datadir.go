package main

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"

	"github.com/meshid/sds-server/issuer/local"
)

// privatePath is a path of the data dir that only the server's user may
// reach, and the widest mode it may have.
type privatePath struct {
	what string
	path string
	max  os.FileMode
	note string // said when a loose mode is fixed
}

// privatePaths lists what the data dir holds that others must not read:
// the directory itself, the state file (token digests, node records) and
// the built-in CA's directory and private keys, when they are there.
func privatePaths(dataDir string) []privatePath {
	ca := filepath.Join(dataDir, "ca")
	const keyNote = "other users could read this CA private key; if any did, replace the CA"
	paths := []privatePath{
		{what: "data dir", path: dataDir, max: 0o700},
		{what: "state file", path: filepath.Join(dataDir, "state.db"), max: 0o600},
		{what: "CA dir", path: ca, max: 0o700},
		{what: "CA key", path: filepath.Join(ca, local.RootKeyFile), max: 0o600, note: keyNote},
		{what: "CA key", path: filepath.Join(ca, local.IntermediateKeyFile), max: 0o600, note: keyNote},
	}
	// Later intermediate generations (intermediate renewal).
	gens, _ := filepath.Glob(filepath.Join(ca, "intermediate-*.key"))
	for _, g := range gens {
		paths = append(paths, privatePath{what: "CA key", path: g, max: 0o600, note: keyNote})
	}
	return paths
}

// securePermissions checks the modes of the data dir's private paths
// (data dir 0700, state file and CA keys 0600). A path open to group or
// others that belongs to the server's user is tightened, with one warning
// line each saying what changed; one that cannot be tightened (another
// user's, or chmod fails) stops the server with an error naming the path
// and its mode. Missing paths (a fresh data dir) are fine.
func securePermissions(log *slog.Logger, dataDir string) error {
	uid := os.Geteuid()
	for _, p := range privatePaths(dataDir) {
		if err := tighten(log, p, uid); err != nil {
			return err
		}
	}
	return nil
}

func tighten(log *slog.Logger, p privatePath, uid int) error {
	fi, err := os.Stat(p.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", p.what, p.path, err)
	}
	perm := fi.Mode().Perm()
	if perm&^p.max == 0 {
		return nil
	}
	want := perm & p.max
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != uid {
		return fmt.Errorf("%s %s has mode %04o, open to other users, and belongs to uid %d, not to the server's user (uid %d): make it %04o and owned by the server's user",
			p.what, p.path, perm, st.Uid, uid, p.max)
	}
	if err := os.Chmod(p.path, want); err != nil {
		return fmt.Errorf("%s %s has mode %04o, open to other users, and cannot be made %04o: %w", p.what, p.path, perm, want, err)
	}
	attrs := []any{"what", p.what, "path", p.path, "old_mode", fmt.Sprintf("%04o", perm), "new_mode", fmt.Sprintf("%04o", want)}
	if p.note != "" {
		attrs = append(attrs, "note", p.note)
	}
	log.Warn("tightened permissions", attrs...)
	return nil
}
