package sds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/meshid/sds-server/store"
)

// pruneEvery is how often node records are checked against
// Limits.NodeRetention.
const pruneEvery = time.Hour

// pruneBatch bounds the records removed in one pass; the rest wait for the
// next one, so a pass never holds many records in memory.
const pruneBatch = 1000

// pruneLoop prunes old node records now and then every period until ctx
// ends.
func (s *Server) pruneLoop(ctx context.Context, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		if _, err := s.pruneNodes(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("pruning old node records failed; retrying at the next pass", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// lastActive is when a node record last mattered: its last activity or the
// expiry of its last certificate, whichever is later.
func lastActive(n *Node) time.Time {
	last := n.LastSeen
	if n.IssuedNotAfter.After(last) {
		last = n.IssuedNotAfter
	}
	if n.ServingNotAfter.After(last) {
		last = n.ServingNotAfter
	}
	for _, c := range n.Certs {
		if c.NotAfter.After(last) {
			last = c.NotAfter
		}
	}
	return last
}

// prunable reports whether a node record may be removed: not revoked (a
// revoked node stays, so that its token and node.id keep being refused and
// it stays visible), and inactive with every certificate expired since
// before cutoff.
func prunable(n *Node, cutoff time.Time) bool {
	return n.Status != NodeRevoked && lastActive(n).Before(cutoff)
}

// pruneNodes removes the node records that have been prunable for
// Limits.NodeRetention, skipping nodes the server holds in memory (a stream
// may be using them). It returns how many it removed.
func (s *Server) pruneNodes(ctx context.Context) (int, error) {
	cutoff := s.now().Add(-s.cfg.Limits.NodeRetention)
	var ids []string
	errFull := errors.New("batch full")
	err := s.cfg.Store.List(ctx, bucketNodes, func(key string, value []byte) error {
		var n Node
		if json.Unmarshal(value, &n) != nil || !prunable(&n, cutoff) {
			return nil // a corrupt record is left for an operator to see
		}
		ids = append(ids, key)
		if len(ids) >= pruneBatch {
			return errFull
		}
		return nil
	})
	if err != nil && !errors.Is(err, errFull) {
		return 0, fmt.Errorf("list nodes: %w", err)
	}
	removed := 0
	for _, id := range ids {
		ok, err := s.nodes.prune(ctx, id, cutoff, s.inUse)
		if err != nil {
			return removed, err
		}
		if ok {
			removed++
			s.cfg.Metrics.limits.nodesPruned.Inc()
		}
	}
	if removed > 0 {
		s.log.Info("pruned old node records", "nodes", removed, "retention", s.cfg.Limits.NodeRetention.String())
	}
	return removed, nil
}

// isLive reports whether the server holds node id in memory.
func (s *Server) isLive(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.live[id] != nil
}

// inUse reports whether n may be in use: held in memory, or possibly being
// bound by a stream of its token that is not bound to a node yet (between
// the registry lookup and the in-memory node, admission holds no lock).
func (s *Server) inUse(n *Node) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.live[n.ID] != nil {
		return true
	}
	for _, st := range s.streams {
		if st.node == nil && st.token.ID == n.TokenID {
			return true
		}
	}
	return false
}

// prune removes node id and its index entry if it is still prunable at
// cutoff and not in use. It runs under the lock of the node's sidecar
// (token, claimed node.id), so no admission looks the node up meanwhile, and
// one that looked it up before is seen by inUse.
func (r *nodeRegistry) prune(ctx context.Context, id string, cutoff time.Time, inUse func(*Node) bool) (bool, error) {
	n, err := r.get(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer r.locks.lock(indexKey(n.TokenID, n.ClaimedID))()
	n, err = r.get(ctx, id) // again, under the lock
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !prunable(n, cutoff) || inUse(n) {
		return false, nil
	}
	key := indexKey(n.TokenID, n.ClaimedID)
	if cur, err := r.kv.Get(ctx, bucketNodeIndex, key); err == nil && string(cur) == id {
		if err := r.kv.Delete(ctx, bucketNodeIndex, key); err != nil {
			return false, fmt.Errorf("unindex node %s: %w", id, err)
		}
	}
	if err := r.kv.Delete(ctx, bucketNodes, id); err != nil {
		return false, fmt.Errorf("delete node %s: %w", id, err)
	}
	return true, nil
}
