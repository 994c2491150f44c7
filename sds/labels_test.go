package sds

import (
	"strings"
	"testing"

	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

func TestTypeLabel(t *testing.T) {
	tests := []struct{ in, want string }{
		{xdsres.SecretType, xdsres.SecretType},
		{xdsres.ExtensionConfigType, xdsres.ExtensionConfigType},
		{xdsres.ClusterType, "other"},
		{"", "other"},
		{"type.googleapis.com/bogus.1", "other"},
		{strings.Repeat("x", 1<<20), "other"},
	}
	for _, tt := range tests {
		if got := typeLabel(tt.in); got != tt.want {
			t.Errorf("typeLabel(%.40q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// seriesCount is the number of series of the metric family name.
func (e *testEnv) seriesCount(t *testing.T, name string) int {
	t.Helper()
	mfs, err := e.prom.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.GetMetric())
		}
	}
	return 0
}

// TestNACKLabelsBounded: 5,000 NACKs and unknown names under distinct bogus
// type URLs add no series: labels come from a fixed set.
func TestNACKLabelsBounded(t *testing.T) {
	env := newTestEnv(t)
	tok, _ := env.token(t, "web", 0, 0)
	env.fetch(t, sdsSotw, tok, "w1", SecretDefault)
	var id int64
	env.srv.mu.Lock()
	for k := range env.srv.streams {
		id = k
	}
	env.srv.mu.Unlock()
	nacksBefore := env.seriesCount(t, "sds_nacks_total")
	unknownBefore := env.seriesCount(t, "sds_unknown_resource_requests_total")
	if nacksBefore != 3 || unknownBefore != 2 {
		t.Fatalf("pre-initialised series: %d NACK, %d unknown-resource; want 3 (secret, extension config, other) and 2", nacksBefore, unknownBefore)
	}
	c := callbacks{env.srv}
	detail := "bad"
	for i := 0; i < 5000; i++ {
		if _, err := c.request(id, nil, "type.googleapis.com/bogus."+itoa(i), []string{"n" + itoa(i)}, "", &detail); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if n := env.seriesCount(t, "sds_nacks_total"); n != nacksBefore {
		t.Fatalf("sds_nacks_total has %d series after 5,000 bogus type URLs, want %d", n, nacksBefore)
	}
	if n := env.seriesCount(t, "sds_unknown_resource_requests_total"); n != unknownBefore {
		t.Fatalf("sds_unknown_resource_requests_total has %d series, want %d", n, unknownBefore)
	}
	if got := metricValue(t, env.metrics.nacks.WithLabelValues("other")); got != 5000 {
		t.Fatalf("sds_nacks_total{type_url=other} = %v, want 5000", got)
	}
}

// TestFailureSeriesPreinitialised: the labelled failure series exist at 0
// before any failure, so alerts on rate() see the first one.
func TestFailureSeriesPreinitialised(t *testing.T) {
	env := newTestEnv(t)
	for _, name := range []string{"sds_authentication_failures_total", "sds_limit_rejections_total", "sds_log_lines_suppressed_total"} {
		if env.seriesCount(t, name) == 0 {
			t.Errorf("%s has no series before any failure", name)
		}
	}
	if got := env.seriesCount(t, "sds_limit_rejections_total"); got != len(limitLabels) {
		t.Errorf("sds_limit_rejections_total has %d series, want one per limit (%d)", got, len(limitLabels))
	}
}
