package sds

import (
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/sds-server/bootstrap"
)

// Values of the limit label of sds_limit_rejections_total, one per limit.
const (
	limitHandshake   = "handshake_timeout" // TLS handshake and HTTP/2 preface not done in time
	limitIdle        = "idle_connection"   // connection with no stream closed after limits.idle_timeout
	limitConnections = "max_connections"   // connection over limits.max_connections closed at once
	limitStreams     = "streams_per_node"  // stream over limits.max_streams_per_node
	limitNames       = "resource_names"    // request over limits.max_resource_names
	limitNameLength  = "name_length"       // name over limits.max_name_length
	limitRequestSize = "request_size"      // message over limits.max_request_bytes
	limitAuthRate    = "auth_failure_rate" // source over its authentication failure budget
)

var limitLabels = []string{limitHandshake, limitIdle, limitConnections, limitStreams, limitNames, limitNameLength, limitRequestSize, limitAuthRate}

// limitMetrics count what the limits refuse and what the log throttle drops.
type limitMetrics struct {
	rejections    *prometheus.CounterVec
	openConns     prometheus.Gauge
	logSuppressed *prometheus.CounterVec
	logTruncated  prometheus.Counter
	nodesPruned   prometheus.Counter
}

func newLimitMetrics() *limitMetrics {
	m := &limitMetrics{
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sds_limit_rejections_total",
			Help: "Connections and streams refused or closed by a limit, by limit (handshake_timeout, idle_connection, max_connections, streams_per_node, resource_names, name_length, request_size, auth_failure_rate).",
		}, []string{"limit"}),
		openConns: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sds_open_connections",
			Help: "Open connections on the xDS listener, counted against limits.max_connections.",
		}),
		logSuppressed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sds_log_lines_suppressed_total",
			Help: "Log lines a client could provoke that were dropped by the log rate limit (a summary line says how many), by event (stream_refused, admission_failed, secret_not_served, nack, shared_identity).",
		}, []string{"event"}),
		logTruncated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sds_log_values_truncated_total",
			Help: "Client-provided strings (node.id, resource names, error_detail, type URLs) cut to 128 bytes in the log.",
		}),
		nodesPruned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sds_nodes_pruned_total",
			Help: "Node records removed from the store after limits.node_retention with every certificate expired (revoked nodes are kept).",
		}),
	}
	for _, l := range limitLabels {
		m.rejections.WithLabelValues(l)
	}
	for _, l := range eventLabels {
		m.logSuppressed.WithLabelValues(l)
	}
	return m
}

func (m *limitMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.rejections, m.openConns, m.logSuppressed, m.logTruncated, m.nodesPruned}
}

// reject counts one refusal by limit.
func (m *limitMetrics) reject(limit string) { m.rejections.WithLabelValues(limit).Inc() }

// servedTypes are the type URLs this server serves: the only values a label
// taken from a client's type URL may have, besides "other".
var servedTypes = []string{xdsres.SecretType, xdsres.ExtensionConfigType}

// typeLabel maps a client-provided type URL to a fixed label set, so that a
// client cannot create metric series at will.
func typeLabel(typeURL string) string {
	for _, t := range servedTypes {
		if typeURL == t {
			return t
		}
	}
	return "other"
}

// authReasons are the values of sds_authentication_failures_total's reason
// label known here, pre-initialised at 0 so that rate() works from the first
// failure.
var authReasons = []string{
	bootstrap.ReasonMissing, bootstrap.ReasonMalformed, bootstrap.ReasonWrongRoot, bootstrap.ReasonUnknown,
	bootstrap.ReasonRevoked, bootstrap.ReasonExpired, bootstrap.ReasonExhausted, "node_revoked", reasonNodeExpired, "bad_node",
}

// preinit creates the labelled failure series of m at 0, and the stream
// gauges of every service and protocol.
func (m *Metrics) preinit() {
	for _, r := range authReasons {
		m.authFailures.WithLabelValues(r)
	}
	for _, t := range append(servedTypes, "other") {
		m.nacks.WithLabelValues(t)
	}
	m.unknownResources.WithLabelValues(xdsres.SecretType)
	m.unknownResources.WithLabelValues("other")
	m.certsIssued.WithLabelValues("failure")
	m.certsIssued.WithLabelValues("success")
	for _, kind := range []string{"ads", "sds", "ecds"} {
		for _, protocol := range []string{"sotw", "delta"} {
			m.streams.WithLabelValues(kind, protocol)
		}
	}
}
