package sds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/bootstrap"
)

// refusal is a stream refused for a reason the client can act on.
type refusal struct {
	code   codes.Code
	reason string // metric label; empty when not an authentication failure
	limit  string // sds_limit_rejections_total label; empty when no limit refused it
	msg    string
}

func (r *refusal) Error() string { return r.msg }

// callbacks binds go-control-plane's stream lifecycle to authentication and
// node identity. They run on each stream's own goroutine.
type callbacks struct{ s *Server }

func bearerToken(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		// The scheme is case-insensitive (RFC 7235).
		if len(v) > 7 && strings.EqualFold(v[:7], "Bearer ") {
			return strings.TrimSpace(v[7:])
		}
		return "" // present but not a bearer token: treated as missing
	}
	return ""
}

func streamKind(typeURL string) string {
	switch typeURL {
	case xdsres.AnyType:
		return "ads"
	case xdsres.SecretType:
		return "sds"
	case xdsres.ExtensionConfigType:
		return "ecds"
	}
	return "other"
}

// open authenticates a new stream and records it.
func (c callbacks) open(ctx context.Context, id int64, typeURL, protocol string) error {
	s := c.s
	st := &streamState{ctx: ctx, kind: streamKind(typeURL), protocol: protocol, unknown: map[string]bool{}, end: endFunc(ctx)}
	if p, ok := peer.FromContext(ctx); ok {
		st.peer = p.Addr.String()
	}
	if err := s.authRateRefusal(st); err != nil {
		return c.refuse(st, id, err)
	}
	rec, stale, err := s.authenticate(ctx)
	if err != nil {
		return c.refuse(st, id, err)
	}
	st.token, st.staleRoot = rec, stale
	s.mu.Lock()
	s.streams[id] = st
	s.mu.Unlock()
	s.cfg.Metrics.streams.WithLabelValues(st.kind, protocol).Inc()
	s.debugStreamOpened(id, st)
	return nil
}

// refuse turns err into the gRPC status the client sees, logs one line
// without any secret, and counts it.
func (c callbacks) refuse(st *streamState, id int64, err error) error {
	var (
		code   = codes.Unavailable
		reason string
		msg    = err.Error()
	)
	var ae *bootstrap.AuthError
	var rf *refusal
	switch {
	case errors.As(err, &ae):
		code, reason = codes.Unauthenticated, ae.Reason
		if ae.Denied {
			code = codes.PermissionDenied
		}
	case errors.As(err, &rf):
		code, reason = rf.code, rf.reason
		if rf.limit != "" {
			reason = rf.limit
			c.s.lim.m.reject(rf.limit)
		}
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	default:
		msg = "internal error admitting the stream; see the server log"
		c.s.lim.logs.logAt(slog.LevelError, eventAdmission, "", "stream_id", id, "peer", st.peer, "error", err)
	}
	if reason != "" && (rf == nil || rf.limit == "") { // an authentication failure
		c.s.cfg.Metrics.authFailures.WithLabelValues(reason).Inc()
		c.s.lim.authLim.fail(st.peer)
	}
	c.s.lim.logs.warn(eventRefused, reason, "stream_id", id, "peer", st.peer, "xds_type", st.kind,
		"token_id", c.s.lim.logs.clip(st.token.ID), "code", code.String(), "reason", reason, "message", c.s.lim.logs.clip(msg))
	return status.Error(code, msg)
}

// request binds the request to the stream's authenticated node: whatever
// node.id the sidecar claims, the cache only ever sees the node the token
// admitted.
func (s *Server) stream(id int64) *streamState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.streams[id]
}

func (c callbacks) request(id int64, claimed *core.Node, typeURL string, names []string, nonce string, nack *string) (*core.Node, error) {
	s := c.s
	s.mu.Lock()
	st := s.streams[id]
	s.mu.Unlock()
	if st == nil {
		return nil, status.Error(codes.Internal, "stream state lost")
	}
	if st.node == nil {
		ln, err := s.admit(st, claimed)
		if err != nil {
			return nil, c.refuse(st, id, err)
		}
		s.mu.Lock()
		if err := s.streamLimitRefusal(ln); err != nil {
			s.mu.Unlock()
			return nil, c.refuse(st, id, err)
		}
		st.node = ln
		st.xdsNode = &core.Node{Id: ln.rec.ID, Cluster: ln.rec.Service}
		revoked, tokenRevoked := ln.revoked.Load(), ln.tokenRevoked.Load()
		ln.streams++
		if ln.streams == 1 {
			s.cfg.Metrics.connectedSidecars.Inc()
		}
		shared := ln.conns.add(ln.rec.ID, st.peer)
		s.mu.Unlock()
		s.debugStreamBound(id, st, claimed.GetId())
		s.reportShared(shared, id)
		if revoked { // revoked while this stream was being admitted
			return nil, c.refuse(st, id, &refusal{code: codes.PermissionDenied, reason: "node_revoked", msg: fmt.Sprintf("node %s has been revoked", ln.rec.ID)})
		}
		if tokenRevoked {
			return nil, c.refuse(st, id, tokenRevokedRefusal(ln.rec.TokenID))
		}
	}
	if nonce != "" {
		for i, p := range st.pending {
			if p.nonce == nonce {
				if nack == nil && p.cs != nil {
					s.markServing(st.node, p.cs)
				}
				if nack == nil && p.bundle != "" {
					s.noteBundleAck(st.node, p.bundle)
				}
				st.pending = st.pending[i+1:]
				break
			}
		}
	}
	s.touch(st.node)
	if nack != nil {
		s.cfg.Metrics.nacks.WithLabelValues(typeLabel(typeURL)).Inc()
		s.lim.logs.warn(eventNACK, typeLabel(typeURL), "stream_id", id, "node_id", st.node.rec.ID,
			"type_url", s.lim.logs.clip(typeURL), "error_detail", s.lim.logs.clip(*nack))
	}
	for _, name := range names {
		if st.unknown[name] || s.cache.has(st.node.rec.ID, typeURL, name) {
			continue
		}
		if typeURL == xdsres.SecretType {
			if len(st.unknown) < s.cfg.Limits.MaxResourceNames {
				st.unknown[name] = true
			}
			s.cfg.Metrics.unknownResources.WithLabelValues(typeLabel(typeURL)).Inc()
			s.lim.logs.warn(eventNotServed, "", "stream_id", id, "node_id", st.node.rec.ID,
				"spiffe_id", st.node.identity.SPIFFEID(), "name", s.lim.logs.clip(name))
		}
	}
	return st.xdsNode, nil
}

func (c callbacks) closed(id int64) {
	s := c.s
	s.mu.Lock()
	st := s.streams[id]
	delete(s.streams, id)
	if st != nil && st.node != nil {
		st.node.conns.remove(st.peer)
		s.seenClosed(st.node)
		st.node.streams--
		if st.node.streams == 0 {
			s.cfg.Metrics.connectedSidecars.Dec()
			st.node.idleSince = s.now()
		}
	}
	s.mu.Unlock()
	if st != nil {
		s.cfg.Metrics.streams.WithLabelValues(st.kind, st.protocol).Dec()
	}
	s.debugStreamClosed(id, st)
}

func nackDetail(d interface{ GetMessage() string }, present bool) *string {
	if !present {
		return nil
	}
	m := d.GetMessage()
	return &m
}

// OnStreamOpen implements the server callbacks (state of the world).
func (c callbacks) OnStreamOpen(ctx context.Context, id int64, typeURL string) error {
	return c.open(ctx, id, typeURL, "sotw")
}

// OnStreamClosed implements the server callbacks.
func (c callbacks) OnStreamClosed(id int64, _ *core.Node) { c.closed(id) }

// OnStreamRequest implements the server callbacks.
func (c callbacks) OnStreamRequest(id int64, req *discovery.DiscoveryRequest) error {
	c.s.debugRequest(id, req.GetTypeUrl(), len(req.GetResourceNames()), req.GetVersionInfo(), req.GetResponseNonce(), req.GetErrorDetail() != nil)
	if err := c.checkRequest(id, req.GetTypeUrl(), req.GetResourceNames(), nil, false); err != nil {
		return err
	}
	n, err := c.request(id, req.GetNode(), req.GetTypeUrl(), req.GetResourceNames(), req.GetResponseNonce(), nackDetail(req.GetErrorDetail(), req.GetErrorDetail() != nil))
	if err != nil {
		return err
	}
	req.Node = n
	return nil
}

// OnStreamResponse implements the server callbacks: it remembers which
// certificate a response carries, to learn from the ACK what Envoy loaded.
func (c callbacks) OnStreamResponse(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
	c.s.debugResponse(id, resp.GetTypeUrl(), resp.GetVersionInfo(), resp.GetNonce(), len(resp.GetResources()))
	c.sent(id, resp.GetNonce(), resp.GetResources())
}

// sent records the certificate and the trust bundle carried by a response
// with nonce, if any, to learn from its ACK what Envoy loaded.
func (c callbacks) sent(id int64, nonce string, anys []*anypb.Any) {
	st := c.s.stream(id)
	if st == nil || st.node == nil {
		return
	}
	cur := st.node.cur.Load()
	p := sentCert{nonce: nonce}
	for _, a := range anys {
		if cur != nil && p.cs == nil {
			p.cs = cur.issuedBy(a)
		}
		if v, ok := c.s.bundles.versionOf(a); ok && p.bundle == "" {
			p.bundle = v
		}
	}
	if p.cs == nil && p.bundle == "" {
		return
	}
	if len(st.pending) >= maxPending {
		st.pending = st.pending[1:]
	}
	st.pending = append(st.pending, p)
}

// maxPending bounds the unacknowledged responses remembered per stream.
const maxPending = 8

// sentCert is a response carrying a certificate or a trust bundle (or
// both), awaiting Envoy's ACK.
type sentCert struct {
	nonce  string
	cs     *certState // nil when it carried no certificate
	bundle string     // BundleVersion it carried; "" when none
}

// deltaStreamID maps a delta stream's ID to its key in Server.streams.
// go-control-plane numbers SotW and delta streams with two separate counters,
// both starting at 1, so the raw IDs collide: delta streams are keyed by the
// negated ID, SotW streams by the ID itself.
func deltaStreamID(id int64) int64 { return -id }

// OnDeltaStreamOpen implements the server callbacks (delta).
func (c callbacks) OnDeltaStreamOpen(ctx context.Context, id int64, typeURL string) error {
	return c.open(ctx, deltaStreamID(id), typeURL, "delta")
}

// OnDeltaStreamClosed implements the server callbacks.
func (c callbacks) OnDeltaStreamClosed(id int64, _ *core.Node) { c.closed(deltaStreamID(id)) }

// OnStreamDeltaRequest implements the server callbacks.
func (c callbacks) OnStreamDeltaRequest(id int64, req *discovery.DeltaDiscoveryRequest) error {
	c.s.debugRequest(deltaStreamID(id), req.GetTypeUrl(), len(req.GetResourceNamesSubscribe()), "", req.GetResponseNonce(), req.GetErrorDetail() != nil)
	if err := c.checkRequest(deltaStreamID(id), req.GetTypeUrl(), req.GetResourceNamesSubscribe(), req.GetResourceNamesUnsubscribe(), true); err != nil {
		return err
	}
	n, err := c.request(deltaStreamID(id), req.GetNode(), req.GetTypeUrl(), req.GetResourceNamesSubscribe(), req.GetResponseNonce(), nackDetail(req.GetErrorDetail(), req.GetErrorDetail() != nil))
	if err != nil {
		return err
	}
	req.Node = n
	return nil
}

// OnStreamDeltaResponse implements the server callbacks.
func (c callbacks) OnStreamDeltaResponse(id int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
	c.s.debugDeltaResponse(deltaStreamID(id), resp)
	anys := make([]*anypb.Any, 0, len(resp.GetResources()))
	for _, r := range resp.GetResources() {
		anys = append(anys, r.GetResource())
	}
	c.sent(deltaStreamID(id), resp.GetNonce(), anys)
}

// OnFetchRequest refuses REST polling: it carries no stream credential.
func (c callbacks) OnFetchRequest(context.Context, *discovery.DiscoveryRequest) error {
	return status.Error(codes.Unimplemented, "REST fetch is not served; use a gRPC xDS stream")
}

// OnFetchResponse implements the server callbacks.
func (c callbacks) OnFetchResponse(*discovery.DiscoveryRequest, *discovery.DiscoveryResponse) {}
