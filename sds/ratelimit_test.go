package sds

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

// fakeClock is a clock that moves only when told.
type fakeClock struct{ t time.Time }

func (c *fakeClock) Now() time.Time          { return c.t }
func (c *fakeClock) Advance(d time.Duration) { c.t = c.t.Add(d) }

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)} }

func TestTokenBucket(t *testing.T) {
	clk := newFakeClock()
	var b tokenBucket
	for i := 0; i < 3; i++ {
		if !b.take(clk.Now(), 2, 3) {
			t.Fatalf("take %d of a burst of 3 refused", i+1)
		}
	}
	if b.take(clk.Now(), 2, 3) {
		t.Fatal("a 4th take within the burst of 3 was allowed")
	}
	clk.Advance(499 * time.Millisecond)
	if b.has(clk.Now(), 2, 3) {
		t.Fatal("a token after 0.499 s at 2/s")
	}
	clk.Advance(time.Millisecond)
	if !b.take(clk.Now(), 2, 3) {
		t.Fatal("no token after 0.5 s at 2/s")
	}
	clk.Advance(time.Hour)
	if !b.full(clk.Now(), 2, 3) || b.tokens != 3 {
		t.Fatalf("after an hour the bucket holds %v tokens, want the burst 3", b.tokens)
	}
	clk.Advance(-time.Minute) // a clock stepping back earns nothing and loses nothing
	if !b.full(clk.Now(), 2, 3) {
		t.Fatal("a clock stepping back emptied the bucket")
	}
}

func TestSourceKey(t *testing.T) {
	tests := []struct{ peer, want string }{
		{"192.0.2.7:4431", "192.0.2.7/32"},
		{"[::ffff:192.0.2.7]:1", "192.0.2.7/32"},
		{"[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:ffff::9]:443", "2001:db8:1:2::/64"},
		{"[fe80::1%eth0]:443", "fe80::/64"},
		{"@", "invalid Prefix"},
		{"", "invalid Prefix"},
	}
	for _, tt := range tests {
		if got := sourceKey(tt.peer).String(); got != tt.want {
			t.Errorf("sourceKey(%q) = %s, want %s", tt.peer, got, tt.want)
		}
	}
}

// TestSourceLimiter: only failures spend tokens, each source has its own
// budget, and the map of sources stays bounded under a flood from many
// addresses.
func TestSourceLimiter(t *testing.T) {
	clk := newFakeClock()
	l := newSourceLimiter(1, 3, 100, clk.Now)
	a, b := "192.0.2.1:1000", "192.0.2.2:1000"
	for i := 0; i < 3; i++ {
		if !l.allow(a) {
			t.Fatalf("source refused after %d failures, burst is 3", i)
		}
		l.fail(a)
	}
	if l.allow(a) {
		t.Fatal("source allowed after 3 failures with a burst of 3")
	}
	if l.allow("192.0.2.1:2000") {
		t.Fatal("another port of the same address escaped the limit")
	}
	if !l.allow(b) {
		t.Fatal("another address refused because of the first one")
	}
	clk.Advance(time.Second)
	if !l.allow(a) {
		t.Fatal("source still refused after a second at 1/s")
	}

	// A flood of failures from 10,000 addresses keeps at most 100.
	for i := 0; i < 10000; i++ {
		l.fail(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String() + ":1")
		if n := l.len(); n > 100 {
			t.Fatalf("limiter tracks %d sources after %d, want at most 100", n, i+1)
		}
	}
	// Sources whose bucket refilled are the first to go.
	clk.Advance(time.Hour)
	l.fail(a)
	l.fail(a)
	l.fail(a)
	if l.allow(a) {
		t.Fatal("source allowed after 3 new failures")
	}
	for i := 0; i < 50; i++ { // half the room: refilled sources remain to evict
		l.fail(fmt.Sprintf("198.51.100.%d:1", i))
	}
	if l.allow(a) {
		t.Fatal("a source out of tokens was evicted while refilled ones remained")
	}
}
