package sds

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"slices"
	"sync"

	"google.golang.org/protobuf/types/known/anypb"
)

// Trust-bundle rollout: which trust bundle each connected sidecar has
// loaded, learned from Envoy's ACKs of the ROOTCA secret. A CA rotation
// (built-in CA or step-ca) advances only once every connected sidecar
// trusts the new bundle; this file is the evidence it waits on.
//
// A bundle is named by its roots alone (BundleVersion), not by the ROOTCA
// secret's version, which changes with every re-signed revocation list.

// BundleVersion names a trust bundle by its roots, in any order: the first
// 16 hex digits of the SHA-256 of the sorted SHA-256 digests of the roots'
// DER. Two bundles with the same roots have the same version.
func BundleVersion(roots []*x509.Certificate) string {
	sums := make([][32]byte, len(roots))
	for i, r := range roots {
		sums[i] = sha256.Sum256(r.Raw)
	}
	slices.SortFunc(sums, func(a, b [32]byte) int { return slices.Compare(a[:], b[:]) })
	h := sha256.New()
	for _, s := range sums {
		h.Write(s[:])
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// maxBundleResources bounds the ROOTCA resources remembered to attribute a
// late ACK to its bundle (a response may be ACKed after newer ones were
// published).
const maxBundleResources = 16

// bundleAcks records the bundle version each node last ACKed. Safe for
// concurrent use; its lock is never held across anything but map and
// slice operations.
type bundleAcks struct {
	mu    sync.Mutex
	sent  []bundleRes       // recent ROOTCA resources, newest last
	acked map[string]string // node ID -> bundle version it last ACKed
	// logged is the bundle version last logged as ACKed by every
	// connected node (logTrustRollout).
	logged string
}

// bundleRes is one published ROOTCA resource and the bundle it carries.
type bundleRes struct {
	any     *anypb.Any
	version string
}

func newBundleAcks() *bundleAcks { return &bundleAcks{acked: map[string]string{}} }

// published records that res (a ROOTCA secret) carries bundle version.
func (b *bundleAcks) published(res *resource, version string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.sent) >= maxBundleResources {
		b.sent = slices.Delete(b.sent, 0, 1)
	}
	b.sent = append(b.sent, bundleRes{any: res.any, version: version})
}

// versionOf returns the bundle version a response resource carries, if it
// is a ROOTCA secret published recently.
func (b *bundleAcks) versionOf(a *anypb.Any) (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := len(b.sent) - 1; i >= 0; i-- {
		if b.sent[i].any == a {
			return b.sent[i].version, true
		}
	}
	return "", false
}

// ack records that node ACKed a response carrying bundle version, and
// reports whether that changed what the node trusts.
func (b *bundleAcks) ack(nodeID, version string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.acked[nodeID] == version {
		return false
	}
	b.acked[nodeID] = version
	return true
}

// forget drops a node whose in-memory state is dropped (sweepIdle).
func (b *bundleAcks) forget(nodeID string) {
	b.mu.Lock()
	delete(b.acked, nodeID)
	b.mu.Unlock()
}

// markLogged reports whether version was already logged as complete, and
// records it as such when complete is true.
func (b *bundleAcks) markLogged(version string, complete bool) (already bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	already = b.logged == version
	if complete {
		b.logged = version
	}
	return already
}

// ackedBy returns the bundle version node last ACKed, "" if none.
func (b *bundleAcks) ackedBy(nodeID string) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.acked[nodeID]
}

// BundleRollout is how far the trust bundle published now has reached the
// connected sidecars, from their ACKs of ROOTCA.
type BundleRollout struct {
	// Version is the bundle published now (BundleVersion of its roots).
	Version string `json:"version"`
	// Connected counts the nodes with at least one open stream; Acked
	// those whose last ACKed ROOTCA carried Version.
	Connected int `json:"connected"`
	Acked     int `json:"acked"`
	// ByVersion counts the connected nodes by the bundle version they
	// last ACKed ("" for none yet).
	ByVersion map[string]int `json:"by_version"`
	// Laggards are the connected nodes not on Version, by node ID.
	Laggards []NodeLag `json:"laggards"`
}

// Done reports whether every connected sidecar ACKed the current bundle.
func (r BundleRollout) Done() bool { return r.Acked == r.Connected }

// NodeLag names a connected node that has not reached a rotation step.
type NodeLag struct {
	NodeID  string `json:"node_id"`
	Service string `json:"service"`
	Env     string `json:"env"`
	// Has is what the node has instead: the bundle version it last
	// ACKed, or the serial of the certificate its Envoy serves ("" for
	// none yet).
	Has string `json:"has"`
}

// BundleVersion returns the version of the trust bundle published now.
func (s *Server) BundleVersion() string { return s.rootCA.Load().version }

// BundleRollout reports which connected sidecars ACKed the trust bundle
// published now. A node that never subscribes to ROOTCA counts as a
// laggard: the rotation cannot know it trusts the new root.
func (s *Server) BundleRollout() BundleRollout {
	cur := s.BundleVersion()
	r := BundleRollout{Version: cur, ByVersion: map[string]int{}, Laggards: []NodeLag{}}
	for _, ln := range s.connectedNodes() {
		v := s.bundles.ackedBy(ln.rec.ID)
		r.Connected++
		r.ByVersion[v]++
		if v == cur {
			r.Acked++
			continue
		}
		r.Laggards = append(r.Laggards, NodeLag{NodeID: ln.rec.ID, Service: ln.rec.Service, Env: ln.rec.Env, Has: v})
	}
	slices.SortFunc(r.Laggards, func(a, b NodeLag) int { return cmpString(a.NodeID, b.NodeID) })
	return r
}

// noteBundleAck is called on an ACK of a response that carried bundle
// version: it records it and logs the change (the rotation's evidence,
// with its time).
func (s *Server) noteBundleAck(ln *liveNode, version string) {
	if !s.bundles.ack(ln.rec.ID, version) {
		return
	}
	s.log.Info("envoy loaded trust bundle", "node_id", ln.rec.ID, "bundle", version, "current", version == s.BundleVersion())
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
