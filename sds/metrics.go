package sds

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the server's Prometheus instruments. They are registered on
// the registry the caller passes in (no global registry), so tests and
// several servers in one process do not collide.
type Metrics struct {
	streams           *prometheus.GaugeVec
	certsIssued       *prometheus.CounterVec
	issueLatency      prometheus.Histogram
	authFailures      *prometheus.CounterVec
	nacks             *prometheus.CounterVec
	unknownResources  *prometheus.CounterVec
	nodesAdmitted     prometheus.Counter
	connectedSidecars prometheus.Gauge
	sharedIdentity    prometheus.Counter
	policyErrors      prometheus.Counter
	policyInvalid     prometheus.Gauge
	limits            *limitMetrics
	reg               prometheus.Registerer
}

// NewMetrics creates the instruments and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		streams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sds_connected_streams",
			Help: "Open xDS streams, by service (ads, sds, ecds) and protocol variant (sotw, delta).",
		}, []string{"xds_type", "protocol"}),
		certsIssued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sds_certificates_issued_total",
			Help: "Workload certificate issuance attempts, by result (success, failure).",
		}, []string{"result"}),
		issueLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sds_certificate_issuance_duration_seconds",
			Help:    "Time to generate a key and have the CA sign a workload certificate.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sds_authentication_failures_total",
			Help: "xDS streams refused, by reason (missing, malformed, wrong_root, unknown, revoked, expired, exhausted, node_revoked, node_expired, bad_node).",
		}, []string{"reason"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sds_nacks_total",
			Help: "Responses rejected by Envoy (requests carrying error_detail), by type URL (the served ones, else other).",
		}, []string{"type_url"}),
		unknownResources: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sds_unknown_resource_requests_total",
			Help: "Requests for resource names the stream's identity may not receive, by type URL (the served ones, else other).",
		}, []string{"type_url"}),
		nodesAdmitted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sds_nodes_admitted_total",
			Help: "New nodes admitted with a bootstrap token.",
		}),
		connectedSidecars: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sds_connected_nodes",
			Help: "Nodes with at least one open xDS stream.",
		}),
		sharedIdentity: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sds_node_shared_identity_total",
			Help: "Streams bound to a node from a new connection while other connections of that node were open: its key is served to both.",
		}),
	}
	m.policyErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sds_policy_errors_total",
		Help: "Invalid policy files found (each distinct problem counted once); the last good policy stays in force.",
	})
	m.policyInvalid = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sds_policy_invalid_files",
		Help: "Files in policy_dir whose current content is not in force (invalid or misplaced).",
	})
	m.limits = newLimitMetrics()
	m.reg = reg
	reg.MustRegister(m.streams, m.certsIssued, m.issueLatency, m.authFailures, m.nacks,
		m.unknownResources, m.nodesAdmitted, m.connectedSidecars, m.sharedIdentity, m.policyErrors, m.policyInvalid)
	reg.MustRegister(m.limits.collectors()...)
	m.preinit()
	return m
}

// registerServer adds the gauges computed from a server's state at scrape
// time.
func (m *Metrics) registerServer(s *Server) error {
	for _, c := range append([]prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_nodes_serving_stale_certificate",
			Help: "Connected nodes whose certificate loaded by Envoy is past 90% of its life (renewed but still serving the old one, or renewal failing).",
		}, func() float64 { return float64(s.nodesServingStale()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_nodes_renewal_failing",
			Help: "Connected nodes whose last certificate renewal failed (retrying with backoff).",
		}, func() float64 { return float64(s.nodesRenewalFailing()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_renewals_scheduled",
			Help: "Certificate renewals waiting in the scheduler.",
		}, func() float64 { return float64(s.sched.len()) }),
		newStateCollector(s),
	}, trustRolloutCollectors(s)...) {
		if err := m.reg.Register(c); err != nil {
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}
