package sds

import (
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func newTestThrottle(clk *fakeClock) (*logThrottle, *logBuffer, map[string]int) {
	logs := &logBuffer{}
	th := newLogThrottle(slog.New(slog.NewTextHandler(logs, nil)), clk.Now)
	counts := map[string]int{}
	th.suppressed = func(event string) { counts[event]++ }
	th.truncated = func() { counts["truncated"]++ }
	return th, logs, counts
}

// TestLogThrottle: a burst of lines per (event, reason) is written, the rest
// counted, and one summary line per period says how many were dropped; each
// reason has its own budget.
func TestLogThrottle(t *testing.T) {
	clk := newFakeClock()
	th, logs, counts := newTestThrottle(clk)
	for i := 0; i < 1000; i++ {
		th.warn(eventRefused, "unknown", "i", i)
	}
	if n := countLines(logs.String(), "stream refused"); n != logBurst {
		t.Fatalf("%d lines written for 1000 refusals at once, want the burst %d", n, logBurst)
	}
	if counts[eventRefused] != 1000-logBurst {
		t.Fatalf("suppressed count %d, want %d", counts[eventRefused], 1000-logBurst)
	}
	th.warn(eventRefused, "expired")
	if n := countLines(logs.String(), "msg=\"stream refused\""); n != logBurst+1 {
		t.Fatalf("another reason's line was suppressed: %d lines, want %d", n, logBurst+1)
	}
	if strings.Contains(logs.String(), "suppressed repeated") {
		t.Fatal("summary written before the period ended")
	}

	// One second later a few more lines get through.
	clk.Advance(time.Second)
	for i := 0; i < 100; i++ {
		th.warn(eventRefused, "unknown")
	}
	if n := countLines(logs.String(), "msg=\"stream refused\""); n != logBurst+1+logLinesPerSecond {
		t.Fatalf("%d lines after one more second, want %d", n, logBurst+1+logLinesPerSecond)
	}

	// At the end of the period, the next line brings the summary.
	clk.Advance(logSummaryPeriod)
	th.warn(eventRefused, "unknown")
	want := 1000 - logBurst + 100 - logLinesPerSecond
	sum := countLines(logs.String(), "suppressed repeated log lines", `event="stream refused"`, "reason=unknown")
	if sum != 1 || !strings.Contains(logs.String(), "suppressed="+itoa(want)) {
		t.Fatalf("want one summary of %d suppressed lines, got %d summaries in:\n%s", want, sum, tail(logs.String(), 5))
	}

	// flush reports what is pending at once, and forgets idle keys.
	for i := 0; i < 2*logBurst; i++ {
		th.warn(eventNACK, "other")
	}
	th.flush()
	if countLines(logs.String(), "suppressed repeated log lines", "reason=other") != 1 {
		t.Fatalf("flush wrote no summary for the NACK flood:\n%s", tail(logs.String(), 5))
	}
	clk.Advance(time.Hour)
	th.flush()
	th.mu.Lock()
	keys := len(th.keys)
	th.mu.Unlock()
	if keys != 0 {
		t.Fatalf("%d keys kept after an idle hour, want 0", keys)
	}
}

// TestLogThrottleKeysBounded: the (event, reason) pairs tracked are bounded
// even if a caller passes many reasons.
func TestLogThrottleKeysBounded(t *testing.T) {
	clk := newFakeClock()
	th, _, _ := newTestThrottle(clk)
	for i := 0; i < 5000; i++ {
		th.warn(eventRefused, "r"+itoa(i))
	}
	th.mu.Lock()
	defer th.mu.Unlock()
	if len(th.keys) > maxThrottleKeys+1 {
		t.Fatalf("%d keys tracked, want at most %d", len(th.keys), maxThrottleKeys+1)
	}
}

func TestClip(t *testing.T) {
	clk := newFakeClock()
	th, _, counts := newTestThrottle(clk)
	long := strings.Repeat("é", 3<<20) // 6 MB of two-byte runes
	tests := []struct {
		in      string
		maxLen  int
		clipped bool
	}{
		{"", 0, false},
		{"spiffe://mesh.local/ns/default/sa/web", 40, false},
		{strings.Repeat("a", maxLoggedValue), maxLoggedValue, false},
		{strings.Repeat("a", maxLoggedValue+1), maxLoggedValue + 40, true},
		{long, maxLoggedValue + 40, true},
	}
	for _, tt := range tests {
		got := th.clip(tt.in)
		if len(got) > tt.maxLen || !utf8.ValidString(got) || strings.Contains(got, "truncated") != tt.clipped {
			t.Errorf("clip(%d bytes) = %d bytes %q: want at most %d valid bytes, clipped %v", len(tt.in), len(got), got[:min(len(got), 60)], tt.maxLen, tt.clipped)
		}
	}
	if counts["truncated"] != 2 {
		t.Fatalf("counted %d truncations, want 2", counts["truncated"])
	}
	if got := th.clip(long); !strings.HasSuffix(got, "[truncated "+itoa(len(long)-maxLoggedValue)+" bytes]") {
		t.Fatalf("marker of a cut on a rune boundary: %q", got[maxLoggedValue-4:])
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
