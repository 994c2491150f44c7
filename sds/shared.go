package sds

import (
	"slices"
)

// connSet is the bookkeeping, per node, that makes a node's key served to
// two connections visible: the peers (remote addresses, one per
// connection) with open streams and how often a stream bound from a new
// connection while another one was open. Every field is guarded by
// Server.mu.
type connSet struct {
	peers  map[string]int // open streams by peer address
	shared int            // shared-identity events since the server started
}

// sharedEvent is one new connection bound to a node that already had
// streams open from other connections: the node's current key is being
// served to both.
type sharedEvent struct {
	nodeID string
	peer   string
	others []string
}

// maxLoggedPeers bounds the peers named in one shared-identity warning.
const maxLoggedPeers = 4

// add records a stream of peer bound to node id; it returns the event to
// report when peer is a new connection and others are open. Server.mu is
// held.
func (c *connSet) add(id, peer string) *sharedEvent {
	if c.peers == nil {
		c.peers = make(map[string]int)
	}
	c.peers[peer]++
	if c.peers[peer] > 1 || len(c.peers) == 1 {
		return nil
	}
	c.shared++
	ev := &sharedEvent{nodeID: id, peer: peer}
	for p := range c.peers {
		if p != peer {
			ev.others = append(ev.others, p)
		}
	}
	slices.Sort(ev.others)
	if len(ev.others) > maxLoggedPeers {
		ev.others = ev.others[:maxLoggedPeers]
	}
	return ev
}

// remove forgets a stream of peer. Server.mu is held.
func (c *connSet) remove(peer string) {
	if c.peers[peer] <= 1 {
		delete(c.peers, peer)
		return
	}
	c.peers[peer]--
}

// list returns the peers with open streams, sorted. Server.mu is held.
func (c *connSet) list() []string {
	out := make([]string, 0, len(c.peers))
	for p := range c.peers {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// reportShared logs and counts a shared-identity event. It holds no lock:
// call it after releasing Server.mu.
func (s *Server) reportShared(ev *sharedEvent, streamID int64) {
	if ev == nil {
		return
	}
	s.cfg.Metrics.sharedIdentity.Inc()
	s.lim.logs.warn(eventShared, "", "node_id", ev.nodeID, "peer", ev.peer, "other_peers", ev.others, "stream_id", streamID)
}
