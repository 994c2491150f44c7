package sds

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/store"
)

// busiestRatio buckets times by whole second from t0 and returns the busiest
// bucket over the uniform expectation n / (window in seconds).
func busiestRatio(times []time.Time, t0 time.Time, window time.Duration) float64 {
	counts := map[int64]int{}
	busiest := 0
	for _, at := range times {
		sec := int64(at.Sub(t0) / time.Second)
		counts[sec]++
		busiest = max(busiest, counts[sec])
	}
	return float64(busiest) / (float64(len(times)) / window.Seconds())
}

// BenchmarkRenewalSpread issues certificates for 10,000 nodes at the same
// instant (real key generation and signing by the built-in CA, frozen clock)
// and reports the busiest second of the renewals they schedule, as a ratio
// to the uniform expectation 10,000 / (0.3 × lifetime). Goal: ≤ 1.5. For
// reference it also reports the same ratio for independent uniform draws.
func BenchmarkRenewalSpread(b *testing.B) {
	const nodes = 10000
	const ttl = time.Hour
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := func() time.Time { return t0 }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ca, err := local.Open(ctx, b.TempDir(), local.Options{TrustDomain: "mesh.local", Now: now})
	if err != nil {
		b.Fatal(err)
	}
	kv := store.NewMemory()
	for i := 0; i < b.N; i++ {
		srv, err := New(ctx, Config{
			TrustDomain: "mesh.local", CertTTL: ttl, Issuer: ca, Tokens: bootstrap.NewRegistry(kv, now),
			Store: kv, Metrics: NewMetrics(prometheus.NewRegistry()), Now: now,
			Logger: discardLogger(),
		})
		if err != nil {
			b.Fatal(err)
		}
		times := make([]time.Time, 0, nodes)
		for n := 0; n < nodes; n++ {
			rec := &Node{ID: fmt.Sprintf("n%05d-%d", n, i), Service: "web", Env: "prod", Status: NodeActive}
			if err := srv.nodes.put(ctx, rec); err != nil {
				b.Fatal(err)
			}
			ln := srv.liveNodeFor(rec)
			if err := srv.ensureCertificate(ctx, ln); err != nil {
				b.Fatal(err)
			}
			times = append(times, ln.cur.Load().renewAt)
		}
		window := time.Duration(float64(ttl) * (DefaultRenewWindow.Hi - DefaultRenewWindow.Lo))
		b.ReportMetric(busiestRatio(times, t0, window), "busiest/uniform")
		iid := make([]time.Time, nodes)
		for n := range iid {
			iid[n] = DefaultRenewWindow.renewAt(t0, ttl, rand.Float64())
		}
		b.ReportMetric(busiestRatio(iid, t0, window), "iid-busiest/uniform")
	}
}

// TestRenewalSpreadEven checks the property the benchmark measures, without
// the CA: 10,000 renewals drawn at one instant land in the window, and the
// busiest second stays within 1.5× the uniform expectation.
func TestRenewalSpreadEven(t *testing.T) {
	const nodes = 10000
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	// Both give ≥ 9 renewals a second on average; below ~1 a second the
	// ratio is meaningless (one renewal in a second already exceeds it).
	for _, ttl := range []time.Duration{30 * time.Minute, time.Hour} {
		sp := newSpreader()
		times := make([]time.Time, nodes)
		for i := range times {
			times[i] = DefaultRenewWindow.renewAt(t0, ttl, sp.next())
			lo, hi := t0.Add(ttl/2), t0.Add(ttl*8/10)
			if times[i].Before(lo) || times[i].After(hi) {
				t.Fatalf("renewal at %s outside [%s, %s]", times[i], lo, hi)
			}
		}
		window := time.Duration(float64(ttl) * 0.3)
		if r := busiestRatio(times, t0, window); r > 1.5 {
			t.Errorf("ttl %s: busiest second is %.2f× the uniform expectation, want ≤ 1.5", ttl, r)
		}
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
