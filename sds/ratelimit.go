package sds

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// tokenBucket is a token bucket refilled at a fixed rate up to a burst. It
// is not safe for concurrent use: its owner serialises access. (A dozen
// lines, so golang.org/x/time/rate is not added as a dependency for it.)
type tokenBucket struct {
	tokens float64
	last   time.Time
}

// refill adds the tokens earned since the last call, up to burst.
func (b *tokenBucket) refill(now time.Time, rate float64, burst int) {
	if b.last.IsZero() {
		b.tokens, b.last = float64(burst), now
		return
	}
	if d := now.Sub(b.last); d > 0 {
		b.tokens += d.Seconds() * rate
		b.last = now
	}
	if b.tokens > float64(burst) {
		b.tokens = float64(burst)
	}
}

// take spends one token if there is one.
func (b *tokenBucket) take(now time.Time, rate float64, burst int) bool {
	b.refill(now, rate, burst)
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// has reports whether a token is left, without spending it.
func (b *tokenBucket) has(now time.Time, rate float64, burst int) bool {
	b.refill(now, rate, burst)
	return b.tokens >= 1
}

// full reports whether the bucket has refilled completely: it then carries
// no information and can be forgotten.
func (b *tokenBucket) full(now time.Time, rate float64, burst int) bool {
	b.refill(now, rate, burst)
	return b.tokens >= float64(burst)
}

// sourceLimiter limits authentication failures per source address. Only
// failures spend tokens, so a source whose sidecars authenticate is never
// slowed; a source out of tokens is refused before any store lookup. The map
// of sources is bounded (maxSources), so the limiter cannot itself be used
// to grow the server's memory: when it is full, a source whose bucket has
// refilled is forgotten, else an arbitrary one.
type sourceLimiter struct {
	rate       float64
	burst      int
	maxSources int
	now        func() time.Time

	mu      sync.Mutex
	sources map[netip.Prefix]*tokenBucket
}

func newSourceLimiter(rate float64, burst, maxSources int, now func() time.Time) *sourceLimiter {
	return &sourceLimiter{rate: rate, burst: burst, maxSources: maxSources, now: now, sources: map[netip.Prefix]*tokenBucket{}}
}

// sourceKey is the address a limit applies to: the IPv4 address, or the /64
// of an IPv6 address (one host usually holds a whole /64). Peers that are
// not IP (a Unix socket in tests) share one key.
func sourceKey(peer string) netip.Prefix {
	host, _, err := net.SplitHostPort(peer)
	if err != nil {
		host = peer
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Prefix{}
	}
	a = a.Unmap().WithZone("")
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(64)
	return p
}

// allow reports whether peer may try to authenticate now.
func (l *sourceLimiter) allow(peer string) bool {
	k := sourceKey(peer)
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.sources[k]
	return b == nil || b.has(l.now(), l.rate, l.burst)
}

// fail records an authentication failure from peer.
func (l *sourceLimiter) fail(peer string) {
	k := sourceKey(peer)
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.sources[k]
	if b == nil {
		if len(l.sources) >= l.maxSources {
			l.evict(now)
		}
		b = &tokenBucket{}
		l.sources[k] = b
	}
	b.take(now, l.rate, l.burst)
}

// evict makes room for one source, looking at no more than evictScan of
// them so that a flood from many addresses costs constant time per failure.
// Callers hold mu.
func (l *sourceLimiter) evict(now time.Time) {
	var victim netip.Prefix
	n := 0
	for k, b := range l.sources { // map order is random
		if b.full(now, l.rate, l.burst) {
			delete(l.sources, k)
			return
		}
		if n == 0 {
			victim = k
		}
		if n++; n >= evictScan {
			break
		}
	}
	delete(l.sources, victim)
}

// evictScan bounds the sources examined to make room for a new one.
const evictScan = 32

// len is how many sources are tracked.
func (l *sourceLimiter) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sources)
}
