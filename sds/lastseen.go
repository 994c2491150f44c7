package sds

import (
	"context"
	"sync/atomic"
	"time"
)

// lastSeenStoreEvery bounds how often a node's LastSeen is written to the
// store: every request of a connected node moves the live value, kept in
// memory and shown by the admin API, but the stored record follows at most
// this often, so that chatty sidecars do not turn into store writes.
const lastSeenStoreEvery = time.Minute

// lastSeen is when a node was last heard from: a stream bound to it, a
// request (ACK, NACK or subscription) on one of its streams, or one of its
// streams closing. Both fields are UnixNano; zero means never.
type lastSeen struct {
	at     atomic.Int64 // the live value
	stored atomic.Int64 // the value last written to the store
}

// touch records that ln was heard from now and, if the stored LastSeen is
// older than lastSeenStoreEvery, writes it to the store. Concurrent streams
// of a node race for the write with a compare-and-swap: one writes.
func (s *Server) touch(ln *liveNode) {
	now := s.now()
	ln.seen.at.Store(now.UnixNano())
	// A node loaded from the store starts from its record's value.
	if !ln.rec.LastSeen.IsZero() {
		ln.seen.stored.CompareAndSwap(0, ln.rec.LastSeen.UnixNano())
	}
	prev := ln.seen.stored.Load()
	if now.UnixNano()-prev < int64(lastSeenStoreEvery) || !ln.seen.stored.CompareAndSwap(prev, now.UnixNano()) {
		return
	}
	if _, err := s.nodes.update(context.Background(), ln.rec.ID, func(n *Node) error {
		if now.After(n.LastSeen) {
			n.LastSeen = now.UTC()
		}
		return nil
	}); err != nil {
		// Not retried before the next interval: the live value stays
		// right, and the store is not hammered while it fails.
		s.log.Warn("could not record when the node was last seen", "node_id", ln.rec.ID, "error", err)
	}
}

// seenClosed records that one of ln's streams closed now, in memory only:
// the last moment the node was connected. The stored value follows at the
// node's next request, or stays at most lastSeenStoreEvery behind.
func (s *Server) seenClosed(ln *liveNode) {
	ln.seen.at.Store(s.now().UnixNano())
}

// liveLastSeen returns the later of the stored last-seen time and the live
// one of ln (nil when the node is not in memory).
func liveLastSeen(stored time.Time, ln *liveNode) time.Time {
	if ln == nil {
		return stored
	}
	if at := ln.seen.at.Load(); at != 0 && at > stored.UnixNano() {
		return time.Unix(0, at).UTC()
	}
	return stored
}
