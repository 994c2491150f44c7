package sds

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// Log events a client can trigger at will, each rate-limited per reason by
// logThrottle.
const (
	eventRefused   = "stream refused"
	eventAdmission = "stream admission failed"
	eventNotServed = "secret not served to this identity"
	eventNACK      = "envoy rejected a response"
	// eventTLS is a failed TLS handshake on the xDS listener (debug only).
	eventTLS = "tls handshake failed"
	// eventShared is repeated by whoever holds a node's token and node.id
	// and reconnects in a loop; a metric counts every one.
	eventShared = "node's key is now served to two connections: another process may hold its token and node.id (after a sidecar restart this can be the old connection, not closed yet)"
)

// eventLabels are the event label values of sds_log_lines_suppressed_total.
var eventLabels = map[string]string{
	eventRefused:   "stream_refused",
	eventAdmission: "admission_failed",
	eventNotServed: "secret_not_served",
	eventNACK:      "nack",
	eventShared:    "shared_identity",
	eventTLS:       "tls_handshake",
}

// eventLabel is the metric label of event, "other" for an unknown one.
func eventLabel(event string) string {
	if l, ok := eventLabels[event]; ok {
		return l
	}
	return "other"
}

// Defaults of the log throttle: a few lines per reason per second, then one
// summary line per reason and minute.
const (
	logLinesPerSecond = 5
	logBurst          = 10
	logSummaryPeriod  = time.Minute
	// maxThrottleKeys bounds the (event, reason) pairs tracked; reasons
	// are server-defined, so this is only a safety net.
	maxThrottleKeys = 256
	// maxLoggedValue bounds every client-provided string written to the log
	// (node.id, resource names, error_detail, type URLs).
	maxLoggedValue = 128
)

// logThrottle writes log lines that a client can provoke (refusals, NACKs,
// names not served) at a bounded rate per (event, reason): past the budget,
// lines are counted and one summary line per period says how many were
// dropped, so a flood of bad requests cannot fill the disk or drown other
// lines.
type logThrottle struct {
	log    *slog.Logger
	now    func() time.Time
	rate   float64
	burst  int
	period time.Duration
	// suppressed and truncated count dropped lines and clipped values
	// (metrics); either may be nil.
	suppressed func(event string)
	truncated  func()

	mu   sync.Mutex
	keys map[throttleKey]*throttled
}

type throttleKey struct{ event, reason string }

// throttled is the state of one (event, reason).
type throttled struct {
	bucket     tokenBucket
	level      slog.Level
	suppressed int
	since      time.Time // first line suppressed since the last summary
}

func newLogThrottle(log *slog.Logger, now func() time.Time) *logThrottle {
	return &logThrottle{log: log, now: now, rate: logLinesPerSecond, burst: logBurst, period: logSummaryPeriod,
		keys: map[throttleKey]*throttled{}}
}

// logAt writes msg with args at level unless (event, reason) is over its
// budget, in which case the line is only counted. reason must come from a
// fixed, server-defined set.
func (t *logThrottle) logAt(level slog.Level, event, reason string, args ...any) {
	now := t.now()
	k := throttleKey{event, reason}
	t.mu.Lock()
	e := t.keys[k]
	if e == nil {
		if len(t.keys) >= maxThrottleKeys {
			k.reason = "other"
			e = t.keys[k]
		}
		if e == nil {
			e = &throttled{}
			t.keys[k] = e
		}
	}
	e.level = level
	ok := e.bucket.take(now, t.rate, t.burst)
	if !ok {
		if e.suppressed == 0 {
			e.since = now
		}
		e.suppressed++
	}
	var n int
	var since time.Time
	if e.suppressed > 0 && now.Sub(e.since) >= t.period {
		n, since = e.suppressed, e.since
		e.suppressed = 0
	}
	t.mu.Unlock()
	if ok {
		t.log.Log(context.Background(), level, event, args...)
	} else if t.suppressed != nil {
		t.suppressed(event)
	}
	if n > 0 {
		t.summary(level, k, n, now.Sub(since))
	}
}

// warn is logAt at Warn level.
func (t *logThrottle) warn(event, reason string, args ...any) {
	t.logAt(slog.LevelWarn, event, reason, args...)
}

// flush writes the summary of every (event, reason) with suppressed lines;
// run periodically so that the tail of a flood is reported too.
func (t *logThrottle) flush() {
	type pending struct {
		k     throttleKey
		level slog.Level
		n     int
		since time.Time
	}
	now := t.now()
	var out []pending
	t.mu.Lock()
	for k, e := range t.keys {
		if e.suppressed > 0 {
			out = append(out, pending{k, e.level, e.suppressed, e.since})
			e.suppressed = 0
		}
		if e.bucket.full(now, t.rate, t.burst) {
			delete(t.keys, k) // nothing to remember
		}
	}
	t.mu.Unlock()
	for _, p := range out {
		t.summary(p.level, p.k, p.n, now.Sub(p.since))
	}
}

// summary writes "n more lines of event for reason in the last period".
func (t *logThrottle) summary(level slog.Level, k throttleKey, n int, over time.Duration) {
	t.log.Log(context.Background(), level, "suppressed repeated log lines",
		"event", k.event, "reason", k.reason, "suppressed", n, "over", over.Round(time.Second).String())
}

// run flushes summaries every period until ctx ends.
func (t *logThrottle) run(ctx context.Context) {
	tick := time.NewTicker(t.period)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			t.flush()
			return
		case <-tick.C:
			t.flush()
		}
	}
}

// clip bounds a client-provided string for the log: at most maxLoggedValue
// bytes (cut on a rune boundary), with a marker saying how much was cut.
func (t *logThrottle) clip(v string) string {
	if len(v) <= maxLoggedValue {
		return v
	}
	cut := maxLoggedValue
	for cut > 0 && !utf8.RuneStart(v[cut]) {
		cut--
	}
	if t.truncated != nil {
		t.truncated()
	}
	return v[:cut] + "…[truncated " + strconv.Itoa(len(v)-cut) + " bytes]"
}
