package sds

import (
	"context"
	"log/slog"
	"net"
	"strings"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"

	"google.golang.org/grpc/credentials"
)

// Debug lines of the serving paths: one per stream opened, bound to a node
// and closed, per request and per response. Each checks first that debug is
// enabled, so that at info nothing is built or looked up.

func (s *Server) debugOn() bool { return s.log.Enabled(context.Background(), slog.LevelDebug) }

// debugStreamOpened logs an authenticated stream.
func (s *Server) debugStreamOpened(id int64, st *streamState) {
	if !s.debugOn() {
		return
	}
	s.log.Debug("stream opened", "stream_id", id, "xds_type", st.kind, "protocol", st.protocol, "peer", st.peer, "token_id", st.token.ID)
}

// debugStreamBound logs the node a stream was bound to by its first request.
func (s *Server) debugStreamBound(id int64, st *streamState, claimed string) {
	if !s.debugOn() {
		return
	}
	s.log.Debug("stream bound to node", "stream_id", id, "node_id", st.node.rec.ID, "service", st.node.rec.Service, "env", st.node.rec.Env,
		"claimed_node_id", s.lim.logs.clip(claimed), "xds_type", st.kind, "protocol", st.protocol, "peer", st.peer)
}

// debugStreamClosed logs a stream that ended.
func (s *Server) debugStreamClosed(id int64, st *streamState) {
	if st == nil || !s.debugOn() {
		return
	}
	var nodeID string
	if st.node != nil {
		nodeID = st.node.rec.ID
	}
	s.log.Debug("stream closed", "stream_id", id, "node_id", nodeID, "xds_type", st.kind, "protocol", st.protocol, "peer", st.peer)
}

// debugRequest logs one request: initial (no nonce), ACK or NACK of the
// response with that nonce.
func (s *Server) debugRequest(id int64, typeURL string, names int, version, nonce string, nack bool) {
	if !s.debugOn() {
		return
	}
	kind := "ack"
	switch {
	case nack:
		kind = "nack"
	case nonce == "":
		kind = "initial"
	}
	var nodeID string
	if st := s.stream(id); st != nil && st.node != nil {
		nodeID = st.node.rec.ID
	}
	s.log.Debug("xds request", "stream_id", id, "node_id", nodeID, "type_url", s.lim.logs.clip(typeURL), "names", names,
		"version", s.lim.logs.clip(version), "nonce", s.lim.logs.clip(nonce), "kind", kind)
}

// debugResponse logs one response pushed on a stream.
func (s *Server) debugResponse(id int64, typeURL, version, nonce string, resources int) {
	if !s.debugOn() {
		return
	}
	var nodeID string
	if st := s.stream(id); st != nil && st.node != nil {
		nodeID = st.node.rec.ID
	}
	s.log.Debug("xds push", "stream_id", id, "node_id", nodeID, "type_url", s.lim.logs.clip(typeURL), "version", version,
		"nonce", nonce, "resources", resources)
}

// debugDeltaResponse logs one delta response: its resources' versions
// (name=version, the certificate serial for a certificate) stand for the
// version.
func (s *Server) debugDeltaResponse(id int64, resp *discovery.DeltaDiscoveryResponse) {
	if !s.debugOn() {
		return
	}
	vs := make([]string, 0, len(resp.GetResources()))
	for _, r := range resp.GetResources() {
		vs = append(vs, r.GetName()+"="+r.GetVersion())
	}
	s.debugResponse(id, resp.GetTypeUrl(), s.lim.logs.clip(strings.Join(vs, ",")), resp.GetNonce(), len(resp.GetResources()))
}

// handshakeLogger wraps the xDS listener's TLS credentials to log failed
// handshakes at debug (a sidecar that does not trust the server's
// certificate, or expects another name, only shows as a TLS alert here),
// through the log throttle since any client can cause them.
type handshakeLogger struct {
	credentials.TransportCredentials
	s *Server
}

// ServerHandshake implements credentials.TransportCredentials.
func (h handshakeLogger) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, info, err := h.TransportCredentials.ServerHandshake(conn)
	if err != nil && h.s.debugOn() {
		h.s.lim.logs.logAt(slog.LevelDebug, eventTLS, "", "peer", conn.RemoteAddr().String(), "error", err)
	}
	return c, info, err
}

// Clone implements credentials.TransportCredentials.
func (h handshakeLogger) Clone() credentials.TransportCredentials {
	return handshakeLogger{TransportCredentials: h.TransportCredentials.Clone(), s: h.s}
}
