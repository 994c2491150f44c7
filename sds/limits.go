package sds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// Limits bound what any client, with or without a token, can make the server
// hold or do. Each is counted in sds_limit_rejections_total when it bites.
// A zero field takes its value from DefaultLimits.
type Limits struct {
	// HandshakeTimeout bounds the TLS handshake and the HTTP/2 preface of a
	// new connection.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection that has had no open stream for this
	// long (an Envoy keeps its streams open, so it is never cut).
	IdleTimeout time.Duration
	// MaxConnections caps the open connections of the xDS listener; one
	// more is closed as soon as it is accepted.
	MaxConnections int
	// MaxStreamsPerNode caps the open streams of one node.
	MaxStreamsPerNode int
	// MaxResourceNames caps the names of one request, and the names a delta
	// stream has subscribed to at once.
	MaxResourceNames int
	// MaxNameLength caps the length of one resource name, in bytes.
	MaxNameLength int
	// MaxRequestBytes caps one xDS message, refused before it is decoded.
	MaxRequestBytes int
	// MaxMetadataBytes caps a stream's headers (gRPC metadata).
	MaxMetadataBytes int
	// AuthFailureRate and AuthFailureBurst are the token bucket of
	// authentication failures per source address (IPv4 address, IPv6 /64):
	// past it, the source's streams are refused before any store lookup.
	AuthFailureRate  float64
	AuthFailureBurst int
	// AuthFailureSources bounds the source addresses remembered.
	AuthFailureSources int
	// NodeRetention is how long after its last certificate expired a node
	// record that is not revoked is kept in the store.
	NodeRetention time.Duration
}

// DefaultLimits are the limits of a server configured with none.
func DefaultLimits() Limits {
	return Limits{
		HandshakeTimeout:   10 * time.Second,
		IdleTimeout:        30 * time.Second,
		MaxConnections:     10000,
		MaxStreamsPerNode:  16,
		MaxResourceNames:   64,
		MaxNameLength:      512,
		MaxRequestBytes:    1 << 20,
		MaxMetadataBytes:   16 << 10,
		AuthFailureRate:    1,
		AuthFailureBurst:   20,
		AuthFailureSources: 10000,
		NodeRetention:      7 * 24 * time.Hour,
	}
}

// WithDefaults returns l with every zero (or negative) field set to its
// default.
func (l Limits) WithDefaults() Limits {
	d := DefaultLimits()
	dur := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	num := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	dur(&l.HandshakeTimeout, d.HandshakeTimeout)
	dur(&l.IdleTimeout, d.IdleTimeout)
	dur(&l.NodeRetention, d.NodeRetention)
	num(&l.MaxConnections, d.MaxConnections)
	num(&l.MaxStreamsPerNode, d.MaxStreamsPerNode)
	num(&l.MaxResourceNames, d.MaxResourceNames)
	num(&l.MaxNameLength, d.MaxNameLength)
	num(&l.MaxRequestBytes, d.MaxRequestBytes)
	num(&l.MaxMetadataBytes, d.MaxMetadataBytes)
	num(&l.AuthFailureBurst, d.AuthFailureBurst)
	num(&l.AuthFailureSources, d.AuthFailureSources)
	if l.AuthFailureRate <= 0 {
		l.AuthFailureRate = d.AuthFailureRate
	}
	return l
}

// limitState is the per-server state of the limits: the authentication
// failure limiter and the log throttle.
type limitState struct {
	m       *limitMetrics
	authLim *sourceLimiter
	logs    *logThrottle
}

func newLimitState(s *Server) *limitState {
	l := s.cfg.Limits
	m := s.cfg.Metrics.limits
	logs := newLogThrottle(s.log, s.now)
	logs.suppressed = func(event string) { m.logSuppressed.WithLabelValues(eventLabel(event)).Inc() }
	logs.truncated = m.logTruncated.Inc
	return &limitState{
		m:       m,
		authLim: newSourceLimiter(l.AuthFailureRate, l.AuthFailureBurst, l.AuthFailureSources, s.now),
		logs:    logs,
	}
}

// runLimits runs the periodic work of the limits until ctx ends: log
// summaries and the pruning of old node records.
func (s *Server) runLimits(ctx context.Context) {
	go s.lim.logs.run(ctx)
	s.pruneLoop(ctx, pruneEvery)
}

// grpcLimitOptions are the gRPC server options enforcing the limits.
func (s *Server) grpcLimitOptions() []grpc.ServerOption {
	l := s.cfg.Limits
	return []grpc.ServerOption{
		grpc.ConnectionTimeout(l.HandshakeTimeout),
		grpc.MaxRecvMsgSize(l.MaxRequestBytes),
		grpc.MaxHeaderListSize(uint32(min(l.MaxMetadataBytes, 1<<31))),
		grpc.StatsHandler(&idleCounter{timeout: l.IdleTimeout, m: s.lim.m}),
		grpc.ChainStreamInterceptor(s.recvLimitInterceptor),
	}
}

// ---- connections -----------------------------------------------------------

// limitListener wraps the xDS listener: it closes at once every connection
// over Limits.MaxConnections and counts handshakes that time out. It applies
// to the xDS listener only: the admin socket and the metrics listener are
// separate listeners and stay usable when it is full.
func (s *Server) limitListener(lis net.Listener) net.Listener {
	return &connLimitListener{Listener: lis, max: int64(s.cfg.Limits.MaxConnections), s: s}
}

type connLimitListener struct {
	net.Listener
	max  int64
	open atomic.Int64
	s    *Server
}

// Accept returns the next connection within the limit.
func (l *connLimitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) > l.max {
			l.open.Add(-1)
			_ = c.Close()
			l.s.lim.m.reject(limitConnections)
			l.s.lim.logs.warn(eventRefused, limitConnections, "peer", c.RemoteAddr().String(), "reason", limitConnections,
				"message", fmt.Sprintf("connection closed: %d connections open (limits.max_connections)", l.max))
			continue
		}
		l.s.lim.m.openConns.Inc()
		lc := &limitedConn{Conn: c, l: l}
		lc.handshaking.Store(true)
		return lc, nil
	}
}

// limitedConn is an accepted connection counted against the limit until it
// is closed. While handshaking (until gRPC clears the handshake deadline), a
// read or write that times out is counted as a handshake timeout.
type limitedConn struct {
	net.Conn
	l           *connLimitListener
	handshaking atomic.Bool
	closeOnce   sync.Once
}

func (c *limitedConn) SetDeadline(t time.Time) error {
	if t.IsZero() {
		c.handshaking.Store(false)
	}
	return c.Conn.SetDeadline(t)
}

func (c *limitedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.timedOut(err)
	return n, err
}

func (c *limitedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.timedOut(err)
	return n, err
}

func (c *limitedConn) timedOut(err error) {
	var ne net.Error
	if err != nil && errors.As(err, &ne) && ne.Timeout() && c.handshaking.CompareAndSwap(true, false) {
		c.l.s.lim.m.reject(limitHandshake)
	}
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(func() {
		c.l.open.Add(-1)
		c.l.s.lim.m.openConns.Dec()
	})
	return err
}

// idleCounter is a gRPC stats handler that counts the connections closed
// for having had no stream for the idle timeout (gRPC's MaxConnectionIdle
// closes them; this only counts).
type idleCounter struct {
	timeout time.Duration
	m       *limitMetrics
}

type connActivityKey struct{}

// connActivity is the stream count of one connection.
type connActivity struct {
	mu        sync.Mutex
	active    int
	idleSince time.Time
}

func (h *idleCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return context.WithValue(ctx, connActivityKey{}, &connActivity{idleSince: time.Now()})
}

func (h *idleCounter) HandleConn(ctx context.Context, s stats.ConnStats) {
	a, ok := ctx.Value(connActivityKey{}).(*connActivity)
	if _, end := s.(*stats.ConnEnd); !end || !ok {
		return
	}
	a.mu.Lock()
	idle := a.active == 0 && time.Since(a.idleSince) >= h.timeout
	a.mu.Unlock()
	if idle {
		h.m.reject(limitIdle)
	}
}

func (h *idleCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

func (h *idleCounter) HandleRPC(ctx context.Context, s stats.RPCStats) {
	a, ok := ctx.Value(connActivityKey{}).(*connActivity)
	if !ok {
		return
	}
	switch s.(type) {
	case *stats.Begin:
		a.mu.Lock()
		a.active++
		a.mu.Unlock()
	case *stats.End:
		a.mu.Lock()
		if a.active--; a.active == 0 {
			a.idleSince = time.Now()
		}
		a.mu.Unlock()
	}
}

// ---- streams and requests --------------------------------------------------

// recvLimitInterceptor ends a stream whose client sent a message over
// Limits.MaxRequestBytes with ResourceExhausted, and counts it. gRPC refuses
// such a message from its length prefix, before reading it into memory;
// go-control-plane would otherwise end the stream as if the client had
// closed it.
func (s *Server) recvLimitInterceptor(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	g := &recvGuard{ServerStream: ss, s: s}
	err := handler(srv, g)
	if e := g.err.Load(); e != nil {
		return *e
	}
	return err
}

type recvGuard struct {
	grpc.ServerStream
	s   *Server
	err atomic.Pointer[error]
}

func (g *recvGuard) RecvMsg(m any) error {
	err := g.ServerStream.RecvMsg(m)
	if status.Code(err) == codes.ResourceExhausted {
		g.err.Store(&err)
		g.s.lim.m.reject(limitRequestSize)
		peer := ""
		if p, ok := peerAddr(g.Context()); ok {
			peer = p
		}
		g.s.lim.logs.warn(eventRefused, limitRequestSize, "peer", peer, "reason", limitRequestSize,
			"message", g.s.lim.logs.clip(status.Convert(err).Message()))
	}
	return err
}

// streamNames is what a stream has subscribed to, for the delta protocol
// where subscriptions accumulate over requests.
type streamNames struct {
	delta map[string]struct{}
}

// checkRequest refuses, before anything else is done with it, a request
// with too many names or too long a name; on a delta stream it also bounds
// the names subscribed at once.
func (c callbacks) checkRequest(id int64, typeURL string, subscribe, unsubscribe []string, delta bool) error {
	s := c.s
	l := s.cfg.Limits
	st := s.stream(id)
	if st == nil {
		return status.Error(codes.Internal, "stream state lost")
	}
	if len(subscribe) > l.MaxResourceNames {
		return c.refuse(st, id, &refusal{code: codes.InvalidArgument, limit: limitNames,
			msg: fmt.Sprintf("request names %d resources; at most %d are allowed per request (limits.max_resource_names)", len(subscribe), l.MaxResourceNames)})
	}
	for _, n := range subscribe {
		if len(n) > l.MaxNameLength {
			return c.refuse(st, id, &refusal{code: codes.InvalidArgument, limit: limitNameLength,
				msg: fmt.Sprintf("resource name of %d bytes; at most %d are allowed (limits.max_name_length)", len(n), l.MaxNameLength)})
		}
	}
	if !delta {
		return nil
	}
	s.mu.Lock()
	if st.names.delta == nil {
		st.names.delta = map[string]struct{}{}
	}
	for _, n := range unsubscribe {
		delete(st.names.delta, typeURL+"\x00"+n)
	}
	for _, n := range subscribe {
		st.names.delta[typeURL+"\x00"+n] = struct{}{}
	}
	total := len(st.names.delta)
	s.mu.Unlock()
	if total > l.MaxResourceNames {
		return c.refuse(st, id, &refusal{code: codes.InvalidArgument, limit: limitNames,
			msg: fmt.Sprintf("stream subscribes to %d resources; at most %d are allowed at once (limits.max_resource_names)", total, l.MaxResourceNames)})
	}
	return nil
}

// streamLimitRefusal is the refusal of a stream over the node's stream
// limit, or nil. Callers hold s.mu.
func (s *Server) streamLimitRefusal(ln *liveNode) error {
	if ln.streams < s.cfg.Limits.MaxStreamsPerNode {
		return nil
	}
	return &refusal{code: codes.ResourceExhausted, limit: limitStreams,
		msg: fmt.Sprintf("node %s already has %d open streams (limits.max_streams_per_node)", ln.rec.ID, ln.streams)}
}

// authRateRefusal is the refusal of a stream from a source over its
// authentication failure budget, or nil.
func (s *Server) authRateRefusal(st *streamState) error {
	if s.lim.authLim.allow(st.peer) {
		return nil
	}
	return &refusal{code: codes.ResourceExhausted, limit: limitAuthRate,
		msg: "too many failed authentications from this address; retry later (limits.auth_failure_rate)"}
}

// peerAddr is the remote address of the stream whose context is ctx.
func peerAddr(ctx context.Context) (string, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return "", false
	}
	return p.Addr.String(), true
}
