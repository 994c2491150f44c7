package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func TestBolt(t *testing.T) {
	testStore(t, func(t *testing.T) Store {
		return openTestBolt(t, filepath.Join(t.TempDir(), "state.db"))
	})
}

func openTestBolt(t *testing.T, path string) *Bolt {
	t.Helper()
	s, err := OpenBolt(path)
	if err != nil {
		t.Fatalf("OpenBolt: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestBoltPersistsAcrossReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.db")
	s := openTestBolt(t, path)
	mustPut(t, s, "tokens", "t1", "token one")
	mustPut(t, s, "tokens", "t2", "token two")
	mustPut(t, s, "nodes", "n1", "node one")
	if err := s.Update(ctx, "tokens", "t1", func(old []byte) ([]byte, error) {
		return append(old, " (used)"...), nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "tokens", "t2"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openTestBolt(t, path)
	wantValue(t, s, "tokens", "t1", "token one (used)")
	wantMissing(t, s, "tokens", "t2")
	wantValue(t, s, "nodes", "n1", "node one")
}

func TestBoltFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	openTestBolt(t, path)
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o600 {
		t.Fatalf("file mode = %v, want 0600", perm)
	}
}

// TestBoltLocked checks that a second open of the same file fails fast with
// an actionable message. bbolt locks with flock(2), which belongs to the open
// file description, so a second open in the same process conflicts just like
// a second sds-server would.
func TestBoltLocked(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "state.db")
	first := openTestBolt(t, path)
	mustPut(t, first, "b", "k", "v")

	start := time.Now()
	second, err := OpenBolt(path)
	elapsed := time.Since(start)
	if err == nil {
		second.Close()
		t.Fatal("second OpenBolt on a locked file succeeded")
	}
	for _, want := range []string{path, "locked by another process", "is another sds-server running on this data dir?"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if elapsed < lockTimeout-500*time.Millisecond || elapsed > lockTimeout+time.Second {
		t.Errorf("second OpenBolt failed after %v, want about %v", elapsed, lockTimeout)
	}

	// The failed attempt must not disturb the holder, and the lock must be
	// released by Close.
	wantValue(t, first, "b", "k", "v")
	mustPut(t, first, "b", "k2", "v2")
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	third := openTestBolt(t, path)
	wantValue(t, third, "b", "k2", "v2")
}

func TestBoltMissingDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "no", "such", "dir")
	path := filepath.Join(dir, "state.db")
	s, err := OpenBolt(path)
	if err == nil {
		s.Close()
		t.Fatal("OpenBolt in a missing directory succeeded")
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("error %v is not fs.ErrNotExist", err)
	}
	for _, want := range []string{path, dir + " does not exist", "create the data dir"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("OpenBolt created %s", dir)
	}
}

func TestBoltPathIsDirectory(t *testing.T) {
	path := t.TempDir()
	s, err := OpenBolt(path)
	if err == nil {
		s.Close()
		t.Fatal("OpenBolt on a directory succeeded")
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("error %q does not name the path and the reason", err)
	}
}

func TestBoltUnreadableFile(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root ignores file permissions")
	}
	path := filepath.Join(t.TempDir(), "state.db")
	openTestBolt(t, path).Close()
	if err := os.Chmod(path, 0); err != nil {
		t.Fatal(err)
	}
	s, err := OpenBolt(path)
	if err == nil {
		s.Close()
		t.Fatal("OpenBolt on an unreadable file succeeded")
	}
	if !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q: want fs.ErrPermission naming %s", err, path)
	}
}

// TestBoltBadFiles feeds OpenBolt files that are not (whole) bbolt databases.
// bbolt v1.5 returns "invalid database" for random bytes, but on a truncated
// file it panics ("invalid freelist page") or dies on a fault that recover
// cannot catch, so these cases also guard OpenBolt's own pre-check.
func TestBoltBadFiles(t *testing.T) {
	random := func(n int) func(t *testing.T) []byte {
		return func(t *testing.T) []byte {
			b := make([]byte, n)
			rand.Read(b)
			return b
		}
	}
	valid := validDBBytes(t)
	m := readMetaBytes(t, valid)
	ps, hwm := int(m.pageSize), int(m.pgid)*int(m.pageSize)
	if hwm < 8*ps {
		t.Fatalf("test database too small: high-water mark %d bytes", hwm)
	}
	truncated := func(n int) func(t *testing.T) []byte {
		return func(t *testing.T) []byte { return bytes.Clone(valid[:n]) }
	}
	bothMetasDamaged := func(t *testing.T) []byte {
		b := bytes.Clone(valid)
		b[16+20]++ // inside meta 0 (root page id), breaks its checksum
		b[ps+16+20]++
		return b
	}

	tests := []struct {
		name    string
		content func(t *testing.T) []byte
		reason  string
	}{
		{"1 random byte", random(1), "not a valid bbolt database"},
		{"100 random bytes", random(100), "not a valid bbolt database"},
		{"4 KiB random", random(4096), "not a valid bbolt database"},
		{"64 KiB random", random(64 << 10), "not a valid bbolt database"},
		{"1 MiB random", random(1 << 20), "not a valid bbolt database"},
		{"64 KiB zeros", func(*testing.T) []byte { return make([]byte, 64<<10) }, "not a valid bbolt database"},
		{"text file", func(*testing.T) []byte { return []byte(strings.Repeat("tokens:\n  - id: t1\n", 500)) }, "not a valid bbolt database"},
		{"both meta pages damaged", bothMetasDamaged, "not a valid bbolt database"},
		{"truncated to 100 bytes", truncated(100), "not a valid bbolt database"},
		{"truncated to 1 page", truncated(ps), "not a valid bbolt database"},
		{"truncated to meta pages only", truncated(2 * ps), "truncated"},
		{"truncated to 3 pages", truncated(3 * ps), "truncated"},
		{"truncated to 4 pages", truncated(4 * ps), "truncated"},
		{"truncated to half", truncated(hwm / 2), "truncated"},
		{"truncated 1 byte short", truncated(hwm - 1), "truncated"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.db")
			content := tc.content(t)
			if err := os.WriteFile(path, content, 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := OpenBolt(path)
			if err == nil {
				s.Close()
				t.Fatal("OpenBolt succeeded on a bad file")
			}
			for _, want := range []string{"open store " + path + ": ", tc.reason} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
			}
			after, rerr := os.ReadFile(path)
			if rerr != nil || !bytes.Equal(after, content) {
				t.Errorf("OpenBolt modified the bad file (read err %v)", rerr)
			}
		})
	}
}

// TestBoltTruncatedAfterHighWaterMark checks the pre-check is not too strict:
// bbolt preallocates, so cutting the file exactly at the high-water mark
// loses nothing and must still open with all data.
func TestBoltTruncatedAfterHighWaterMark(t *testing.T) {
	valid := validDBBytes(t)
	m := readMetaBytes(t, valid)
	hwm := int(m.pgid) * int(m.pageSize)
	if hwm >= len(valid) {
		t.Skipf("file not preallocated beyond its high-water mark (%d >= %d)", hwm, len(valid))
	}
	for _, n := range []int{len(valid), hwm} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.db")
			if err := os.WriteFile(path, valid[:n], 0o600); err != nil {
				t.Fatal(err)
			}
			s := openTestBolt(t, path)
			if keys := listKeys(t, s, "b"); len(keys) != validDBKeys {
				t.Fatalf("listed %d keys, want %d", len(keys), validDBKeys)
			}
			wantValue(t, s, "b", "k01999", strings.Repeat("v", 100))
		})
	}
}

const validDBKeys = 2000

// validDBBytes returns the bytes of a closed bbolt file holding validDBKeys
// keys in bucket "b", large enough to span many pages.
func validDBBytes(t *testing.T) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "valid.db")
	s := openTestBolt(t, path)
	err := s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte("b"))
		if err != nil {
			return err
		}
		for i := range validDBKeys {
			if err := b.Put([]byte(fmt.Sprintf("k%05d", i)), bytes.Repeat([]byte("v"), 100)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readMetaBytes runs the pre-check's meta reader on a file image.
func readMetaBytes(t *testing.T, b []byte) boltMeta {
	t.Helper()
	path := filepath.Join(t.TempDir(), "image.db")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := readMeta(f, int64(len(b)))
	if err != nil {
		t.Fatalf("readMeta on a valid database: %v", err)
	}
	return m
}
