package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Percentiles are the order statistics sds-load reports for a set of
// durations (nearest-rank method: p-th percentile is the smallest sample
// that at least p% of the samples do not exceed).
type Percentiles struct {
	N   int           `json:"n"`
	P50 time.Duration `json:"p50"`
	P90 time.Duration `json:"p90"`
	P99 time.Duration `json:"p99"`
	Max time.Duration `json:"max"`
}

// percentiles computes the nearest-rank percentiles of ds; it sorts a copy,
// so ds is left as it is. No samples gives the zero Percentiles.
func percentiles(ds []time.Duration) Percentiles {
	if len(ds) == 0 {
		return Percentiles{}
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := func(p int) time.Duration {
		// ceil(p/100 * n), 1-based
		r := (p*len(s) + 99) / 100
		if r < 1 {
			r = 1
		}
		return s[r-1]
	}
	return Percentiles{N: len(s), P50: rank(50), P90: rank(90), P99: rank(99), Max: s[len(s)-1]}
}

// String renders the percentiles in milliseconds.
func (p Percentiles) String() string {
	if p.N == 0 {
		return "no samples"
	}
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }
	return fmt.Sprintf("p50 %s ms, p90 %s ms, p99 %s ms, max %s ms (n=%d)", ms(p.P50), ms(p.P90), ms(p.P99), ms(p.Max), p.N)
}

// errorCounter counts failed sidecars by gRPC status code, keeping the first
// message of each code as an example. Safe for concurrent use.
type errorCounter struct {
	mu      sync.Mutex
	counts  map[string]int
	example map[string]string
}

func newErrorCounter() *errorCounter {
	return &errorCounter{counts: map[string]int{}, example: map[string]string{}}
}

// errTimeout marks a sidecar that was not served within its timeout; it is
// counted as DeadlineExceeded, as gRPC itself would report it.
var errTimeout = errors.New("no secret before the timeout")

// codeOf is the gRPC code a sidecar's error counts under: the status code of
// a gRPC error, DeadlineExceeded for a timeout, Unknown for anything else
// (a protocol violation such as a response without the secret).
func codeOf(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case errors.Is(err, errTimeout), errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		return se.GRPCStatus().Code()
	}
	return codes.Unknown
}

// add counts err (nil is not counted).
func (c *errorCounter) add(err error) {
	if err == nil {
		return
	}
	code := codeOf(err).String()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.counts[code]++
	if _, ok := c.example[code]; !ok {
		c.example[code] = err.Error()
	}
}

// snapshot returns a copy of the counts.
func (c *errorCounter) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int, len(c.counts))
	for k, v := range c.counts {
		out[k] = v
	}
	return out
}

// total is the number of errors counted.
func (c *errorCounter) total() int {
	n := 0
	for _, v := range c.snapshot() {
		n += v
	}
	return n
}

// String lists "Code: count (e.g. message)" in code order, or "none".
func (c *errorCounter) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.counts) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(c.counts))
	for k := range c.counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString("; ")
		}
		ex := c.example[k]
		if len(ex) > 160 {
			ex = ex[:160] + "…"
		}
		fmt.Fprintf(&b, "%s: %d (e.g. %s)", k, c.counts[k], ex)
	}
	return b.String()
}

// formatCodes renders error counts as "Code=n, …" in code order, or "0".
func formatCodes(m map[string]int) string {
	if len(m) == 0 {
		return "0"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, ", ")
}
