package store

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Memory is an in-memory Store for unit tests of packages that use a Store.
// It behaves like Bolt (same ordering, errors and copy semantics, checked by
// the shared test suite) but keeps nothing across restarts. Safe for
// concurrent use.
type Memory struct {
	mu      sync.Mutex
	buckets map[string]map[string][]byte
	closed  bool
}

var _ Store = (*Memory)(nil)

// NewMemory returns an empty in-memory store.
func NewMemory() *Memory {
	return &Memory{buckets: make(map[string]map[string][]byte)}
}

// Get returns a copy of the value of key in bucket, or ErrNotFound.
func (m *Memory) Get(ctx context.Context, bucket, key string) ([]byte, error) {
	if err := m.begin(ctx, bucket, key); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	v, ok := m.buckets[bucket][key]
	if !ok {
		return nil, ErrNotFound
	}
	return clone(v), nil
}

// Put stores a copy of value (nil is stored as an empty value).
func (m *Memory) Put(ctx context.Context, bucket, key string, value []byte) error {
	if err := m.begin(ctx, bucket, key); err != nil {
		return err
	}
	defer m.mu.Unlock()
	m.set(bucket, key, value)
	return nil
}

// Update calls fn once under the store's lock with a copy of the current
// value (nil if absent) and stores a copy of the result; a nil result deletes
// the key, an error from fn leaves the store unchanged and is returned as is.
// fn must not call back into the store (it would deadlock).
func (m *Memory) Update(ctx context.Context, bucket, key string, fn func(old []byte) ([]byte, error)) error {
	if err := m.begin(ctx, bucket, key); err != nil {
		return err
	}
	defer m.mu.Unlock()
	var old []byte
	if v, ok := m.buckets[bucket][key]; ok {
		old = clone(v)
	}
	val, err := fn(old)
	if err != nil {
		return err
	}
	if val == nil {
		delete(m.buckets[bucket], key)
		return nil
	}
	m.set(bucket, key, val)
	return nil
}

// UpdateMany runs fn with the store locked (MultiUpdater): its writes are
// applied together if it returns nil, none of them otherwise. fn must not
// call back into the store (it would deadlock).
func (m *Memory) UpdateMany(ctx context.Context, fn func(tx Txn) error) error {
	if err := m.begin(ctx, "-", "-"); err != nil {
		return err
	}
	defer m.mu.Unlock()
	t := &memTxn{m: m, writes: map[[2]string][]byte{}}
	if err := fn(t); err != nil {
		return err
	}
	for k, v := range t.writes {
		m.set(k[0], k[1], v)
	}
	return nil
}

// memTxn buffers UpdateMany's writes; m.mu is held.
type memTxn struct {
	m      *Memory
	writes map[[2]string][]byte
}

func (t *memTxn) Get(bucket, key string) ([]byte, error) {
	if err := checkNames(bucket, key); err != nil {
		return nil, err
	}
	if v, ok := t.writes[[2]string{bucket, key}]; ok {
		return clone(v), nil
	}
	if v, ok := t.m.buckets[bucket][key]; ok {
		return clone(v), nil
	}
	return nil, ErrNotFound
}

func (t *memTxn) Put(bucket, key string, value []byte) error {
	if err := checkNames(bucket, key); err != nil {
		return err
	}
	t.writes[[2]string{bucket, key}] = clone(value)
	return nil
}

// Delete removes key from bucket; a missing key is not an error.
func (m *Memory) Delete(ctx context.Context, bucket, key string) error {
	if err := m.begin(ctx, bucket, key); err != nil {
		return err
	}
	defer m.mu.Unlock()
	delete(m.buckets[bucket], key)
	return nil
}

// List snapshots bucket, then calls fn for each key in byte-wise order
// without holding the lock, so fn may call back into the store. Values are
// copies. fn's error stops the listing and is returned as is.
func (m *Memory) List(ctx context.Context, bucket string, fn func(key string, value []byte) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if bucket == "" {
		return fmt.Errorf("store: list: %w", errEmptyName)
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return fmt.Errorf("memory store: list %s: %w", bucket, errClosed)
	}
	b := m.buckets[bucket]
	kvs := make([]kv, 0, len(b))
	for k, v := range b {
		kvs = append(kvs, kv{key: k, value: clone(v)})
	}
	m.mu.Unlock()
	// Go compares strings byte-wise, like bbolt compares keys.
	slices.SortFunc(kvs, func(a, b kv) int { return strings.Compare(a.key, b.key) })
	return callList(ctx, kvs, fn)
}

// Close marks the store closed; later calls fail. Closing twice is fine.
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	m.buckets = nil
	return nil
}

// begin validates the call and, on success, returns with m.mu held.
func (m *Memory) begin(ctx context.Context, bucket, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkNames(bucket, key); err != nil {
		return err
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return fmt.Errorf("memory store: %s/%s: %w", bucket, key, errClosed)
	}
	if err := ctx.Err(); err != nil { // cancelled while waiting for the lock
		m.mu.Unlock()
		return err
	}
	return nil
}

// set stores a copy of value; the caller holds m.mu.
func (m *Memory) set(bucket, key string, value []byte) {
	b := m.buckets[bucket]
	if b == nil {
		b = make(map[string][]byte)
		m.buckets[bucket] = b
	}
	b[key] = clone(value)
}
