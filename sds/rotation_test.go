package sds

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/store"
)

// ---- scheduler (no gRPC) ------------------------------------------------------

// manualClock is a clock that only moves when the test sets it.
type manualClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *manualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *manualClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

func schedNode(name string) *liveNode {
	return &liveNode{heapIndex: -1, identity: issuer.Identity{NodeID: name}}
}

// fireRecorder records the renewals a scheduler fires, in order, and when.
type fireRecorder struct {
	mu    sync.Mutex
	names []string
	at    map[string]time.Time
	n     atomic.Int64
}

func newFireRecorder() *fireRecorder { return &fireRecorder{at: map[string]time.Time{}} }

func (r *fireRecorder) fire(_ context.Context, ln *liveNode) {
	now := time.Now()
	r.mu.Lock()
	r.names = append(r.names, ln.identity.NodeID)
	if _, ok := r.at[ln.identity.NodeID]; !ok {
		r.at[ln.identity.NodeID] = now
	}
	r.mu.Unlock()
	r.n.Add(1)
}

func (r *fireRecorder) fired() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.names...)
}

func (r *fireRecorder) firedAt(name string) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	at, ok := r.at[name]
	return at, ok
}

// runScheduler runs s.run on its own goroutine; the returned stop cancels it
// and fails the test if run does not return promptly.
func runScheduler(t *testing.T, s *scheduler, workers int) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.run(ctx, workers); close(done) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(2 * time.Second):
				t.Errorf("scheduler.run did not return within 2s of its context ending")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// TestSchedulerBookkeeping: schedule, reschedule and unschedule keep one
// heap entry per node with its latest due time.
func TestSchedulerBookkeeping(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := newScheduler((&manualClock{t: t0}).Now, func(context.Context, *liveNode) {})
	a, b, c := schedNode("a"), schedNode("b"), schedNode("c")
	steps := []struct {
		name string
		do   func()
		want map[*liveNode]time.Time // every node's expected schedule; absent = not scheduled
	}{
		{"schedule three", func() {
			s.schedule(a, t0.Add(3*time.Second))
			s.schedule(b, t0.Add(1*time.Second))
			s.schedule(c, t0.Add(2*time.Second))
		}, map[*liveNode]time.Time{a: t0.Add(3 * time.Second), b: t0.Add(time.Second), c: t0.Add(2 * time.Second)}},
		{"reschedule earlier", func() { s.schedule(a, t0) },
			map[*liveNode]time.Time{a: t0, b: t0.Add(time.Second), c: t0.Add(2 * time.Second)}},
		{"reschedule later", func() { s.schedule(b, t0.Add(time.Hour)) },
			map[*liveNode]time.Time{a: t0, b: t0.Add(time.Hour), c: t0.Add(2 * time.Second)}},
		{"unschedule", func() { s.unschedule(c) },
			map[*liveNode]time.Time{a: t0, b: t0.Add(time.Hour)}},
		{"unschedule again", func() { s.unschedule(c) },
			map[*liveNode]time.Time{a: t0, b: t0.Add(time.Hour)}},
		{"schedule after unschedule", func() { s.schedule(c, t0.Add(time.Minute)) },
			map[*liveNode]time.Time{a: t0, b: t0.Add(time.Hour), c: t0.Add(time.Minute)}},
	}
	for _, st := range steps {
		st.do()
		if got := s.len(); got != len(st.want) {
			t.Errorf("%s: len() = %d, want %d", st.name, got, len(st.want))
		}
		for _, ln := range []*liveNode{a, b, c} {
			at, ok := s.scheduled(ln)
			want, wantOK := st.want[ln]
			if ok != wantOK || (ok && !at.Equal(want)) {
				t.Errorf("%s: scheduled(%s) = %v, %v; want %v, %v", st.name, ln.identity.NodeID, at, ok, want, wantOK)
			}
		}
		for i, ln := range s.h {
			if ln.heapIndex != i {
				t.Errorf("%s: heap[%d] has heapIndex %d", st.name, i, ln.heapIndex)
			}
		}
	}
}

// TestSchedulerFiresInDueOrder: many nodes scheduled in random order, some
// moved earlier, some later, some removed, fire in due order (one worker
// makes the order observable), each once, and the removed ones never.
func TestSchedulerFiresInDueOrder(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := &manualClock{t: t0}
	rec := newFireRecorder()
	s := newScheduler(clock.Now, rec.fire)

	const n = 1000
	nodes := make([]*liveNode, n)
	for i := range nodes {
		nodes[i] = schedNode(fmt.Sprintf("n%04d", i))
	}
	due := map[*liveNode]time.Time{}
	for _, i := range rand.Perm(n) { // distinct times 1..n s, scheduled in random order
		due[nodes[i]] = t0.Add(time.Duration(i+1) * time.Second)
		s.schedule(nodes[i], due[nodes[i]])
	}
	for i := 0; i < n; i += 7 { // earlier than every original time
		due[nodes[i]] = t0.Add(-time.Duration(i+1) * time.Millisecond)
		s.schedule(nodes[i], due[nodes[i]])
	}
	for i := 3; i < n; i += 5 { // later than every original time
		due[nodes[i]] = t0.Add(time.Duration(n+i) * time.Second)
		s.schedule(nodes[i], due[nodes[i]])
	}
	removed := map[string]bool{}
	for i := 0; i < n; i += 11 {
		s.unschedule(nodes[i])
		delete(due, nodes[i])
		removed[nodes[i].identity.NodeID] = true
	}
	if s.len() != len(due) {
		t.Fatalf("len() = %d, want %d", s.len(), len(due))
	}
	want := make([]*liveNode, 0, len(due))
	for ln := range due {
		want = append(want, ln)
	}
	sort.Slice(want, func(i, j int) bool { return due[want[i]].Before(due[want[j]]) })

	// Nothing is due at t0 - 1h: run must fire nothing.
	clock.Set(t0.Add(-time.Hour))
	stop := runScheduler(t, s, 1)
	time.Sleep(100 * time.Millisecond)
	if got := rec.n.Load(); got != 0 {
		t.Fatalf("%d renewals fired before any was due", got)
	}
	stop()

	clock.Set(t0.Add(24 * time.Hour)) // everything due
	runScheduler(t, s, 1)
	if !eventually(5*time.Second, func() bool { return rec.n.Load() >= int64(len(want)) }) {
		t.Fatalf("%d of %d due renewals fired", rec.n.Load(), len(want))
	}
	time.Sleep(50 * time.Millisecond) // let a duplicate or a removed node show up
	got := rec.fired()
	if len(got) != len(want) {
		t.Fatalf("%d renewals fired, want %d", len(got), len(want))
	}
	for i, name := range got {
		if removed[name] {
			t.Fatalf("unscheduled node %s fired", name)
		}
		if name != want[i].identity.NodeID {
			t.Fatalf("renewal %d fired for %s (due %s), want %s (due %s)", i, name,
				due[nodes[indexOf(nodes, name)]].Sub(t0), want[i].identity.NodeID, due[want[i]].Sub(t0))
		}
	}
	if s.len() != 0 {
		t.Errorf("len() = %d after everything fired, want 0", s.len())
	}
	for _, ln := range nodes {
		if _, ok := s.scheduled(ln); ok {
			t.Errorf("%s still scheduled after firing", ln.identity.NodeID)
		}
	}
}

func indexOf(nodes []*liveNode, name string) int {
	for i, ln := range nodes {
		if ln.identity.NodeID == name {
			return i
		}
	}
	return -1
}

// TestSchedulerRealTime: with the real clock and several workers, every
// renewal fires once, never before it is due and soon after.
func TestSchedulerRealTime(t *testing.T) {
	rec := newFireRecorder()
	s := newScheduler(time.Now, rec.fire)
	runScheduler(t, s, 4)
	const n = 200
	base := time.Now()
	due := map[string]time.Time{}
	for i := range n {
		name := fmt.Sprintf("rt%03d", i)
		due[name] = base.Add(time.Duration(rand.IntN(300)) * time.Millisecond)
		s.schedule(schedNode(name), due[name])
	}
	if !eventually(5*time.Second, func() bool { return rec.n.Load() >= n }) {
		t.Fatalf("%d of %d renewals fired", rec.n.Load(), n)
	}
	time.Sleep(50 * time.Millisecond)
	if got := rec.n.Load(); got != n {
		t.Errorf("%d renewals fired, want %d (one each)", got, n)
	}
	for name, at := range due {
		fired, ok := rec.firedAt(name)
		switch {
		case !ok:
			t.Errorf("%s never fired", name)
		case fired.Before(at):
			t.Errorf("%s fired %s early", name, at.Sub(fired))
		case fired.Sub(at) > time.Second:
			t.Errorf("%s fired %s late", name, fired.Sub(at))
		}
	}
}

// TestSchedulerReschedule: moving a node earlier than the renewal the timer
// waits for wakes the scheduler; moving one later or removing it keeps it
// from firing at its old time.
func TestSchedulerReschedule(t *testing.T) {
	rec := newFireRecorder()
	s := newScheduler(time.Now, rec.fire)
	runScheduler(t, s, 2)
	far, farther := schedNode("far"), schedNode("farther")
	s.schedule(far, time.Now().Add(10*time.Second))
	s.schedule(farther, time.Now().Add(20*time.Second))
	time.Sleep(50 * time.Millisecond) // run is now waiting ~10 s for "far"

	moved := time.Now().Add(100 * time.Millisecond)
	s.schedule(farther, moved)
	later, gone := schedNode("later"), schedNode("gone")
	s.schedule(later, time.Now().Add(100*time.Millisecond))
	s.schedule(gone, time.Now().Add(100*time.Millisecond))
	s.schedule(later, time.Now().Add(time.Hour))
	s.unschedule(gone)

	if !eventually(2*time.Second, func() bool { _, ok := rec.firedAt("farther"); return ok }) {
		t.Fatal("node rescheduled earlier did not fire at its new time")
	}
	if at, _ := rec.firedAt("farther"); at.Before(moved) {
		t.Errorf("fired %s before its new due time", moved.Sub(at))
	}
	time.Sleep(300 * time.Millisecond)
	if got := rec.fired(); len(got) != 1 {
		t.Errorf("fired %v, want only [farther]", got)
	}
	if at, ok := s.scheduled(later); !ok || at.Sub(time.Now()) < 50*time.Minute {
		t.Errorf("node rescheduled later: scheduled(%v, %v), want about an hour from now", at, ok)
	}
	if s.len() != 2 { // far and later
		t.Errorf("len() = %d, want 2", s.len())
	}
}

// TestSchedulerRunStops: run returns once its context ends, whether idle,
// waiting for a renewal, or with every worker busy and more renewals due.
func TestSchedulerRunStops(t *testing.T) {
	tests := []struct {
		name  string
		setup func(s *scheduler)
		busy  bool // fire blocks until the context ends
	}{
		{name: "idle", setup: func(*scheduler) {}},
		{name: "waiting", setup: func(s *scheduler) { s.schedule(schedNode("a"), time.Now().Add(time.Hour)) }},
		{name: "workers busy", busy: true, setup: func(s *scheduler) {
			for i := range 3 {
				s.schedule(schedNode(fmt.Sprint(i)), time.Now())
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var fired, afterStop atomic.Int64
			var stopped atomic.Bool
			started := make(chan struct{}, 8)
			s := newScheduler(time.Now, func(ctx context.Context, _ *liveNode) {
				fired.Add(1)
				if stopped.Load() {
					afterStop.Add(1)
				}
				started <- struct{}{}
				if tc.busy {
					<-ctx.Done()
				}
			})
			tc.setup(s)
			stop := runScheduler(t, s, 1)
			if tc.busy {
				select {
				case <-started:
				case <-time.After(2 * time.Second):
					t.Fatal("no renewal started")
				}
			}
			time.Sleep(50 * time.Millisecond)
			stopped.Store(true)
			start := time.Now()
			stop()
			if d := time.Since(start); d > time.Second {
				t.Errorf("run took %s to return", d)
			}
			if tc.busy && fired.Load() != 1 {
				t.Errorf("%d renewals fired with one busy worker, want 1", fired.Load())
			}
			if afterStop.Load() != 0 {
				t.Errorf("%d renewals fired after the context ended", afterStop.Load())
			}
		})
	}
}

func TestParseRenewWindow(t *testing.T) {
	tests := []struct {
		in   string
		want RenewWindow
		ok   bool
	}{
		{"0.5-0.8", RenewWindow{0.5, 0.8}, true},
		{" 0.6 - 0.7 ", RenewWindow{0.6, 0.7}, true},
		{"0.3-0.3", RenewWindow{0.3, 0.3}, true},
		{"0.5-0.9", RenewWindow{0.5, 0.9}, true},
		{"0.8-0.5", RenewWindow{}, false},
		{"0-0.5", RenewWindow{}, false},
		{"0.5-0.95", RenewWindow{}, false},
		{"0.5-1", RenewWindow{}, false},
		{"abc", RenewWindow{}, false},
		{"0.5", RenewWindow{}, false},
		{"", RenewWindow{}, false},
		{"-0.5-0.8", RenewWindow{}, false},
		{"0.5-0.8-0.9", RenewWindow{}, false},
		{"0.5-0.8x", RenewWindow{}, false},
		{"NaN-0.8", RenewWindow{}, false},
		{"0.5-NaN", RenewWindow{}, false},
		{"0.5-Inf", RenewWindow{}, false},
	}
	for _, tc := range tests {
		got, err := ParseRenewWindow(tc.in)
		switch {
		case tc.ok && err != nil:
			t.Errorf("ParseRenewWindow(%q): %v", tc.in, err)
		case tc.ok && got != tc.want:
			t.Errorf("ParseRenewWindow(%q) = %v, want %v", tc.in, got, tc.want)
		case !tc.ok && err == nil:
			t.Errorf("ParseRenewWindow(%q) = %v, want an error", tc.in, got)
		case !tc.ok && !strings.Contains(err.Error(), "renew_window"):
			t.Errorf("ParseRenewWindow(%q): error %q does not name renew_window", tc.in, err)
		}
	}
	if err := (RenewWindow{}).Validate(); err == nil {
		t.Error("zero RenewWindow validates")
	}
	if err := DefaultRenewWindow.Validate(); err != nil {
		t.Errorf("DefaultRenewWindow: %v", err)
	}
	if s := DefaultRenewWindow.String(); s != "0.5-0.8" {
		t.Errorf("DefaultRenewWindow.String() = %q", s)
	}
}

// TestNewRefusesBadRenewWindow: the server refuses a window leaving no
// room for retries before expiry.
func TestNewRefusesBadRenewWindow(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ca, err := local.Open(ctx, t.TempDir(), local.Options{TrustDomain: testTrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	kv := store.NewMemory()
	_, err = New(ctx, Config{TrustDomain: testTrustDomain, Issuer: ca, Tokens: bootstrap.NewRegistry(kv, time.Now),
		Store: kv, Metrics: NewMetrics(prometheus.NewRegistry()), Logger: discardLogger(),
		RenewWindow: RenewWindow{0.5, 0.95}})
	if err == nil || !strings.Contains(err.Error(), "renew_window") {
		t.Errorf("New with renew window 0.5-0.95: %v, want a renew_window error", err)
	}
}

func TestRenewAt(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		w    RenewWindow
		ttl  time.Duration
		u    float64
		want time.Duration
	}{
		{DefaultRenewWindow, time.Hour, 0, 30 * time.Minute},
		{DefaultRenewWindow, time.Hour, 0.5, 39 * time.Minute},
		{DefaultRenewWindow, 10 * time.Second, 0, 5 * time.Second},
		{RenewWindow{0.6, 0.6}, time.Hour, 0.7, 36 * time.Minute},
	}
	for _, tc := range tests {
		if got := tc.w.renewAt(t0, tc.ttl, tc.u).Sub(t0); got != tc.want {
			t.Errorf("%v.renewAt(ttl %s, u %g) = +%s, want +%s", tc.w, tc.ttl, tc.u, got, tc.want)
		}
	}
	// u just below 1 stays inside the window.
	if got := DefaultRenewWindow.renewAt(t0, time.Hour, 0.999999).Sub(t0); got >= 48*time.Minute || got < 47*time.Minute {
		t.Errorf("renewAt(u→1) = +%s, want just under +48m", got)
	}
	sp := newSpreader()
	for range 10000 {
		if u := sp.next(); u < 0 || u >= 1 {
			t.Fatalf("spreader drew %g, outside [0,1)", u)
		}
	}
}

// TestRetryDelay: full-jitter exponential backoff, in (0, cap+100ms], whose
// ceiling doubles with each attempt up to the cap.
func TestRetryDelay(t *testing.T) {
	const samples = 2000
	ceiling := func(attempt int) time.Duration {
		c := retryBase
		for i := 1; i < attempt && c < retryCap; i++ {
			c *= 2
		}
		return min(c, retryCap) + 100*time.Millisecond
	}
	prevMax := time.Duration(0)
	for _, attempt := range []int{1, 2, 3, 4, 5, 6, 7, 8, 10, 31, 100, 1 << 20} {
		var lo, hi time.Duration = time.Hour, 0
		for range samples {
			d := retryDelay(attempt, retryCap)
			if d <= 0 || d > retryCap+100*time.Millisecond {
				t.Fatalf("retryDelay(%d) = %s, outside (0, %s]", attempt, d, retryCap+100*time.Millisecond)
			}
			if d > ceiling(attempt) {
				t.Fatalf("retryDelay(%d) = %s, above its ceiling %s", attempt, d, ceiling(attempt))
			}
			lo, hi = min(lo, d), max(hi, d)
		}
		// Full jitter: the draws cover the whole range, not just its top.
		if c := ceiling(attempt); hi < c*3/4 || lo > c/4+100*time.Millisecond {
			t.Errorf("retryDelay(%d): %d draws in [%s, %s], want them spread over (100ms, %s]", attempt, samples, lo, hi, c)
		}
		if hi < prevMax*9/10 {
			t.Errorf("retryDelay(%d): largest draw %s, below the previous attempt's %s", attempt, hi, prevMax)
		}
		prevMax = hi
	}
}

// ---- renewal end to end -------------------------------------------------------

// issueMode is how flakyIssuer answers.
type issueMode int

const (
	issueOK issueMode = iota
	issueFail
	issueHang // block until the context ends
	issueExpired
	issueNotYetValid
	issueEmptyChain
	issueNoLeaf
	issueNoTTL
)

var errTestCA = errors.New("test CA unavailable")

// flakyIssuer is the built-in CA whose answers a test can break, for every
// service or for one. The broken certificates are the CA's own with the
// parsed fields checkFresh reads altered (their DER is still valid): any
// push of one is a failure whatever its content.
type flakyIssuer struct {
	*bundleIssuer
	mu        sync.Mutex
	def       issueMode
	byService map[string]issueMode
	calls     atomic.Int64
	inflight  atomic.Int64
}

func (f *flakyIssuer) set(service string, m issueMode) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if service == "" {
		f.def = m
		return
	}
	f.byService[service] = m
}

func (f *flakyIssuer) mode(service string) issueMode {
	f.mu.Lock()
	defer f.mu.Unlock()
	if m, ok := f.byService[service]; ok {
		return m
	}
	return f.def
}

func (f *flakyIssuer) Issue(ctx context.Context, req issuer.Request) (*issuer.Certificate, error) {
	f.calls.Add(1)
	f.inflight.Add(1)
	defer f.inflight.Add(-1)
	m := f.mode(req.Identity.Service)
	switch m {
	case issueFail:
		return nil, errTestCA
	case issueHang:
		<-ctx.Done()
		return nil, ctx.Err()
	}
	c, err := f.CA.Issue(ctx, req)
	if err != nil {
		return nil, err
	}
	l := *c.Leaf
	switch m {
	case issueExpired:
		l.NotAfter = c.IssuedAt.Add(-time.Second)
	case issueNotYetValid:
		l.NotBefore = c.IssuedAt.Add(2 * time.Hour)
	case issueEmptyChain:
		c.ChainPEM = nil
	case issueNoLeaf:
		c.Leaf = nil
		return c, nil
	case issueNoTTL:
		c.TTL = 0
	}
	c.Leaf = &l
	return c, nil
}

// rotationEnv is a testEnv whose server has a short or chosen certificate
// lifetime and an issuer the test can break.
type rotationEnv struct {
	*testEnv
	fake *flakyIssuer
}

// newRotationEnv is newTestEnvWith with the server options the rotation
// tests need: o.wrapIssuer is set here, and a zero o.issueTimeout means 2 s.
func newRotationEnv(t *testing.T, o envOptions) *rotationEnv {
	t.Helper()
	if o.issueTimeout == 0 {
		o.issueTimeout = 2 * time.Second
	}
	var fake *flakyIssuer
	o.wrapIssuer = func(bi *bundleIssuer) issuer.Issuer {
		fake = &flakyIssuer{bundleIssuer: bi, byService: map[string]issueMode{}}
		return fake
	}
	env := newTestEnvWith(t, o)
	return &rotationEnv{testEnv: env, fake: fake}
}

// tick wakes the renewal scheduler so that it looks at the test clock
// again: moving the clock does not move a timer armed for the old due time.
// It schedules a throwaway node, due at once, that renew drops (it has no
// stream); the nodes under test are left alone.
func (e *rotationEnv) tick() { e.srv.sched.schedule(schedNode("tick"), time.Time{}) }

// setClock moves the test clock so that it reads at.
func (e *rotationEnv) setClock(at time.Time) { e.clock.Advance(at.Sub(e.clock.Now())) }

func (e *rotationEnv) live(t *testing.T, nodeID string) *liveNode {
	t.Helper()
	e.srv.mu.Lock()
	defer e.srv.mu.Unlock()
	ln := e.srv.live[nodeID]
	if ln == nil {
		t.Fatalf("node %s is not live", nodeID)
	}
	return ln
}

// nodeInfo is GET /v1/nodes/{id} of the admin API.
func (e *rotationEnv) nodeInfo(t *testing.T, nodeID string) NodeInfo {
	t.Helper()
	code, body, _ := adminDo(t, e.srv.AdminHandler(), http.MethodGet, "/v1/nodes/"+nodeID, "")
	if code != http.StatusOK {
		t.Fatalf("GET /v1/nodes/%s: %d %s", nodeID, code, body)
	}
	var info NodeInfo
	if err := json.Unmarshal([]byte(body), &info); err != nil {
		t.Fatalf("GET /v1/nodes/%s: %v", nodeID, err)
	}
	return info
}

// gauge reads an unlabelled gauge from the server's registry, as a scrape
// would.
func (e *rotationEnv) gauge(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := e.prom.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			if len(mf.GetMetric()) != 1 || mf.GetMetric()[0].GetGauge() == nil {
				t.Fatalf("%s is not one gauge: %v", name, mf)
			}
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func (e *rotationEnv) failures(t *testing.T) float64 {
	t.Helper()
	return metricValue(t, e.metrics.certsIssued.WithLabelValues("failure"))
}

// ackOf is the ACK of r on a stream of kind v subscribed to names.
func ackOf(v variant, r *xdsReply, names []string) xdsReq {
	ack := xdsReq{version: r.version, nonce: r.nonce}
	if !v.delta {
		ack.names = names
	}
	return ack
}

func serialOf(c *x509.Certificate) string { return fmt.Sprintf("%x", c.SerialNumber) }

// issuedAtOf is the issue time of a leaf of the built-in CA.
func issuedAtOf(c *x509.Certificate) time.Time { return c.NotBefore.Add(issuer.Backdate) }

// TestRenewalPushedInWindow: the renewal of a short-lived certificate is
// pushed on the open stream within [50 %, 80 %] of its life; the node record
// shows the new serial as issued at once, and as serving only once Envoy
// ACKs it (a NACK or silence leaves the old one).
func TestRenewalPushedInWindow(t *testing.T) {
	const ttl = 4 * time.Second
	// The window itself is checked on renew_at, the scheduler's decision;
	// the push is checked never to come early, and late only by more than
	// lateSlop: a loaded machine delays delivery, not the decision.
	const lateSlop = ttl / 2
	names := []string{SecretDefault, SecretRootCA}
	tests := []struct {
		v     variant
		reply string // what the client answers the renewal: ack, nack, none
	}{
		{sdsSotw, "ack"},
		{adsDelta, "ack"},
		{adsSotw, "nack"},
		{sdsDelta, "none"},
	}
	for _, tc := range tests {
		t.Run(tc.v.name+"/"+tc.reply, func(t *testing.T) {
			t.Parallel()
			env := newRotationEnv(t, envOptions{certTTL: ttl})
			token, rec := env.token(t, "frontend", 0, 0)
			claimed := "renew-" + tc.v.name
			r, s := env.fetch(t, tc.v, token, claimed, names...)
			l1 := leaf(t, r.secrets[SecretDefault])
			s1 := serialOf(l1)
			issuedAt := issuedAtOf(l1)
			if got := l1.NotAfter.Sub(issuedAt); got != ttl {
				t.Fatalf("first certificate lives %s, want %s", got, ttl)
			}
			send(t, s, ackOf(tc.v, r, names))
			node := env.nodeFor(t, rec.ID, claimed)
			if !eventually(2*time.Second, func() bool {
				n := env.nodeInfo(t, node.ID)
				return n.IssuedSerial == s1 && n.ServingSerial == s1
			}) {
				n := env.nodeInfo(t, node.ID)
				t.Fatalf("after the first ACK: issued %q serving %q, want %q for both", n.IssuedSerial, n.ServingSerial, s1)
			}
			lo, hi := issuedAt.Add(ttl/2), issuedAt.Add(ttl*8/10)
			if at := env.nodeInfo(t, node.ID).RenewAt; at.Before(lo) || at.After(hi) {
				t.Errorf("renew_at %s after issue, want within [%s, %s]", at.Sub(issuedAt), ttl/2, ttl*8/10)
			}

			push, err := s.recv(time.Until(hi) + 2*time.Second)
			arrived := time.Now()
			if err != nil {
				t.Fatalf("no renewal pushed: %v", err)
			}
			t.Logf("renewal arrived %s after issue (window [%s, %s])", arrived.Sub(issuedAt), ttl/2, ttl*8/10)
			if arrived.Before(lo) || arrived.After(hi.Add(lateSlop)) {
				t.Errorf("renewal arrived %s after issue, want within [%s, %s] (+%s for delivery)", arrived.Sub(issuedAt), ttl/2, ttl*8/10, lateSlop)
			}
			sec := push.secrets[SecretDefault]
			if sec == nil {
				t.Fatalf("push carries %v, want default", push.names)
			}
			want := names
			if tc.v.delta {
				want = []string{SecretDefault} // ROOTCA did not change
			}
			if !sameNames(push.names, want) {
				t.Errorf("push carries %v, want %v", push.names, want)
			}
			l2 := leaf(t, sec)
			s2 := serialOf(l2)
			if s2 == s1 {
				t.Fatalf("renewal carries the old serial %s", s1)
			}
			if l2.Subject.CommonName != node.ID || len(l2.URIs) != 1 || l2.URIs[0].String() != spiffeID("frontend") {
				t.Errorf("renewed certificate is for %s %v", l2.Subject.CommonName, l2.URIs)
			}
			if bytes.Equal(sec.GetTlsCertificate().GetPrivateKey().GetInlineBytes(),
				r.secrets[SecretDefault].GetTlsCertificate().GetPrivateKey().GetInlineBytes()) {
				t.Error("renewal reuses the old private key")
			}
			if !l2.NotAfter.After(l1.NotAfter) {
				t.Errorf("renewed certificate expires at %s, not after the old one (%s)", l2.NotAfter, l1.NotAfter)
			}

			if !eventually(2*time.Second, func() bool { return env.nodeInfo(t, node.ID).IssuedSerial == s2 }) {
				t.Fatalf("issued_serial = %q, want the renewal's %q", env.nodeInfo(t, node.ID).IssuedSerial, s2)
			}
			if got := env.nodeInfo(t, node.ID).ServingSerial; got != s1 {
				t.Errorf("serving_serial = %q before any ACK of the renewal, want the old %q", got, s1)
			}
			switch tc.reply {
			case "ack":
				send(t, s, ackOf(tc.v, push, names))
				if !eventually(2*time.Second, func() bool {
					n := env.nodeInfo(t, node.ID)
					return n.ServingSerial == s2 && n.ServingNotAfter.Equal(l2.NotAfter)
				}) {
					n := env.nodeInfo(t, node.ID)
					t.Errorf("after the ACK: serving %q (not after %s), want %q (%s)", n.ServingSerial, n.ServingNotAfter, s2, l2.NotAfter)
				}
				if countLines(env.logs.String(), "envoy loaded certificate", "serial="+s2) != 1 {
					t.Errorf("want one log line of Envoy loading %s", s2)
				}
			case "nack":
				nacks := env.metrics.nacks.WithLabelValues(xdsres.SecretType)
				before := metricValue(t, nacks)
				nack := ackOf(tc.v, push, names)
				nack.version = r.version // Envoy keeps the version it has
				nack.nack = "bad private key 4711"
				send(t, s, nack)
				if !eventually(2*time.Second, func() bool { return metricValue(t, nacks) == before+1 }) {
					t.Fatalf("sds_nacks_total = %v, want %v", metricValue(t, nacks), before+1)
				}
				if countLines(env.logs.String(), "envoy rejected a response", "bad private key 4711") != 1 {
					t.Errorf("want one log line with the NACK's text; logs:\n%s", env.logs.String())
				}
				if got := env.nodeInfo(t, node.ID).ServingSerial; got != s1 {
					t.Errorf("serving_serial = %q after a NACK, want the old %q", got, s1)
				}
			case "none":
				time.Sleep(300 * time.Millisecond)
				if got := env.nodeInfo(t, node.ID).ServingSerial; got != s1 {
					t.Errorf("serving_serial = %q without an ACK, want the old %q", got, s1)
				}
			}
		})
	}
}

// TestRenewalPushedToEveryStream: one renewal reaches every open stream of
// the node, SotW and delta, standalone SDS and ADS, with the same
// certificate.
func TestRenewalPushedToEveryStream(t *testing.T) {
	t.Parallel()
	const ttl = 4 * time.Second
	env := newRotationEnv(t, envOptions{certTTL: ttl})
	token, _ := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}
	streams := map[string]xdsStream{}
	var s1 string
	var hi time.Time
	for _, v := range allVariants {
		r, s := env.fetch(t, v, token, "multi", names...)
		l := leaf(t, r.secrets[SecretDefault])
		if s1 == "" {
			s1, hi = serialOf(l), issuedAtOf(l).Add(ttl*8/10)
		} else if serialOf(l) != s1 {
			t.Fatalf("%s: serial %s, want the node's %s", v.name, serialOf(l), s1)
		}
		send(t, s, ackOf(v, r, names))
		streams[v.name] = s
	}
	if got := metricValue(t, env.metrics.connectedSidecars); got != 1 {
		t.Fatalf("sds_connected_nodes = %v, want 1", got)
	}
	var s2 string
	for _, v := range allVariants {
		push, err := streams[v.name].recv(time.Until(hi) + 2*time.Second)
		if err != nil {
			t.Fatalf("%s: no renewal pushed: %v", v.name, err)
		}
		sec := push.secrets[SecretDefault]
		if sec == nil {
			t.Fatalf("%s: push carries %v, want default", v.name, push.names)
		}
		got := serialOf(leaf(t, sec))
		if got == s1 {
			t.Fatalf("%s: push carries the old certificate", v.name)
		}
		if s2 == "" {
			s2 = got
		} else if got != s2 {
			t.Errorf("%s: renewal %s, other streams got %s", v.name, got, s2)
		}
	}
}

// failingNode opens one SotW stream of a node on env (certificate lifetime
// one hour), ACKs its certificate and returns the stream, the node ID and
// the leaf.
func failingNode(t *testing.T, env *rotationEnv, service, claimed string) (xdsStream, string, *x509.Certificate) {
	t.Helper()
	token, rec := env.token(t, service, 0, 0)
	names := []string{SecretDefault, SecretRootCA}
	r, s := env.fetch(t, sdsSotw, token, claimed, names...)
	send(t, s, ackOf(sdsSotw, r, names))
	node := env.nodeFor(t, rec.ID, claimed)
	l := leaf(t, r.secrets[SecretDefault])
	if !eventually(2*time.Second, func() bool { return env.nodeInfo(t, node.ID).ServingSerial == serialOf(l) }) {
		t.Fatalf("first certificate not ACKed")
	}
	return s, node.ID, l
}

// TestRenewalFailureBackoffAndRecovery: when the CA fails at renewal time
// the node keeps its certificate and nothing is pushed; retries back off;
// the failure shows in the metrics, the admin API and the log; /readyz
// turns not ready only once the certificate is within 10 % of expiry; when
// the CA recovers a new certificate is pushed and everything clears.
func TestRenewalFailureBackoffAndRecovery(t *testing.T) {
	t.Parallel()
	env := newRotationEnv(t, envOptions{certTTL: time.Hour, issueTimeout: 500 * time.Millisecond})
	s, nodeID, l1 := failingNode(t, env, "frontend", "failing")
	s1, issuedAt := serialOf(l1), issuedAtOf(l1)
	ctx := context.Background()
	if err := env.srv.Ready(ctx); err != nil {
		t.Fatalf("Ready before any failure: %v", err)
	}

	env.fake.set("", issueFail)
	before, calls := env.failures(t), env.fake.calls.Load()
	env.setClock(issuedAt.Add(51 * time.Minute)) // past any renewal time, 15 % of life left
	env.tick()
	if !eventually(3*time.Second, func() bool { return env.failures(t) >= before+1 }) {
		t.Fatal("renewal did not run (or its failure was not counted)")
	}
	if r, err := s.recv(2500 * time.Millisecond); !errors.Is(err, errNoReply) {
		t.Fatalf("failed renewal pushed something: %v, %v", r, err)
	}
	attempts := env.failures(t) - before
	// Attempt 2 is due at most 1.1 s after attempt 1. Without backoff (or
	// with a fixed 100 ms delay) there would be dozens in 2.5 s.
	if attempts < 2 || attempts > 8 {
		t.Errorf("%v failed attempts in 2.5 s, want 2..8 (exponential backoff)", attempts)
	}
	// One more call may be under way, not yet counted.
	if got := float64(env.fake.calls.Load() - calls); got != attempts && got != attempts+1 {
		t.Errorf("%v CA calls for %v counted failures", got, attempts)
	}
	if got := env.gauge(t, "sds_nodes_renewal_failing"); got != 1 {
		t.Errorf("sds_nodes_renewal_failing = %v, want 1", got)
	}
	// (A retry being worked on is briefly out of the heap.)
	if !eventually(time.Second, func() bool { return env.gauge(t, "sds_renewals_scheduled") == 1 }) {
		t.Errorf("sds_renewals_scheduled = %v, want 1 (the retry)", env.gauge(t, "sds_renewals_scheduled"))
	}
	if err := env.srv.Ready(ctx); err != nil {
		t.Errorf("Ready with 15 %% of life left: %v, want ready", err)
	}
	// The counter is bumped just before the node's failure count and log.
	if !eventually(time.Second, func() bool {
		info := env.nodeInfo(t, nodeID)
		return info.RenewalFailures >= 2 && strings.Contains(info.LastError, errTestCA.Error()) &&
			countLines(env.logs.String(), "certificate renewal failed", "node_id="+nodeID, errTestCA.Error()) >= 2
	}) {
		info := env.nodeInfo(t, nodeID)
		t.Errorf("node info: renewal_failures %d, last_error %q; want ≥ 2 and the CA's error, and a log line per attempt", info.RenewalFailures, info.LastError)
	}
	info := env.nodeInfo(t, nodeID)
	if info.IssuedSerial != s1 || info.ServingSerial != s1 {
		t.Errorf("node info: issued %q serving %q, want the current %q", info.IssuedSerial, info.ServingSerial, s1)
	}
	if cs := env.live(t, nodeID).cur.Load(); cs.serial != s1 {
		t.Errorf("current certificate %s, want the kept %s", cs.serial, s1)
	}
	if res := env.srv.cache.get(nodeID, xdsres.SecretType, SecretDefault); res == nil || res.version != s1 {
		t.Errorf("cached default secret %v, want version %s", res, s1)
	}

	// 8 % of life left, still failing: not ready.
	env.setClock(issuedAt.Add(55 * time.Minute))
	if err := env.srv.Ready(ctx); err == nil || !strings.Contains(err.Error(), "expiry") {
		t.Errorf("Ready within 10 %% of expiry with renewal failing: %v, want not ready", err)
	}

	// The CA recovers. Two minutes on, every pending retry (≤ cap+100ms)
	// is due. An attempt under way when the CA recovered may still fail
	// and schedule its retry from the moved clock: one more minute then.
	env.fake.set("", issueOK)
	env.clock.Advance(2 * time.Minute)
	env.tick()
	push, err := s.recv(2 * time.Second)
	if errors.Is(err, errNoReply) {
		env.clock.Advance(time.Minute) // 2 minutes of life left
		env.tick()
		push, err = s.recv(recvTimeout)
	}
	if err != nil {
		t.Fatalf("no certificate pushed after the CA recovered: %v", err)
	}
	sec := push.secrets[SecretDefault]
	if sec == nil || serialOf(leaf(t, sec)) == s1 {
		t.Fatalf("push after recovery carries %v, want a new default", push.names)
	}
	s2 := serialOf(leaf(t, sec))
	if !eventually(2*time.Second, func() bool { return env.nodeInfo(t, nodeID).IssuedSerial == s2 }) {
		t.Errorf("issued_serial not updated to %s", s2)
	}
	info = env.nodeInfo(t, nodeID)
	if info.RenewalFailures != 0 || info.LastError != "" {
		t.Errorf("after recovery: renewal_failures %d, last_error %q; want cleared", info.RenewalFailures, info.LastError)
	}
	if got := env.gauge(t, "sds_nodes_renewal_failing"); got != 0 {
		t.Errorf("sds_nodes_renewal_failing = %v after recovery, want 0", got)
	}
	if err := env.srv.Ready(ctx); err != nil {
		t.Errorf("Ready after recovery: %v", err)
	}
}

// TestRenewalRefusesBadCertificates: whatever goes wrong with the CA (an
// error, a hang past IssueTimeout, an expired, not yet valid, empty or
// lifetime-less certificate), nothing is pushed, the current certificate
// stays, and the attempt counts as a failure, at renewal and at admission.
func TestRenewalRefusesBadCertificates(t *testing.T) {
	tests := []struct {
		name    string
		mode    issueMode
		wantErr string
	}{
		{"error", issueFail, errTestCA.Error()},
		{"hang", issueHang, "deadline exceeded"},
		{"expired", issueExpired, "expired"},
		{"not yet valid", issueNotYetValid, "valid only from"},
		{"empty chain", issueEmptyChain, "empty certificate"},
		{"no leaf", issueNoLeaf, "empty certificate"},
		{"no lifetime", issueNoTTL, "without a lifetime"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newRotationEnv(t, envOptions{certTTL: time.Hour, issueTimeout: 300 * time.Millisecond})
			s, nodeID, l1 := failingNode(t, env, "frontend", "bad-"+tc.name)
			s1 := serialOf(l1)

			env.fake.set("", tc.mode)
			before := env.failures(t)
			env.setClock(issuedAtOf(l1).Add(51 * time.Minute))
			env.tick()
			if !eventually(3*time.Second, func() bool { return env.nodeInfo(t, nodeID).RenewalFailures >= 1 }) {
				t.Fatal("renewal did not fail")
			}
			if got := env.failures(t); got < before+1 {
				t.Errorf("failures counted %v, want ≥ %v", got, before+1)
			}
			if r, err := s.recv(300 * time.Millisecond); !errors.Is(err, errNoReply) {
				t.Fatalf("bad certificate pushed: %v, %v", r, err)
			}
			if info := env.nodeInfo(t, nodeID); !strings.Contains(info.LastError, tc.wantErr) || info.IssuedSerial != s1 {
				t.Errorf("node info: last_error %q, issued %q; want %q and the kept %s", info.LastError, info.IssuedSerial, tc.wantErr, s1)
			}
			if res := env.srv.cache.get(nodeID, xdsres.SecretType, SecretDefault); res == nil || res.version != s1 {
				t.Errorf("cached default secret %v, want version %s", res, s1)
			}

			// A new node gets nothing either: its stream is refused.
			token, _ := env.token(t, "backend", 0, 0)
			before = env.failures(t)
			s2 := env.open(t, sdsSotw, bearer(token))
			send(t, s2, xdsReq{node: "newcomer", names: []string{SecretDefault, SecretRootCA}})
			r, err := s2.recv(recvTimeout)
			if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("new node with a bad CA: (%v, %v), want Unavailable mentioning %q", r, err, tc.wantErr)
			}
			if got := env.failures(t); got < before+1 { // (the first node's retries count too)
				t.Errorf("admission failure not counted")
			}
		})
	}
}

// TestHangingIssuerDoesNotBlockOthers: while the CA hangs on one node's
// renewal, another node is renewed and a new node admitted at once; the
// hung renewal ends at IssueTimeout as a failure.
func TestHangingIssuerDoesNotBlockOthers(t *testing.T) {
	t.Parallel()
	// Long enough that a loaded machine cannot make the other node's work
	// outlast it: the checks below compare against it, not a stopwatch.
	const issueTimeout = 6 * time.Second
	env := newRotationEnv(t, envOptions{certTTL: time.Hour, issueTimeout: issueTimeout, renewWorkers: 2})
	stuck, stuckID, lStuck := failingNode(t, env, "stuck", "stuck-1")
	free, _, lFree := failingNode(t, env, "free", "free-1")

	env.fake.set("stuck", issueHang)
	env.setClock(issuedAtOf(lFree).Add(51 * time.Minute))
	// Both renewals are due; make the stuck one go first, so that the
	// other is only renewed if the hang holds one worker, not the pool.
	env.srv.sched.schedule(env.live(t, stuckID), time.Time{})
	env.tick()
	start := time.Now()
	if !eventually(2*time.Second, func() bool { return env.fake.inflight.Load() >= 1 }) {
		t.Fatal("the stuck renewal did not start")
	}
	push, err := free.recv(2 * time.Second)
	if err != nil {
		t.Fatalf("other node not renewed while the CA hangs on one: %v", err)
	}
	if sec := push.secrets[SecretDefault]; sec == nil || serialOf(leaf(t, sec)) == serialOf(lFree) {
		t.Fatalf("other node's push carries %v, want a new default", push.names)
	}

	token, _ := env.token(t, "free", 0, 0)
	admitStart := time.Now()
	if _, s := env.fetch(t, sdsSotw, token, "free-2", SecretDefault); s == nil {
		t.Fatal("no stream")
	}
	if d := time.Since(admitStart); d > issueTimeout/2 {
		t.Errorf("admitting a node took %s while the CA hangs on another", d)
	}
	if env.fake.inflight.Load() < 1 || time.Since(start) > issueTimeout {
		t.Fatalf("the stuck renewal ended before the other node's work was checked (%s)", time.Since(start))
	}
	if info := env.nodeInfo(t, stuckID); info.RenewalFailures != 0 {
		t.Fatalf("stuck renewal failed early: %+v", info)
	}

	if !eventually(issueTimeout+10*time.Second, func() bool { return env.nodeInfo(t, stuckID).RenewalFailures >= 1 }) {
		t.Fatal("hung renewal never timed out")
	}
	if d := time.Since(start); d < issueTimeout-100*time.Millisecond {
		t.Errorf("hung renewal failed after %s, before IssueTimeout", d)
	}
	if info := env.nodeInfo(t, stuckID); !strings.Contains(info.LastError, "deadline exceeded") || info.IssuedSerial != serialOf(lStuck) {
		t.Errorf("stuck node: last_error %q, issued %q", info.LastError, info.IssuedSerial)
	}
	if r, err := stuck.recv(10 * time.Millisecond); !errors.Is(err, errNoReply) {
		t.Errorf("stuck node got a push: %v, %v", r, err)
	}
}

// TestServingStaleGauge: sds_nodes_serving_stale_certificate counts
// connected nodes whose ACKed certificate is past 90 % of its life: not a
// node that never ACKed, and no longer a node once it ACKs its renewal.
func TestServingStaleGauge(t *testing.T) {
	t.Parallel()
	env := newRotationEnv(t, envOptions{certTTL: time.Hour})
	const stale = "sds_nodes_serving_stale_certificate"
	names := []string{SecretDefault, SecretRootCA}
	s, nodeID, l1 := failingNode(t, env, "frontend", "acked")
	// A second node that never ACKs: it serves nothing we know of.
	token, _ := env.token(t, "backend", 0, 0)
	env.fetch(t, sdsSotw, token, "silent", names...)
	issuedAt := issuedAtOf(l1)

	steps := []struct {
		at   time.Duration // clock, from the first node's issue
		want float64
	}{
		{0, 0},
		{51 * time.Minute, 0}, // 85 %: renewal due, not stale yet
		{55 * time.Minute, 1}, // 91.7 %
		{59 * time.Minute, 1}, // 98.3 %
	}
	for _, st := range steps {
		env.setClock(issuedAt.Add(st.at))
		if got := env.gauge(t, stale); got != st.want {
			t.Errorf("at %s: %s = %v, want %v", st.at, stale, got, st.want)
		}
		// Near expiry but no renewal has failed: still ready.
		if err := env.srv.Ready(context.Background()); err != nil {
			t.Errorf("at %s: Ready: %v", st.at, err)
		}
	}

	// Renewed (the scheduler wakes up) but not yet ACKed: Envoy still
	// serves the old one.
	env.tick()
	push, err := s.recv(recvTimeout)
	if err != nil {
		t.Fatalf("no renewal: %v", err)
	}
	if got := env.gauge(t, stale); got != 1 {
		t.Errorf("renewed, not ACKed: %s = %v, want 1", stale, got)
	}
	send(t, s, ackOf(sdsSotw, push, names))
	if !eventually(2*time.Second, func() bool { return env.gauge(t, stale) == 0 }) {
		t.Errorf("after ACKing the renewal: %s = %v, want 0", stale, env.gauge(t, stale))
	}
	l2 := leaf(t, push.secrets[SecretDefault])
	if info := env.nodeInfo(t, nodeID); info.ServingSerial != serialOf(l2) {
		t.Errorf("serving_serial %q, want %q", info.ServingSerial, serialOf(l2))
	}

	// A disconnected node is not counted, however old what it served.
	env.setClock(issuedAtOf(l2).Add(55 * time.Minute))
	if got := env.gauge(t, stale); got != 1 {
		t.Errorf("renewed certificate at 92 %%: %s = %v, want 1", stale, got)
	}
	s.close()
	if !eventually(2*time.Second, func() bool { return env.gauge(t, stale) == 0 }) {
		t.Errorf("after the node disconnected: %s = %v, want 0", stale, env.gauge(t, stale))
	}
}
