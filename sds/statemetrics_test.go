package sds

import (
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"math"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// series returns the gauge or counter values of the family name, keyed by
// their labels rendered as k=v,k=v (sorted; "" for no labels).
func (e *testEnv) series(t *testing.T, name string) map[string]float64 {
	t.Helper()
	mfs, err := e.prom.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, lp := range m.GetLabel() {
				ls = append(ls, lp.GetName()+"="+lp.GetValue())
			}
			sort.Strings(ls)
			out[strings.Join(ls, ",")] = value(m)
		}
	}
	return out
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return math.NaN()
}

func fp(raw []byte) string { s := sha256.Sum256(raw); return hex.EncodeToString(s[:]) }

// TestStateMetrics: the expiry timestamps and sds_ready follow the server's
// live state: CA root and intermediate, the CRL handed to sidecars, and the
// soonest certificate of connected nodes, present only while one is.
func TestStateMetrics(t *testing.T) {
	env := newTestEnv(t)
	near := func(got float64, want time.Time) bool { return math.Abs(got-epoch(want)) < 1e-3 }

	ca := env.series(t, "sds_ca_certificate_expiry_timestamp_seconds")
	root, inter := env.ca.Root(), env.ca.Intermediate()
	if len(ca) != 2 || !near(ca["cert=root,sha256="+fp(root.Raw)], root.NotAfter) || !near(ca["cert=intermediate,sha256="+fp(inter.Raw)], inter.NotAfter) {
		t.Errorf("CA expiry series %v, want root %s and intermediate %s", ca, root.NotAfter, inter.NotAfter)
	}
	crl := env.series(t, "sds_crl_next_update_timestamp_seconds")
	if b := env.srv.rootCA.Load(); len(crl) != 1 || b.crl == nil || !near(crl[""], b.crl.NextUpdate) {
		t.Errorf("CRL next update series %v, want the published list's NextUpdate", crl)
	}
	if got := env.series(t, "sds_workload_certificate_soonest_expiry_timestamp_seconds"); len(got) != 0 {
		t.Errorf("soonest workload expiry with no node connected: %v, want no series", got)
	}
	if got := env.series(t, "sds_certificate_ttl_seconds"); got[""] != 3600 {
		t.Errorf("sds_certificate_ttl_seconds %v, want 3600 (cert_ttl 1h)", got)
	}
	if got := env.series(t, "sds_ready"); got[""] != 1 {
		t.Errorf("sds_ready %v, want 1", got)
	}

	tok, _ := env.token(t, "web", 0, 0)
	reply, s1 := env.fetch(t, sdsSotw, tok, "w1", SecretDefault)
	first := leaf(t, reply.secrets[SecretDefault])
	tok2, _ := env.token(t, "api", 0, 0)
	env.clock.Advance(time.Minute)
	_, s2 := env.fetch(t, sdsSotw, tok2, "a1", SecretDefault)
	got := env.series(t, "sds_workload_certificate_soonest_expiry_timestamp_seconds")
	if len(got) != 1 || !near(got[""], first.NotAfter) {
		t.Errorf("soonest workload expiry %v, want %s (the first node's)", got, first.NotAfter)
	}
	s1.close()
	s2.close()
	if !eventually(5*time.Second, func() bool { return len(env.srv.connectedNodes()) == 0 }) {
		t.Fatal("nodes still connected 5s after their streams were closed")
	}
	if got := env.series(t, "sds_workload_certificate_soonest_expiry_timestamp_seconds"); len(got) != 0 {
		t.Errorf("soonest workload expiry after every node left: %v, want no series", got)
	}
}

// TestFailureSeriesStartAtZero: every labelled failure series exists at 0
// before anything happened, so that rate() and alerts see the first event.
func TestFailureSeriesStartAtZero(t *testing.T) {
	env := newTestEnv(t)
	want := map[string][]string{
		"sds_authentication_failures_total": prefixed("reason=", authReasons),
		"sds_limit_rejections_total":        prefixed("limit=", limitLabels),
		"sds_log_lines_suppressed_total":    prefixed("event=", slices.Collect(maps.Values(eventLabels))),
		"sds_nacks_total":                   prefixed("type_url=", append(append([]string{}, servedTypes...), "other")),
		"sds_certificates_issued_total":     {"result=failure", "result=success"},
	}
	for name, labels := range want {
		got := env.series(t, name)
		for _, l := range labels {
			if v, ok := got[l]; !ok || v != 0 {
				t.Errorf("%s{%s} = %v (present %v), want 0", name, l, v, ok)
			}
		}
	}
	if got := env.series(t, "sds_connected_streams"); len(got) != 6 {
		t.Errorf("sds_connected_streams has %d series, want 6 (ads, sds, ecds × sotw, delta): %v", len(got), got)
	}
}

func prefixed(p string, vs []string) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = p + v
	}
	return out
}

// TestBuildInfo: sds_build_info is 1 with the version given and the Go
// version running.
func TestBuildInfo(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(BuildInfo("v9.9.9"))
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || len(mfs[0].GetMetric()) != 1 {
		t.Fatalf("gather: %v, %v", mfs, err)
	}
	m := mfs[0].GetMetric()[0]
	labels := map[string]string{}
	for _, lp := range m.GetLabel() {
		labels[lp.GetName()] = lp.GetValue()
	}
	if mfs[0].GetName() != "sds_build_info" || value(m) != 1 || labels["version"] != "v9.9.9" ||
		!strings.HasPrefix(labels["goversion"], "go") || labels["revision"] == "" {
		t.Errorf("build info %s %v = %v", mfs[0].GetName(), labels, value(m))
	}
}
