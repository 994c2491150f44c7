package sds

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"sort"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/anypb"
)

// trustRollout follows the trust bundle (the set of roots in ROOTCA) to
// every Envoy: which roots each node's Envoy last ACKed. It is what an
// operator rotating step-ca's root waits on before switching step-ca's
// intermediate or removing the old root. The ROOTCA resource version also
// changes with every re-signed CRL, so nodes are compared by the roots they
// ACKed, not by the version.
type trustRollout struct {
	mu sync.Mutex
	// sent are the responses that carried ROOTCA, by stream, awaiting an
	// ACK: their nonce and the roots ID; at most maxPending per stream.
	sent map[int64][]sentBundle
	// acked is the roots ID of the last ROOTCA each node's Envoy ACKed.
	acked map[string]string
	// done is the roots ID last logged as ACKed by every connected node.
	done string
}

type sentBundle struct{ nonce, roots string }

func newTrustRollout() *trustRollout {
	return &trustRollout{sent: make(map[int64][]sentBundle), acked: make(map[string]string)}
}

// rootsID names a set of roots, whatever their order in the bundle: the
// first 8 bytes, in hex, of the SHA-256 of their sorted SHA-256 digests.
func rootsID(roots []*x509.Certificate) string {
	sums := make([][sha256.Size]byte, len(roots))
	for i, r := range roots {
		sums[i] = sha256.Sum256(r.Raw)
	}
	sort.Slice(sums, func(i, j int) bool { return bytes.Compare(sums[i][:], sums[j][:]) < 0 })
	h := sha256.New()
	for _, s := range sums {
		h.Write(s[:])
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// sentResources records a response on stream id if it carries the current
// ROOTCA (b).
func (t *trustRollout) sentResources(id int64, nonce string, anys []*anypb.Any, b *rootBundle) {
	if b == nil || b.res == nil || nonce == "" {
		return
	}
	for _, a := range anys {
		if a == b.res.any || (len(a.GetValue()) == len(b.res.any.GetValue()) && bytes.Equal(a.GetValue(), b.res.any.GetValue())) {
			t.mu.Lock()
			s := t.sent[id]
			if len(s) >= maxPending {
				s = s[1:]
			}
			t.sent[id] = append(s, sentBundle{nonce: nonce, roots: rootsID(b.roots)})
			t.mu.Unlock()
			return
		}
	}
}

// ack records that node's Envoy ACKed the response with nonce on stream id.
func (t *trustRollout) ack(id int64, node, nonce string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.sent[id]
	for i, b := range s {
		if b.nonce == nonce {
			t.acked[node] = b.roots
			t.sent[id] = s[i+1:]
			return
		}
	}
}

// closed forgets what stream id sent.
func (t *trustRollout) closed(id int64) {
	t.mu.Lock()
	delete(t.sent, id)
	t.mu.Unlock()
}

// forget drops what a node ACKed (its state is swept).
func (t *trustRollout) forget(node string) {
	t.mu.Lock()
	delete(t.acked, node)
	t.mu.Unlock()
}

// TrustRolloutStatus is how far the current trust bundle has reached.
type TrustRolloutStatus struct {
	// RootsID names the current set of roots (see rootsID); Roots counts
	// them.
	RootsID string
	Roots   int
	// Connected counts the nodes with an open stream; Acked those whose
	// Envoy ACKed a ROOTCA carrying exactly the current roots; Pending
	// names the others, sorted.
	Connected, Acked int
	Pending          []string
}

// TrustRollout reports which connected nodes have ACKed the current set of
// roots.
func (s *Server) TrustRollout() TrustRolloutStatus {
	b := s.rootCA.Load()
	st := TrustRolloutStatus{}
	if b == nil {
		return st
	}
	st.RootsID, st.Roots = rootsID(b.roots), len(b.roots)
	s.mu.Lock()
	nodes := make([]string, 0, len(s.live))
	for id, n := range s.live {
		if n.streams > 0 {
			nodes = append(nodes, id)
		}
	}
	s.mu.Unlock()
	t := s.rollout
	t.mu.Lock()
	for _, id := range nodes {
		if t.acked[id] == st.RootsID {
			st.Acked++
		} else {
			st.Pending = append(st.Pending, id)
		}
	}
	t.mu.Unlock()
	st.Connected = len(nodes)
	sort.Strings(st.Pending)
	return st
}

// logTrustRollout logs the rollout of the current roots: once when every
// connected node has ACKed them, and on every call before (the roots
// refresh loop calls it, so while a bundle is pending it is logged once
// per refresh interval).
func (s *Server) logTrustRollout() {
	st := s.TrustRollout()
	if st.RootsID == "" || st.Connected == 0 {
		return
	}
	t := s.rollout
	t.mu.Lock()
	done := t.done == st.RootsID
	complete := st.Acked == st.Connected
	if complete {
		t.done = st.RootsID
	}
	t.mu.Unlock()
	switch {
	case complete && !done:
		s.log.Info("trust bundle ACKed by every connected node", "roots_id", st.RootsID, "roots", st.Roots, "acked", st.Acked, "connected", st.Connected)
	case !complete:
		s.log.Info("trust bundle rolling out", "roots_id", st.RootsID, "roots", st.Roots,
			"acked", st.Acked, "connected", st.Connected, "pending", st.Pending[:min(len(st.Pending), 10)])
	}
}

// trustRolloutCollectors are the scrape-time gauges of the rollout.
func trustRolloutCollectors(s *Server) []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_trust_bundle_roots",
			Help: "Roots in the trust bundle (ROOTCA) served now.",
		}, func() float64 { return float64(s.TrustRollout().Roots) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_trust_bundle_acked_nodes",
			Help: "Connected nodes whose Envoy ACKed a ROOTCA carrying exactly the current roots.",
		}, func() float64 { return float64(s.TrustRollout().Acked) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_trust_bundle_pending_nodes",
			Help: "Connected nodes whose Envoy has not ACKed the current roots yet: wait for 0 before the next step of a root rotation.",
		}, func() float64 { st := s.TrustRollout(); return float64(st.Connected - st.Acked) }),
	}
}
