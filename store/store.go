// Package store keeps sds-server's persistent state (tokens, nodes, ...)
// behind one small key-value interface, so the same registries run on a bbolt
// file (the default, one writer) or on etcd (HA).
package store

import (
	"context"
	"errors"
)

// ErrNotFound is returned when a key does not exist.
var ErrNotFound = errors.New("not found")

// Store is a transactional key-value store partitioned in buckets. Values are
// opaque bytes (the registries store JSON). Implementations are safe for
// concurrent use.
type Store interface {
	// Get returns the value of key in bucket, or ErrNotFound.
	Get(ctx context.Context, bucket, key string) ([]byte, error)
	// Put sets the value of key in bucket.
	Put(ctx context.Context, bucket, key string, value []byte) error
	// Update atomically reads key (nil if absent), calls fn, and writes what
	// fn returns. If fn returns an error nothing is written and Update returns
	// it unwrapped-compatible (errors.Is works). fn may be called more than
	// once (optimistic backends) and must not have side effects.
	Update(ctx context.Context, bucket, key string, fn func(old []byte) ([]byte, error)) error
	// Delete removes key from bucket; deleting a missing key is not an error.
	Delete(ctx context.Context, bucket, key string) error
	// List calls fn for every key of bucket in key order; stop early by
	// returning an error, which List returns.
	List(ctx context.Context, bucket string, fn func(key string, value []byte) error) error
	// Close releases the store.
	Close() error
}

// Txn is one multi-key write transaction of UpdateMany: reads see the
// transaction's own writes; nothing is visible to others, or durable, until
// UpdateMany returns nil.
type Txn interface {
	// Get returns a copy of the value of key in bucket, or ErrNotFound.
	Get(bucket, key string) ([]byte, error)
	// Put sets the value of key in bucket (nil stores an empty value).
	Put(bucket, key string, value []byte) error
}

// MultiUpdater is implemented by stores that can write keys of several
// buckets in one atomic, durable transaction (Bolt, Memory), so that records
// belonging to one event (a node's admission: the token's use, the node,
// its index entry) cost one durable write and are never half written. fn may
// be called more than once and must not have side effects; if it returns an
// error nothing is written and UpdateMany returns that error as is.
type MultiUpdater interface {
	UpdateMany(ctx context.Context, fn func(tx Txn) error) error
}
