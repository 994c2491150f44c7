package sds

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Intermediater is implemented by issuers that know the CA certificate
// signing their workload certificates (the built-in CA: its intermediate;
// step-ca: the intermediate of the last certificate it signed, nil before
// the first). It feeds sds_ca_certificate_expiry_timestamp_seconds.
type Intermediater interface {
	Intermediate() *x509.Certificate
}

// stateCollector exports expiry timestamps and readiness computed from the
// server's live state at scrape time: nothing on the serving paths updates
// it, and it reads only atomics and, briefly, the node map the other
// scrape-time gauges read.
type stateCollector struct {
	s                                 *Server
	caExpiry, crlNext, workload, read *prometheus.Desc
	ttl                               *prometheus.Desc
}

func newStateCollector(s *Server) *stateCollector {
	return &stateCollector{
		s: s,
		caExpiry: prometheus.NewDesc("sds_ca_certificate_expiry_timestamp_seconds",
			"NotAfter of each CA certificate in use, in seconds since the epoch: every root of the trust bundle (cert=root) and the intermediate that signs workload certificates (cert=intermediate), by SHA-256 of the certificate.",
			[]string{"cert", "sha256"}, nil),
		crlNext: prometheus.NewDesc("sds_crl_next_update_timestamp_seconds",
			"NextUpdate of the revocation list handed to sidecars, in seconds since the epoch; absent when there is none.",
			nil, nil),
		workload: prometheus.NewDesc("sds_workload_certificate_soonest_expiry_timestamp_seconds",
			"Soonest NotAfter among the current certificates of connected nodes, in seconds since the epoch; absent when no node is connected.",
			nil, nil),
		ttl: prometheus.NewDesc("sds_certificate_ttl_seconds",
			"The lifetime requested for workload certificates (cert_ttl), for thresholds relative to it.",
			nil, nil),
		read: prometheus.NewDesc("sds_ready",
			"1 when the server is ready (what /readyz answers), else 0.",
			nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.caExpiry
	ch <- c.crlNext
	ch <- c.workload
	ch <- c.read
	ch <- c.ttl
}

// Collect implements prometheus.Collector.
func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	seen := map[string]bool{}
	caCert := func(kind string, cert *x509.Certificate) {
		sum := sha256.Sum256(cert.Raw)
		fp := hex.EncodeToString(sum[:])
		if seen[kind+fp] {
			return
		}
		seen[kind+fp] = true
		ch <- prometheus.MustNewConstMetric(c.caExpiry, prometheus.GaugeValue, epoch(cert.NotAfter), kind, fp)
	}
	if b := s.rootCA.Load(); b != nil {
		for _, r := range b.roots {
			caCert("root", r)
		}
		if b.crl != nil {
			ch <- prometheus.MustNewConstMetric(c.crlNext, prometheus.GaugeValue, epoch(b.crl.NextUpdate))
		}
	}
	if im, ok := s.cfg.Issuer.(Intermediater); ok {
		if cert := im.Intermediate(); cert != nil {
			caCert("intermediate", cert)
		}
	}
	var soonest time.Time
	for _, ln := range s.connectedNodes() {
		if cs := ln.cur.Load(); cs != nil && (soonest.IsZero() || cs.cert.Leaf.NotAfter.Before(soonest)) {
			soonest = cs.cert.Leaf.NotAfter
		}
	}
	if !soonest.IsZero() {
		ch <- prometheus.MustNewConstMetric(c.workload, prometheus.GaugeValue, epoch(soonest))
	}
	ready := 0.0
	if s.Ready(context.Background()) == nil {
		ready = 1
	}
	ch <- prometheus.MustNewConstMetric(c.read, prometheus.GaugeValue, ready)
	ch <- prometheus.MustNewConstMetric(c.ttl, prometheus.GaugeValue, s.cfg.CertTTL.Seconds())
}

func epoch(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// BuildInfo returns the sds_build_info gauge: 1, labelled with the server's
// version, the Go version and the VCS revision it was built from (from the
// binary's build information; "unknown" when it has none).
func BuildInfo(version string) prometheus.Collector {
	revision := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		var modified bool
		for _, kv := range bi.Settings {
			switch kv.Key {
			case "vcs.revision":
				revision = kv.Value
			case "vcs.modified":
				modified = kv.Value == "true"
			}
		}
		if modified && revision != "unknown" {
			revision += "-dirty"
		}
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "sds_build_info",
		Help:        "Always 1; the labels say which sds-server build is running.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version(), "revision": revision},
	})
	g.Set(1)
	return g
}
