package sds

import (
	"container/heap"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"
)

// RenewWindow is where in a certificate's life it is renewed, as fractions of
// its requested TTL counted from its issue time (not from the backdated
// NotBefore, or short TTLs would renew at once).
type RenewWindow struct {
	Lo, Hi float64
}

// DefaultRenewWindow renews between 50 % and 80 % of a certificate's life.
var DefaultRenewWindow = RenewWindow{Lo: 0.5, Hi: 0.8}

// ParseRenewWindow parses "LO-HI", e.g. "0.5-0.8".
func ParseRenewWindow(s string) (RenewWindow, error) {
	lo, hi, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return RenewWindow{}, fmt.Errorf("renew_window %q: want LO-HI as fractions of the certificate lifetime, e.g. 0.5-0.8", s)
	}
	l, err1 := strconv.ParseFloat(strings.TrimSpace(lo), 64)
	h, err2 := strconv.ParseFloat(strings.TrimSpace(hi), 64)
	w := RenewWindow{Lo: l, Hi: h}
	if err1 != nil || err2 != nil {
		return RenewWindow{}, fmt.Errorf("renew_window %q: want LO-HI as fractions of the certificate lifetime, e.g. 0.5-0.8", s)
	}
	return w, w.Validate()
}

// Validate checks 0 < Lo <= Hi <= 0.9: renewal must leave time for retries
// before the certificate expires.
func (w RenewWindow) Validate() error {
	if !(w.Lo > 0 && w.Lo <= w.Hi && w.Hi <= 0.9) {
		return fmt.Errorf("renew_window %g-%g: want 0 < LO <= HI <= 0.9 (fractions of the certificate lifetime)", w.Lo, w.Hi)
	}
	return nil
}

func (w RenewWindow) String() string { return fmt.Sprintf("%g-%g", w.Lo, w.Hi) }

// spreader draws renewal points in [0,1) from a golden-ratio sequence with a
// random start. Each draw is uniform over the window, but consecutive draws
// are spread evenly instead of clumping as independent draws do: for 10,000
// certificates issued at once, independent draws make the busiest second
// about twice the average, this sequence keeps it near the average.
type spreader struct {
	mu sync.Mutex
	u  float64
}

const goldenFraction = 0.6180339887498949

func newSpreader() *spreader { return &spreader{u: rand.Float64()} }

func (s *spreader) next() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.u += goldenFraction
	if s.u >= 1 {
		s.u--
	}
	return s.u
}

// renewAt returns when a certificate issued at issuedAt for ttl renews.
func (w RenewWindow) renewAt(issuedAt time.Time, ttl time.Duration, u float64) time.Time {
	f := w.Lo + (w.Hi-w.Lo)*u
	return issuedAt.Add(time.Duration(float64(ttl) * f))
}

// Retry backoff after a failed renewal: exponential with full jitter.
const (
	retryBase = time.Second
	retryCap  = time.Minute
)

// retryDelay is the full-jitter backoff after attempt failures (1-based),
// capped at limit.
func retryDelay(attempt int, limit time.Duration) time.Duration {
	ceil := float64(retryBase) * math.Pow(2, float64(min(attempt, 30)-1))
	ceil = math.Min(ceil, float64(limit))
	return time.Duration(rand.Float64()*ceil) + 100*time.Millisecond
}

// retryLimit caps the backoff for a certificate of lifetime ttl: a tenth of
// the lifetime (so a short certificate is retried often enough to be
// replaced before it expires), at most retryCap, at least retryBase.
func retryLimit(ttl time.Duration) time.Duration {
	return max(retryBase, min(retryCap, ttl/10))
}

// scheduler fires renewals at their due time: one timer over a heap of
// nodes, not a goroutine per node, and a fixed pool of workers so a burst of
// due renewals is worked off at the CA's pace.
type scheduler struct {
	now  func() time.Time
	fire func(context.Context, *liveNode)

	mu   sync.Mutex
	h    nodeHeap
	wake chan struct{}
}

func newScheduler(now func() time.Time, fire func(context.Context, *liveNode)) *scheduler {
	return &scheduler{now: now, fire: fire, wake: make(chan struct{}, 1)}
}

// schedule sets (or moves) ln's renewal to at.
func (s *scheduler) schedule(ln *liveNode, at time.Time) {
	s.mu.Lock()
	ln.due = at
	if ln.heapIndex >= 0 {
		heap.Fix(&s.h, ln.heapIndex)
	} else {
		heap.Push(&s.h, ln)
	}
	first := s.h[0] == ln
	s.mu.Unlock()
	if first {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// unschedule removes ln, if scheduled.
func (s *scheduler) unschedule(ln *liveNode) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ln.heapIndex >= 0 {
		heap.Remove(&s.h, ln.heapIndex)
	}
}

// scheduled reports whether ln has a pending renewal, and when.
func (s *scheduler) scheduled(ln *liveNode) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return ln.due, ln.heapIndex >= 0
}

// len is the number of scheduled renewals.
func (s *scheduler) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.h)
}

// run fires due renewals on workers until ctx ends.
func (s *scheduler) run(ctx context.Context, workers int) {
	due := make(chan *liveNode)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ln := range due {
				s.fire(ctx, ln)
			}
		}()
	}
	defer func() { close(due); wg.Wait() }()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		s.mu.Lock()
		var next *liveNode
		wait := time.Hour
		if len(s.h) > 0 {
			if d := s.h[0].due.Sub(s.now()); d <= 0 {
				next = heap.Pop(&s.h).(*liveNode)
			} else {
				wait = d
			}
		}
		s.mu.Unlock()
		if next != nil {
			select {
			case due <- next:
			case <-ctx.Done():
				return
			}
			continue
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		case <-timer.C:
		}
	}
}

// nodeHeap orders nodes by renewal time (container/heap).
type nodeHeap []*liveNode

func (h nodeHeap) Len() int           { return len(h) }
func (h nodeHeap) Less(i, j int) bool { return h[i].due.Before(h[j].due) }
func (h nodeHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].heapIndex, h[j].heapIndex = i, j
}
func (h *nodeHeap) Push(x any) {
	ln := x.(*liveNode)
	ln.heapIndex = len(*h)
	*h = append(*h, ln)
}
func (h *nodeHeap) Pop() any {
	old := *h
	ln := old[len(old)-1]
	old[len(old)-1] = nil
	ln.heapIndex = -1
	*h = old[:len(old)-1]
	return ln
}
