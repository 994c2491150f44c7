package stepca

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/sds-server/internal/stepcainit"
)

// lockedBuffer is a log sink safe for the handler's concurrent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestOpenLogsEachRetry checks that Open waiting for an unreachable step-ca
// says so at every attempt it retries: attempt N of M, the wait before the
// next one, and the error; and that an Open that succeeds at once logs
// nothing.
func TestOpenLogsEachRetry(t *testing.T) {
	tc := startCA(t, stepcainit.Options{})

	var logs lockedBuffer
	opts := tc.options()
	opts.URL = "https://" + freeAddr(t)
	opts.ConnectAttempts = 3
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	if _, err := Open(context.Background(), opts); err == nil || !strings.Contains(err.Error(), "gave up after 3 attempts") {
		t.Fatalf("Open error %v, want it to give up after 3 attempts", err)
	}
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("Open logged %d lines for 3 attempts, want 2 (one per retry):\n%s", len(lines), logs.String())
	}
	for i, want := range [][]string{
		{"level=WARN", "step-ca not reachable yet", "attempt=1", "attempts=3", "retry_in=10ms", "connection refused", opts.URL},
		{"attempt=2", "attempts=3", "retry_in=20ms", "connection refused"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("log line %d %q does not say %q", i+1, lines[i], w)
			}
		}
	}

	var quiet lockedBuffer
	opts = tc.options()
	opts.Logger = slog.New(slog.NewTextHandler(&quiet, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := Open(ctx, opts); err != nil {
		t.Fatal(err)
	}
	if quiet.String() != "" {
		t.Errorf("an Open that succeeded at once logged:\n%s", quiet.String())
	}
}
