package sds

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/store"
)

// limitCount is the value of sds_limit_rejections_total{limit}.
func (e *testEnv) limitCount(t *testing.T, limit string) float64 {
	t.Helper()
	return metricValue(t, e.metrics.limits.rejections.WithLabelValues(limit))
}

// dial opens a new client connection to the server (the env's own is
// e.conn).
func (e *testEnv) dial(t *testing.T) *grpc.ClientConn {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(e.ca.Root())
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// watchClose reads c until the server closes it and reports when, on done.
func watchClose(c net.Conn, done chan<- time.Time) {
	go func() {
		_, _ = io.Copy(io.Discard, c)
		done <- time.Now()
		_ = c.Close()
	}()
}

// h2Preface is what an HTTP/2 client sends first: the preface and an empty
// SETTINGS frame. A connection that sent it has finished its handshake.
var h2Preface = append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)

// waitClosed waits for n closures on done, each at least min after start,
// all within limit.
func waitClosed(t *testing.T, what string, done <-chan time.Time, n int, start time.Time, min, limit time.Duration) {
	t.Helper()
	timer := time.NewTimer(limit)
	defer timer.Stop()
	for i := 0; i < n; i++ {
		select {
		case at := <-done:
			if d := at.Sub(start); d < min {
				t.Fatalf("%s closed after %s, before its timeout %s", what, d.Round(time.Millisecond), min)
			}
		case <-timer.C:
			t.Fatalf("only %d of %d %s closed within %s", i, n, what, limit)
		}
	}
}

// TestConnectionLimits: connections that never start TLS are closed after
// the handshake timeout, connections that finish TLS and HTTP/2 but open no
// stream after the idle timeout (even if they ignore GOAWAY), connections
// over the limit at once, each counted; an authenticated stream keeps
// working throughout and its connection is never cut.
func TestConnectionLimits(t *testing.T) {
	const n = 10
	lim := Limits{HandshakeTimeout: 500 * time.Millisecond, IdleTimeout: 1500 * time.Millisecond, MaxConnections: 2*n + 1}
	env := newTestEnvWith(t, envOptions{limits: lim})
	tok, _ := env.token(t, "web", 0, 0)
	_, sidecar := env.fetch(t, sdsSotw, tok, "web-1", SecretDefault) // one connection, stream kept open
	open := env.metrics.limits.openConns

	start := time.Now()
	rawClosed := make(chan time.Time, n)
	idleClosed := make(chan time.Time, n)
	pool := x509.NewCertPool()
	pool.AddCert(env.ca.Root())
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", env.addr, 2*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		watchClose(c, rawClosed)
	}
	var tlsStart time.Time
	for i := 0; i < n; i++ {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", env.addr,
			&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12})
		if err != nil {
			t.Fatalf("TLS dial %d: %v", i, err)
		}
		if _, err := c.Write(h2Preface); err != nil {
			t.Fatalf("write HTTP/2 preface: %v", err)
		}
		if i == n-1 {
			tlsStart = time.Now()
		}
		watchClose(c, idleClosed) // reads the server's frames, never answers
	}
	if !eventually(5*time.Second, func() bool { return metricValue(t, open) == 2*n+1 }) {
		t.Fatalf("sds_open_connections = %v, want %d", metricValue(t, open), 2*n+1)
	}

	// Full: three more are closed at once, before any timeout.
	for i := 0; i < 3; i++ {
		c, err := net.DialTimeout("tcp", env.addr, 2*time.Second)
		if err != nil {
			t.Fatalf("dial over the limit: %v", err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		var ne net.Error
		if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
			t.Fatalf("connection over the limit: read %v, want it closed by the server", err)
		}
	}
	if got := env.limitCount(t, limitConnections); got != 3 {
		t.Fatalf("max_connections rejections = %v, want 3", got)
	}
	// The sidecar's connection still serves a new stream.
	if reply, s := env.fetch(t, sdsSotw, tok, "web-1", SecretRootCA); len(reply.names) != 1 {
		t.Fatalf("stream on the sidecar's connection while full: got %v", reply.names)
	} else {
		s.close()
	}

	waitClosed(t, "connections without TLS", rawClosed, n, start, lim.HandshakeTimeout, 10*time.Second)
	if !eventually(5*time.Second, func() bool { return env.limitCount(t, limitHandshake) == n }) {
		t.Fatalf("handshake_timeout rejections = %v, want %d", env.limitCount(t, limitHandshake), n)
	}
	// gRPC closes an idle connection with GOAWAY, then after 5 s without
	// the client's ping acknowledgement, for good.
	waitClosed(t, "TLS connections without a stream", idleClosed, n, tlsStart, lim.IdleTimeout, 20*time.Second)
	if !eventually(5*time.Second, func() bool { return env.limitCount(t, limitIdle) == n }) {
		t.Fatalf("idle_connection rejections = %v, want %d", env.limitCount(t, limitIdle), n)
	}
	if !eventually(5*time.Second, func() bool { return metricValue(t, open) == 1 }) {
		t.Fatalf("sds_open_connections = %v after the closures, want 1 (the sidecar's)", metricValue(t, open))
	}
	// The sidecar's stream outlived every timeout.
	if _, err := sidecar.recv(100 * time.Millisecond); !errors.Is(err, errNoReply) {
		t.Fatalf("the sidecar's stream ended: %v", err)
	}
	// Room again: a new connection is served.
	conn := env.dial(t)
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", bearer(tok)), streamLife)
	defer cancel()
	s, err := sdsSotw.open(ctx, conn)
	if err != nil {
		t.Fatalf("open a stream on a new connection: %v", err)
	}
	send(t, s, xdsReq{node: "web-2", names: []string{SecretDefault}})
	mustRecv(t, s)
}

// refusedWith waits for the stream to end and checks its status code.
func refusedWith(t *testing.T, s xdsStream, want codes.Code) string {
	t.Helper()
	for {
		_, err := s.recv(recvTimeout)
		if errors.Is(err, errNoReply) {
			t.Fatalf("stream not ended within %s, want %s", recvTimeout, want)
		}
		if err != nil {
			if status.Code(err) != want {
				t.Fatalf("stream ended with %v, want %s", err, want)
			}
			return status.Convert(err).Message()
		}
	}
}

// TestStreamsPerNode: a node's streams past the limit are refused with
// ResourceExhausted; other nodes are not affected and a closed stream frees
// its place.
func TestStreamsPerNode(t *testing.T) {
	env := newTestEnvWith(t, envOptions{limits: Limits{MaxStreamsPerNode: 2}})
	tok, _ := env.token(t, "web", 0, 0)
	_, s1 := env.fetch(t, sdsSotw, tok, "web-1", SecretDefault)
	_, _ = env.fetch(t, sdsDelta, tok, "web-1", SecretRootCA)
	s3 := env.open(t, adsSotw, bearer(tok))
	send(t, s3, xdsReq{node: "web-1", names: []string{SecretDefault}})
	if msg := refusedWith(t, s3, codes.ResourceExhausted); !strings.Contains(msg, "limits.max_streams_per_node") {
		t.Fatalf("refusal %q does not name the limit", msg)
	}
	if got := env.limitCount(t, limitStreams); got != 1 {
		t.Fatalf("streams_per_node rejections = %v, want 1", got)
	}
	env.fetch(t, sdsSotw, tok, "web-2", SecretDefault) // another node
	s1.close()
	if !eventually(5*time.Second, func() bool {
		id := env.nodeFor(t, mustGetToken(t, env, tok).ID, "web-1").ID
		env.srv.mu.Lock()
		defer env.srv.mu.Unlock()
		return env.srv.live[id].streams == 1
	}) {
		t.Fatal("the closed stream is still counted")
	}
	env.fetch(t, sdsSotw, tok, "web-1", SecretDefault)
}

// TestRequestLimits: too many names, too long a name, too many delta
// subscriptions and too big a message are refused before any work, each
// with the status and metric the limit says.
func TestRequestLimits(t *testing.T) {
	lim := Limits{MaxResourceNames: 4, MaxNameLength: 64, MaxRequestBytes: 64 << 10}
	env := newTestEnvWith(t, envOptions{limits: lim})
	tok, _ := env.token(t, "web", 0, 0)
	names := func(n, size int) []string { // n distinct names of size bytes
		out := make([]string, n)
		for i := range out {
			out[i] = fmt.Sprintf("%0*d", size, i)
		}
		return out
	}
	tests := []struct {
		name  string
		v     variant
		reqs  []xdsReq
		code  codes.Code
		limit string
	}{
		{"names per request", sdsSotw, []xdsReq{{node: "w1", names: names(5, 20)}}, codes.InvalidArgument, limitNames},
		{"names per request, delta", sdsDelta, []xdsReq{{node: "w1", names: names(5, 20)}}, codes.InvalidArgument, limitNames},
		{"name length", adsSotw, []xdsReq{{node: "w1", names: []string{strings.Repeat("x", 65)}}}, codes.InvalidArgument, limitNameLength},
		{"delta subscriptions accumulate", sdsDelta, []xdsReq{
			{node: "w1", names: []string{SecretDefault, "a", "b"}},
			{names: []string{"c"}, unsubscribe: []string{"a"}}, // 3 after it
			{names: []string{"d", "e"}},                        // 5
		}, codes.InvalidArgument, limitNames},
		{"message size", sdsSotw, []xdsReq{{node: "w1", names: names(4, 20000)}}, codes.ResourceExhausted, limitRequestSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := env.limitCount(t, tt.limit)
			s := env.open(t, tt.v, bearer(tok))
			for _, r := range tt.reqs {
				send(t, s, r)
			}
			msg := refusedWith(t, s, tt.code)
			if tt.limit != limitRequestSize && !strings.Contains(msg, "limits.") {
				t.Fatalf("refusal %q does not name the limit", msg)
			}
			if got := env.limitCount(t, tt.limit); got != before+1 {
				t.Fatalf("%s rejections = %v, want %v", tt.limit, got, before+1)
			}
		})
	}
	// At the limits, all is served.
	reply, _ := env.fetch(t, sdsDelta, tok, "w2", SecretDefault, SecretRootCA, spiffeID("web"), strings.Repeat("y", 64))
	if reply.secrets[SecretDefault] == nil {
		t.Fatalf("request at the limits got %v, want %s among them", reply.names, SecretDefault)
	}
}

// TestBigRequestMemory: a request of a million names (about 20 MB) is
// refused from its length prefix; the figure logged is what the whole
// process (client encoding included) allocated meanwhile.
func TestBigRequestMemory(t *testing.T) {
	env := newTestEnv(t) // default limits: 1 MiB
	tok, _ := env.token(t, "web", 0, 0)
	big := make([]string, 1_000_000)
	for i := range big {
		big[i] = "spiffe://x/" + itoa(i)
	}
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	s := env.open(t, sdsSotw, bearer(tok))
	send(t, s, xdsReq{node: "w1", names: big})
	refusedWith(t, s, codes.ResourceExhausted)
	runtime.ReadMemStats(&m1)
	t.Logf("1,000,000-name request refused; process allocated %d MB meanwhile (client encoding included), heap %+d MB",
		(m1.TotalAlloc-m0.TotalAlloc)>>20, (int64(m1.HeapAlloc)-int64(m0.HeapAlloc))>>20)
	if got := env.limitCount(t, limitRequestSize); got != 1 {
		t.Fatalf("request_size rejections = %v, want 1", got)
	}
}

// TestMetadataLimit: a stream whose headers exceed the limit is reset by
// the HTTP/2 layer, while a bearer token with ordinary headers fits.
func TestMetadataLimit(t *testing.T) {
	env := newTestEnvWith(t, envOptions{limits: Limits{MaxMetadataBytes: 8 << 10}})
	tok, _ := env.token(t, "web", 0, 0)
	ctx, cancel := context.WithTimeout(context.Background(), streamLife)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", bearer(tok), "x-pad", strings.Repeat("p", 10<<10))
	s, err := sdsSotw.open(ctx, env.conn)
	if err == nil {
		_ = s.send(xdsReq{node: "w1", names: []string{SecretDefault}})
		_, err = s.recv(recvTimeout)
	}
	if err == nil || errors.Is(err, errNoReply) {
		t.Fatalf("stream with 10 KiB of metadata: %v, want it reset", err)
	}
	// A token plus 4 KiB of other headers fits.
	ctx2, cancel2 := context.WithTimeout(context.Background(), streamLife)
	defer cancel2()
	ctx2 = metadata.AppendToOutgoingContext(ctx2, "authorization", bearer(tok), "x-pad", strings.Repeat("p", 4<<10))
	s2, err := sdsSotw.open(ctx2, env.conn)
	if err != nil {
		t.Fatal(err)
	}
	send(t, s2, xdsReq{node: "w1", names: []string{SecretDefault}})
	mustRecv(t, s2)
}

// countingStore counts the reads of the token bucket.
type countingStore struct {
	store.Store
	tokenReads atomic.Int64
}

func (c *countingStore) Get(ctx context.Context, bucket, key string) ([]byte, error) {
	if bucket == bootstrap.Bucket {
		c.tokenReads.Add(1)
	}
	return c.Store.Get(ctx, bucket, key)
}

// TestAuthFailureRate: past its budget of failures, a source's streams are
// refused with ResourceExhausted before any token lookup, valid token or
// not; the budget refills with time.
func TestAuthFailureRate(t *testing.T) {
	kv := &countingStore{Store: store.NewMemory()}
	env := newTestEnvWith(t, envOptions{store: kv, limits: Limits{AuthFailureRate: 0.001, AuthFailureBurst: 3}})
	tok, _ := env.token(t, "web", 0, 0)
	wrong := "SDSTKN-1.not-a-token"
	for i := 0; i < 3; i++ {
		s := env.open(t, sdsSotw, bearer(wrong))
		send(t, s, xdsReq{node: "w1", names: []string{SecretDefault}})
		if code := status.Code(func() error { _, err := s.recv(recvTimeout); return err }()); code == codes.ResourceExhausted || code == codes.OK {
			t.Fatalf("failure %d refused with %s, want an authentication error", i+1, code)
		}
	}
	reads := kv.tokenReads.Load()
	s := env.open(t, sdsSotw, bearer(tok))
	send(t, s, xdsReq{node: "w1", names: []string{SecretDefault}})
	if msg := refusedWith(t, s, codes.ResourceExhausted); !strings.Contains(msg, "limits.auth_failure_rate") {
		t.Fatalf("refusal %q does not name the limit", msg)
	}
	if got := kv.tokenReads.Load(); got != reads {
		t.Fatalf("%d token reads for a rate-limited stream, want none", got-reads)
	}
	if got := env.limitCount(t, limitAuthRate); got != 1 {
		t.Fatalf("auth_failure_rate rejections = %v, want 1", got)
	}
	env.clock.Advance(time.Hour)
	env.fetch(t, sdsSotw, tok, "w1", SecretDefault)
}

// TestLogFlood: a flood of refused streams, of names not served and of
// NACKs writes a bounded log, counted in sds_log_lines_suppressed_total,
// with client strings clipped.
func TestLogFlood(t *testing.T) {
	// At info, what servers run at: debug adds a line per request of an
	// authenticated stream, by design.
	env := newTestEnvWith(t, envOptions{logInfo: true, limits: Limits{AuthFailureBurst: 1 << 20, AuthFailureRate: 1e6}})
	tok, _ := env.token(t, "web", 0, 0)
	start := time.Now()
	const floods = 1000
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < floods/4; i++ {
				ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer SDSTKN-1.nope"), recvTimeout)
				s, err := sdsSotw.open(ctx, env.conn)
				if err == nil {
					_ = s.send(xdsReq{node: "w1", names: []string{SecretDefault}})
					_, _ = s.recv(recvTimeout)
				}
				cancel()
			}
		}()
	}
	wg.Wait()
	_, s := env.fetch(t, sdsSotw, tok, "w1", SecretDefault)
	go func() { // keep reading, so the server never blocks on its sends
		for {
			if _, err := s.recv(time.Second); err != nil && !errors.Is(err, errNoReply) {
				return
			}
		}
	}()
	long := strings.Repeat("z", 500)
	for i := 0; i < floods; i++ {
		send(t, s, xdsReq{names: []string{SecretDefault, long[:400] + itoa(i)}, nack: long + itoa(i)})
	}
	if !eventually(10*time.Second, func() bool {
		return metricValue(t, env.metrics.unknownResources.WithLabelValues(xdsres.SecretType)) >= floods
	}) {
		t.Fatal("the not-served requests were not all processed")
	}
	logs := env.logs.String()
	refused := countLines(logs, `msg="stream refused"`)
	notServed := countLines(logs, eventNotServed)
	nacks := countLines(logs, eventNACK)
	t.Logf("%d refusals, %d names not served, %d NACKs: %d log bytes (%d, %d, %d lines)", floods, floods, floods, len(logs), refused, notServed, nacks)
	if len(logs) > 64<<10 {
		t.Fatalf("the flood wrote %d log bytes, want under 64 KiB", len(logs))
	}
	budget := logBurst + logLinesPerSecond*int(time.Since(start).Seconds()+1)
	for _, n := range []int{refused, notServed, nacks} {
		if n > budget {
			t.Fatalf("lines per event %d, %d, %d: want each at most %d", refused, notServed, nacks, budget)
		}
	}
	if strings.Contains(logs, long[:200]) {
		t.Fatal("a 400-byte client string was logged whole")
	}
	env.srv.lim.logs.flush()
	if !strings.Contains(env.logs.String(), "suppressed repeated log lines") {
		t.Fatal("no summary line after the flood")
	}
	if metricValue(t, env.metrics.limits.logSuppressed.WithLabelValues(eventLabel(eventRefused))) < float64(floods-budget) {
		t.Fatal("suppressed refusal lines not counted")
	}
	if metricValue(t, env.metrics.limits.logTruncated) == 0 {
		t.Fatal("truncations not counted")
	}
}
