package sds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/meshid/sds-server/store"
)

// Buckets of the node registry in the store.
const (
	bucketNodes     = "nodes"
	bucketNodeIndex = "node_index"
)

// NodeStatus is the lifecycle state of a node.
type NodeStatus string

// Node statuses.
const (
	NodeActive  NodeStatus = "active"
	NodeRevoked NodeStatus = "revoked"
)

// Node is the registry record of one admitted sidecar. Its ID is random and
// assigned by the server at admission; the sidecar's own node.id is kept only
// to recognise it when it reconnects with the same token.
type Node struct {
	ID        string     `json:"id"`
	Service   string     `json:"service"`
	Env       string     `json:"env"`
	TokenID   string     `json:"token_id"`
	ClaimedID string     `json:"claimed_node_id"`
	Status    NodeStatus `json:"status"`
	FirstSeen time.Time  `json:"first_seen"`
	LastSeen  time.Time  `json:"last_seen"`
	// AdmittedAt is when the token last admitted the node: when it first
	// joined, or when it came back after its certificates expired
	// (readmit.go). Zero in records older than the field: FirstSeen then.
	AdmittedAt time.Time `json:"admitted_at,omitzero"`
	// IssuedSerial and IssuedNotAfter describe the newest certificate issued.
	IssuedSerial   string    `json:"issued_serial,omitempty"`
	IssuedNotAfter time.Time `json:"issued_not_after,omitzero"`
	// ServingSerial and ServingNotAfter describe the certificate Envoy last
	// acknowledged: what the sidecar actually serves.
	ServingSerial   string    `json:"serving_serial,omitempty"`
	ServingNotAfter time.Time `json:"serving_not_after,omitzero"`
	// Certs are the certificates issued to the node that have not expired.
	Certs []IssuedCert `json:"certs,omitempty"`
	// RevokedAt and RevokeReason are set when the node is revoked.
	RevokedAt    time.Time `json:"revoked_at,omitzero"`
	RevokeReason string    `json:"revoke_reason,omitempty"`
}

// indexKey identifies a sidecar across reconnections: the token it presents
// and the node.id it claims. A claimed ID never selects another token's node.
func indexKey(tokenID, claimedID string) string { return tokenID + "/" + claimedID }

// newNodeID returns a random 80-bit node ID in hex.
func newNodeID() (string, error) {
	var b [10]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate node ID: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// nodeRegistry persists node records and serialises the admission of each
// sidecar, so that the several streams one Envoy opens at once bind to one
// node, while different sidecars are admitted in parallel.
type nodeRegistry struct {
	kv    store.Store
	now   func() time.Time
	locks keyLocks // by index key: lookup-or-create of one sidecar, prune
}

// lookup returns the node a (token, claimed ID) pair was bound to, if any.
func (r *nodeRegistry) lookup(ctx context.Context, tokenID, claimedID string) (*Node, error) {
	id, err := r.kv.Get(ctx, bucketNodeIndex, indexKey(tokenID, claimedID))
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("look up node: %w", err)
	}
	return r.get(ctx, string(id))
}

// get returns a node by ID.
func (r *nodeRegistry) get(ctx context.Context, id string) (*Node, error) {
	b, err := r.kv.Get(ctx, bucketNodes, id)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", id, err)
	}
	var n Node
	if err := json.Unmarshal(b, &n); err != nil {
		return nil, fmt.Errorf("node %s: corrupt record: %w", id, err)
	}
	return &n, nil
}

// bind returns the node bound to (tokenID, claimedID), creating it with
// create if there is none, or passing the one there is to back, which
// returns it (or its updated record) or refuses it. create and back run
// under the sidecar's lock, so its several streams see one decision; they
// may refuse (the token's expiry or use limit) and must not call the CA.
//
// On a store with multi-key transactions (store.MultiUpdater: bbolt), a new
// node's record, its index entry and what create writes in tx (the token's
// use) are one transaction: one durable commit, shared with the other
// sidecars admitted at the same moment, and never half written; create may
// then run more than once and must have no side effect but on tx. On other
// stores create gets a nil tx, makes its own writes, and the node and its
// index are written after them (a crash can lose a use, never count a node
// without one).
func (r *nodeRegistry) bind(ctx context.Context, tokenID, claimedID string, create func(tx store.Txn) (*Node, error), back func(*Node) (*Node, error)) (*Node, bool, error) {
	key := indexKey(tokenID, claimedID)
	defer r.locks.lock(key)()
	n, err := r.lookup(ctx, tokenID, claimedID)
	if err != nil {
		return nil, false, err
	}
	if n != nil {
		n, err = back(n)
		return n, false, err
	}
	mu, ok := r.kv.(store.MultiUpdater)
	if !ok {
		if n, err = create(nil); err != nil {
			return nil, false, err
		}
		if err := r.put(ctx, n); err != nil {
			return nil, false, err
		}
		if err := r.kv.Put(ctx, bucketNodeIndex, key, []byte(n.ID)); err != nil {
			return nil, false, fmt.Errorf("index node %s: %w", n.ID, err)
		}
		return n, true, nil
	}
	err = mu.UpdateMany(ctx, func(tx store.Txn) error {
		n = nil
		c, err := create(tx)
		if err != nil {
			return err
		}
		b, err := json.Marshal(c)
		if err != nil {
			return fmt.Errorf("encode node %s: %w", c.ID, err)
		}
		if err := tx.Put(bucketNodes, c.ID, b); err != nil {
			return fmt.Errorf("save node %s: %w", c.ID, err)
		}
		if err := tx.Put(bucketNodeIndex, key, []byte(c.ID)); err != nil {
			return fmt.Errorf("index node %s: %w", c.ID, err)
		}
		n = c
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	return n, true, nil
}

func (r *nodeRegistry) put(ctx context.Context, n *Node) error {
	b, err := json.Marshal(n)
	if err != nil {
		return fmt.Errorf("encode node %s: %w", n.ID, err)
	}
	if err := r.kv.Put(ctx, bucketNodes, n.ID, b); err != nil {
		return fmt.Errorf("save node %s: %w", n.ID, err)
	}
	return nil
}

// update applies fn to the stored node atomically and returns the result.
func (r *nodeRegistry) update(ctx context.Context, id string, fn func(*Node) error) (*Node, error) {
	var out Node
	err := r.kv.Update(ctx, bucketNodes, id, func(old []byte) ([]byte, error) {
		if old == nil {
			return nil, fmt.Errorf("node %s: %w", id, store.ErrNotFound)
		}
		out = Node{}
		if err := json.Unmarshal(old, &out); err != nil {
			return nil, fmt.Errorf("node %s: corrupt record: %w", id, err)
		}
		if err := fn(&out); err != nil {
			return nil, err
		}
		return json.Marshal(&out)
	})
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// list returns every node, oldest first.
func (r *nodeRegistry) list(ctx context.Context) ([]Node, error) {
	var out []Node
	err := r.kv.List(ctx, bucketNodes, func(key string, value []byte) error {
		var n Node
		if err := json.Unmarshal(value, &n); err != nil {
			return fmt.Errorf("node %s: corrupt record: %w", key, err)
		}
		out = append(out, n)
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(out, func(i, j int) bool { return out[i].FirstSeen.Before(out[j].FirstSeen) })
	return out, nil
}
