package sds

import (
	"github.com/prometheus/client_golang/prometheus"
)

// TrustRolloutStatus is how far the current trust bundle has reached.
type TrustRolloutStatus struct {
	// RootsID names the current set of roots (BundleVersion); Roots
	// counts them.
	RootsID string
	Roots   int
	// Connected counts the nodes with an open stream; Acked those whose
	// Envoy ACKed a ROOTCA carrying exactly the current roots; Pending
	// names the others, sorted.
	Connected, Acked int
	Pending          []string
}

// TrustRollout reports which connected nodes have ACKed the current set of
// roots: BundleRollout in the shape the step-ca metrics and logs use.
func (s *Server) TrustRollout() TrustRolloutStatus {
	b := s.rootCA.Load()
	if b == nil {
		return TrustRolloutStatus{}
	}
	r := s.BundleRollout()
	st := TrustRolloutStatus{RootsID: r.Version, Roots: len(b.roots), Connected: r.Connected, Acked: r.Acked}
	for _, l := range r.Laggards {
		st.Pending = append(st.Pending, l.NodeID)
	}
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
	complete := st.Acked == st.Connected
	done := s.bundles.markLogged(st.RootsID, complete)
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
