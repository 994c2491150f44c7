package store

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// lockTimeout bounds how long OpenBolt waits for the exclusive file lock, so a
// second sds-server pointed at the same data dir fails fast instead of
// hanging forever (bbolt's default).
const lockTimeout = 2 * time.Second

// errClosed is returned (wrapped) by every operation on a closed store.
var errClosed = errors.New("store is closed")

// errEmptyName is returned (wrapped) when a bucket or key is empty: bbolt
// cannot store empty names, and Memory rejects them too so both backends
// behave the same.
var errEmptyName = errors.New("bucket and key must be non-empty")

// Bolt is the single-node Store backed by one bbolt file. bbolt takes an
// exclusive lock on the file, so only one process (one sds-server) can use a
// data dir at a time. Bolt is safe for concurrent use; writes are serialised
// by bbolt's single writer.
type Bolt struct {
	db   *bolt.DB
	path string
}

var (
	_ Store        = (*Bolt)(nil)
	_ MultiUpdater = (*Bolt)(nil)
)

// OpenBolt opens the bbolt file at path, creating it with mode 0600 if it
// does not exist. The directory must already exist (the caller owns the data
// dir). If another process holds the file, OpenBolt gives up after 2 s with
// an error saying so. A file that is not a bbolt database, or is truncated,
// is rejected with an error naming the path instead of being opened: bbolt
// itself would panic or crash the process on a truncated file.
func OpenBolt(path string) (*Bolt, error) {
	if err := checkBoltFile(path); err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: lockTimeout})
	if err != nil {
		switch {
		case errors.Is(err, bolt.ErrTimeout):
			return nil, fmt.Errorf("open store %s: locked by another process (is another sds-server running on this data dir?): %w", path, err)
		case errors.Is(err, bolt.ErrInvalid), errors.Is(err, bolt.ErrChecksum):
			return nil, fmt.Errorf("open store %s: not a valid bbolt database (corrupt file? restore it from a backup or move it away): %w", path, err)
		case errors.Is(err, bolt.ErrVersionMismatch):
			return nil, fmt.Errorf("open store %s: written by an incompatible bbolt version: %w", path, err)
		}
		return nil, fmt.Errorf("open store %s: %w", path, unwrapPathError(err))
	}
	return &Bolt{db: db, path: path}, nil
}

// Get returns a copy of the value of key in bucket, or ErrNotFound if the key
// or the bucket does not exist.
func (s *Bolt) Get(ctx context.Context, bucket, key string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkNames(bucket, key); err != nil {
		return nil, err
	}
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucket))
		if b == nil {
			return ErrNotFound
		}
		v := b.Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		out = clone(v) // v points into the mmap and dies with the tx
		return nil
	})
	if errors.Is(err, ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, s.wrap("get", bucket, key, err)
	}
	return out, nil
}

// Put sets the value of key in bucket, creating the bucket if needed. A nil
// value is stored as an empty value (use Delete to remove a key). If ctx is
// cancelled while waiting for the write lock, nothing is written and
// ctx.Err() is returned. Like every write here it goes through bbolt's
// group commit (see write): it returns once the value is durable.
func (s *Bolt) Put(ctx context.Context, bucket, key string, value []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkNames(bucket, key); err != nil {
		return err
	}
	err := s.write(func(tx *bolt.Tx) error {
		if err := ctx.Err(); err != nil {
			return err // cancelled while waiting for the write lock
		}
		b, err := tx.CreateBucketIfNotExists([]byte(bucket))
		if err != nil {
			return err
		}
		if value == nil {
			value = []byte{}
		}
		return b.Put([]byte(key), value)
	})
	if err != nil {
		if err == ctx.Err() {
			return err
		}
		return s.wrap("put", bucket, key, err)
	}
	return nil
}

// Update runs fn in one bbolt read-write transaction, so it is atomic and
// serialised with every other write. Concurrent writes share one commit
// (see write), so fn may be called more than once (Store's contract: no side
// effects); each call sees the state it is applied to. fn receives
// a private copy of the current value (nil if the key is absent; a present
// empty value is a non-nil empty slice). fn's result is written; a nil result
// deletes the key. If fn returns an error nothing is written and that error
// is returned as is. If ctx is cancelled while waiting for the write lock,
// nothing is written and ctx.Err() is returned.
func (s *Bolt) Update(ctx context.Context, bucket, key string, fn func(old []byte) ([]byte, error)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkNames(bucket, key); err != nil {
		return err
	}
	var fnErr error
	err := s.write(func(tx *bolt.Tx) error {
		fnErr = nil
		if err := ctx.Err(); err != nil {
			fnErr = err // cancelled while waiting for the write lock
			return err
		}
		b := tx.Bucket([]byte(bucket))
		var old []byte
		if b != nil {
			if v := b.Get([]byte(key)); v != nil {
				old = clone(v) // fn may keep or modify it; the mmap is read-only
			}
		}
		val, err := fn(old)
		if err != nil {
			fnErr = err
			return err
		}
		if val == nil {
			if b == nil {
				return nil // deleting from a missing bucket: nothing to do
			}
			return b.Delete([]byte(key))
		}
		if b == nil {
			if b, err = tx.CreateBucketIfNotExists([]byte(bucket)); err != nil {
				return err
			}
		}
		return b.Put([]byte(key), val)
	})
	if err != nil {
		if fnErr != nil && err == fnErr {
			return err // the caller's own error (or ctx's), unwrapped
		}
		return s.wrap("update", bucket, key, err)
	}
	return nil
}

// Delete removes key from bucket. Deleting a missing key, or from a missing
// bucket, is not an error. Like Put, it gives up with ctx.Err() if ctx is
// cancelled while it waits for the write lock.
func (s *Bolt) Delete(ctx context.Context, bucket, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkNames(bucket, key); err != nil {
		return err
	}
	err := s.write(func(tx *bolt.Tx) error {
		if err := ctx.Err(); err != nil {
			return err // cancelled while waiting for the write lock
		}
		b := tx.Bucket([]byte(bucket))
		if b == nil {
			return nil
		}
		return b.Delete([]byte(key))
	})
	if err != nil {
		if err == ctx.Err() {
			return err
		}
		return s.wrap("delete", bucket, key, err)
	}
	return nil
}

// write runs fn in a read-write transaction through bbolt's Batch: writes
// arriving together (many sidecars admitted at once) share one commit and
// one fsync instead of queueing for one each behind bbolt's single writer.
// The durability is the same as db.Update: write returns only after the
// commit holding fn's changes is on disk, and returns fn's error (then
// nothing of fn's is written). The price is that fn may run more than once
// (a batch that fails is retried, the failing function alone), which the
// Store contract allows; and that a lone write waits up to
// bolt.DefaultMaxBatchDelay (10 ms) for company.
func (s *Bolt) write(fn func(tx *bolt.Tx) error) error {
	return s.db.Batch(fn)
}

// UpdateMany runs fn in one read-write transaction (MultiUpdater): all of
// its writes are committed together, durably, or none is. fn may be called
// more than once; its error is returned as is and writes nothing.
func (s *Bolt) UpdateMany(ctx context.Context, fn func(tx Txn) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var fnErr error
	err := s.write(func(tx *bolt.Tx) error {
		fnErr = nil
		if err := ctx.Err(); err != nil {
			fnErr = err
			return err
		}
		if err := fn(boltTxn{tx}); err != nil {
			fnErr = err
			return err
		}
		return nil
	})
	if err != nil {
		if fnErr != nil && err == fnErr {
			return err
		}
		return fmt.Errorf("store %s: update: %w", s.path, err)
	}
	return nil
}

// boltTxn is the Txn of one bbolt transaction.
type boltTxn struct{ tx *bolt.Tx }

func (t boltTxn) Get(bucket, key string) ([]byte, error) {
	if err := checkNames(bucket, key); err != nil {
		return nil, err
	}
	b := t.tx.Bucket([]byte(bucket))
	if b == nil {
		return nil, ErrNotFound
	}
	v := b.Get([]byte(key))
	if v == nil {
		return nil, ErrNotFound
	}
	return clone(v), nil
}

func (t boltTxn) Put(bucket, key string, value []byte) error {
	if err := checkNames(bucket, key); err != nil {
		return err
	}
	b, err := t.tx.CreateBucketIfNotExists([]byte(bucket))
	if err != nil {
		return fmt.Errorf("bucket %s: %w", bucket, err)
	}
	if value == nil {
		value = []byte{}
	}
	return b.Put([]byte(key), value)
}

// List calls fn for every key of bucket in byte-wise key order. It reads a
// consistent snapshot of the bucket in one read transaction and then calls fn
// outside of it, so fn may call back into the store (even write) without
// deadlocking, and may keep the values it is given (they are copies). A
// missing bucket lists nothing. If fn returns an error, List stops and
// returns it as is; List also stops with ctx.Err() if ctx is cancelled.
func (s *Bolt) List(ctx context.Context, bucket string, fn func(key string, value []byte) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if bucket == "" {
		return fmt.Errorf("store: list: %w", errEmptyName)
	}
	var kvs []kv
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucket))
		if b == nil {
			return nil
		}
		c := b.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if v == nil {
				continue // a nested bucket; this package never creates them
			}
			kvs = append(kvs, kv{key: string(k), value: clone(v)})
		}
		return nil
	})
	if err != nil {
		return s.wrap("list", bucket, "", err)
	}
	return callList(ctx, kvs, fn)
}

// Close releases the file lock and the mmap. It waits for running
// transactions to finish. Closing twice is not an error; any other use after
// Close fails.
func (s *Bolt) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close store %s: %w", s.path, err)
	}
	return nil
}

// wrap adds the operation, the location and the file to a bbolt error.
func (s *Bolt) wrap(op, bucket, key string, err error) error {
	if errors.Is(err, bolt.ErrDatabaseNotOpen) {
		err = fmt.Errorf("%w (%w)", errClosed, err)
	}
	where := bucket
	if key != "" {
		where += "/" + key
	}
	return fmt.Errorf("store %s: %s %s: %w", s.path, op, where, err)
}

// kv is one entry of a List snapshot.
type kv struct {
	key   string
	value []byte
}

// callList feeds a List snapshot to fn, stopping on fn's error or on ctx.
func callList(ctx context.Context, kvs []kv, fn func(key string, value []byte) error) error {
	for _, e := range kvs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(e.key, e.value); err != nil {
			return err
		}
	}
	return nil
}

// checkNames rejects empty bucket and key names.
func checkNames(bucket, key string) error {
	if bucket == "" || key == "" {
		return fmt.Errorf("store: bucket %q key %q: %w", bucket, key, errEmptyName)
	}
	return nil
}

// clone returns a copy of b that is non-nil even when b is empty, so that a
// present empty value stays distinguishable from an absent one.
func clone(b []byte) []byte {
	return append([]byte{}, b...)
}

// unwrapPathError drops the *fs.PathError layer (whose message repeats the
// path we already print) but keeps the underlying error for errors.Is.
func unwrapPathError(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// bbolt on-disk format (go.etcd.io/bbolt/internal/common, file format
// version 2): every page starts with a 16-byte header, and pages 0 and 1
// hold the meta record, whose fields are in native byte order.
const (
	boltMagic      = 0xED0CDAED
	boltVersion    = 2
	pageHeaderSize = 16
	metaSize       = 56 // magic .. txid; the 8-byte checksum follows
	minPageSize    = 1024
)

// boltMeta is the part of a bbolt meta page that checkBoltFile needs.
type boltMeta struct {
	pageSize uint32
	freelist uint64
	root     uint64
	pgid     uint64 // high-water mark: pages [0, pgid) are in use
	txid     uint64
}

// checkBoltFile validates an existing store file before bbolt maps it.
//
// bbolt v1.5 returns clean errors for files whose meta pages are invalid, but
// a truncated file with intact meta pages makes it read pages past the end of
// the file: it panics, or the mmap access faults and the runtime kills the
// process (recover cannot catch that). So we read the meta pages ourselves,
// pick the one bbolt would use, and refuse files shorter than the meta's
// high-water mark. The read is safe without the file lock: bbolt only grows
// the file, and writes data pages before the meta page that references them.
//
// A missing file is fine (bbolt creates it) as long as its directory exists.
func checkBoltFile(path string) error {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		dir := filepath.Dir(path)
		dst, derr := os.Stat(dir)
		if derr != nil {
			if errors.Is(derr, fs.ErrNotExist) {
				return fmt.Errorf("directory %s does not exist (create the data dir first): %w", dir, unwrapPathError(derr))
			}
			return fmt.Errorf("cannot access directory %s: %w", dir, unwrapPathError(derr))
		}
		if !dst.IsDir() {
			return fmt.Errorf("%s is not a directory", dir)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("cannot access the file: %w", unwrapPathError(err))
	}
	if st.IsDir() {
		return errors.New("is a directory, want a bbolt file")
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("is not a regular file (mode %v)", st.Mode())
	}
	size := st.Size()
	if size == 0 {
		return nil // bbolt initialises empty files
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cannot read the file: %w", unwrapPathError(err))
	}
	defer f.Close()

	m, err := readMeta(f, size)
	if err != nil {
		return err
	}
	hwm := m.pgid * uint64(m.pageSize)
	if m.pgid < 4 || m.root >= m.pgid || (m.freelist >= m.pgid && m.freelist != ^uint64(0)) {
		return fmt.Errorf("corrupt bbolt metadata (high-water page %d, root page %d, freelist page %d); restore the file from a backup or move it away", m.pgid, m.root, m.freelist)
	}
	if uint64(size) < hwm {
		return fmt.Errorf("truncated bbolt file: %d bytes but its metadata references %d bytes (incomplete copy or full disk?); restore the file from a backup or move it away", size, hwm)
	}
	return nil
}

// readMeta returns the meta record bbolt would use: the valid one of pages 0
// and 1 with the highest transaction id. It finds the page size like bbolt
// does: from meta page 0, or else by probing for meta page 1 at every
// supported page size.
func readMeta(f *os.File, size int64) (boltMeta, error) {
	notBolt := func(why string) error {
		return fmt.Errorf("not a valid bbolt database (%s); restore the file from a backup or move it away", why)
	}
	if size < 2*minPageSize {
		return boltMeta{}, notBolt(fmt.Sprintf("only %d bytes", size))
	}
	m0, err0 := readMetaAt(f, 0)
	var pageSize uint32
	if err0 == nil {
		pageSize = m0.pageSize
	} else {
		for ps := int64(minPageSize); ps <= 16<<20 && ps < size-minPageSize; ps <<= 1 {
			if m1, err := readMetaAt(f, ps); err == nil && int64(m1.pageSize) == ps {
				pageSize = m1.pageSize
				break
			}
		}
		if pageSize == 0 {
			return boltMeta{}, notBolt(fmt.Sprintf("no valid meta page: %v", err0))
		}
	}
	if pageSize < minPageSize || pageSize&(pageSize-1) != 0 {
		return boltMeta{}, notBolt(fmt.Sprintf("page size %d", pageSize))
	}
	if size < 2*int64(pageSize) {
		return boltMeta{}, notBolt(fmt.Sprintf("only %d bytes with %d-byte pages", size, pageSize))
	}
	m1, err1 := readMetaAt(f, int64(pageSize))
	switch {
	case err0 == nil && err1 == nil:
		if m1.txid > m0.txid {
			return m1, nil
		}
		return m0, nil
	case err0 == nil:
		return m0, nil
	case err1 == nil:
		return m1, nil
	}
	return boltMeta{}, notBolt(fmt.Sprintf("both meta pages invalid: %v; %v", err0, err1))
}

// readMetaAt decodes and validates the meta page at offset off.
func readMetaAt(f *os.File, off int64) (boltMeta, error) {
	var buf [pageHeaderSize + metaSize + 8]byte
	if _, err := f.ReadAt(buf[:], off); err != nil {
		if errors.Is(err, io.EOF) {
			return boltMeta{}, errors.New("meta page cut short")
		}
		return boltMeta{}, fmt.Errorf("read meta page: %w", unwrapPathError(err))
	}
	m := buf[pageHeaderSize:]
	ne := binary.NativeEndian
	if ne.Uint32(m[0:]) != boltMagic {
		return boltMeta{}, errors.New("bad magic")
	}
	if v := ne.Uint32(m[4:]); v != boltVersion {
		return boltMeta{}, fmt.Errorf("unsupported format version %d", v)
	}
	h := fnv.New64a()
	h.Write(m[:metaSize])
	if ne.Uint64(m[metaSize:]) != h.Sum64() {
		return boltMeta{}, errors.New("meta checksum mismatch")
	}
	return boltMeta{
		pageSize: ne.Uint32(m[8:]),
		root:     ne.Uint64(m[16:]),
		freelist: ne.Uint64(m[32:]),
		pgid:     ne.Uint64(m[40:]),
		txid:     ne.Uint64(m[48:]),
	}, nil
}
