package sds

import (
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/store"
)

// DefaultTokenTTL is how long a bootstrap token admits new nodes when the
// operator does not say.
const DefaultTokenTTL = 24 * time.Hour

// DefaultTokenUses is how many nodes a bootstrap token admits when the
// operator does not say: one, so that a token is spent by the sidecar it
// was made for. 0 means unlimited and must be asked for.
const DefaultTokenUses = 1

// TokenCreateRequest is the body of POST /v1/tokens.
type TokenCreateRequest struct {
	Service string `json:"service"`
	Env     string `json:"env,omitempty"`
	// TTL is a Go duration ("24h"); empty means DefaultTokenTTL.
	TTL string `json:"ttl,omitempty"`
	// Uses is how many nodes the token admits; absent means
	// DefaultTokenUses, 0 unlimited.
	Uses *int `json:"uses,omitempty"`
}

// TokenInfo is a token record as the admin API shows it: everything but the
// secret's hash.
type TokenInfo struct {
	ID         string    `json:"id"`
	Service    string    `json:"service"`
	Env        string    `json:"env"`
	Status     string    `json:"status"`
	CreatedAt  time.Time `json:"created_at"`
	ExpiresAt  time.Time `json:"expires_at"`
	MaxUses    int       `json:"max_uses"`
	Uses       int       `json:"uses"`
	RevokedAt  time.Time `json:"revoked_at,omitzero"`
	LastUsedAt time.Time `json:"last_used_at,omitzero"`
}

func (s *Server) tokenInfo(r bootstrap.Record) TokenInfo {
	status := r.Status(s.now())
	if status == "active" && !s.bundlePins(r.Digest) {
		// It pins a root no longer trusted (a completed root rotation):
		// refused, a new token is needed.
		status = TokenStaleRoot
	}
	return TokenInfo{ID: r.ID, Service: r.Service, Env: r.Env, Status: status,
		CreatedAt: r.CreatedAt, ExpiresAt: r.ExpiresAt, MaxUses: r.MaxUses, Uses: r.Uses,
		RevokedAt: r.RevokedAt, LastUsedAt: r.LastUsedAt}
}

// TokenStaleRoot is the listed status of an otherwise active token that
// pins a root the trust bundle no longer holds (after a root rotation):
// the server refuses it; create a new one.
const TokenStaleRoot = "stale_root"

// bundlePins reports whether a token's root digest names a root of the
// trust bundle.
func (s *Server) bundlePins(digest string) bool {
	for _, r := range s.Roots() {
		if bootstrap.RootDigest(r) == digest {
			return true
		}
	}
	return false
}

// TokenCreateResponse is the answer to POST /v1/tokens: the token text, shown
// this once and never stored, and its record.
type TokenCreateResponse struct {
	Token string    `json:"token"`
	Info  TokenInfo `json:"info"`
}

// ErrorResponse is the body of every admin API error.
type ErrorResponse struct {
	Error string `json:"error"`
}

// AdminHandler returns the admin API: HTTP+JSON, served by the caller on a
// Unix socket only the server's user can open. CLI commands are thin clients
// of it, so the store keeps a single writer.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/tokens", s.handleTokenCreate)
	mux.HandleFunc("GET /v1/tokens", s.handleTokenList)
	mux.HandleFunc("POST /v1/tokens/{id}/revoke", s.handleTokenRevoke)
	mux.HandleFunc("GET /v1/nodes", s.handleNodeList)
	mux.HandleFunc("GET /v1/nodes/{id}", s.handleNodeGet)
	mux.HandleFunc("POST /v1/nodes/{id}/revoke", s.handleNodeRevoke)
	mux.HandleFunc("GET /v1/roots", s.handleRoots)
	mux.HandleFunc("GET /v1/acl", s.handleACL)
	mux.HandleFunc("GET /v1/status", s.handleStatus)
	mux.HandleFunc("POST /v1/ca/rotate", s.handleCARotate)
	mux.HandleFunc("GET /v1/ca/status", s.handleCAStatus)
	return jsonErrors{mux}
}

// jsonErrors answers the requests its mux has no route for (an unknown
// path: 404; a known path with another method: 405 with Allow) with the
// admin API's JSON error body instead of the mux's plain text, so that
// every error a client sees decodes as ErrorResponse.
type jsonErrors struct{ mux *http.ServeMux }

func (j jsonErrors) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.RequestURI == "*" { // the mux answers a bare 400 (found by FuzzAdminAPI)
		writeError(w, http.StatusBadRequest, fmt.Errorf("no admin API endpoint * for %s", r.Method))
		return
	}
	h, pattern := j.mux.Handler(r)
	if pattern != "" {
		j.mux.ServeHTTP(w, r)
		return
	}
	// Learn what the mux would answer, without its body.
	p := &statusProbe{header: http.Header{}}
	h.ServeHTTP(p, r)
	switch p.code {
	case http.StatusNotFound:
		writeError(w, p.code, fmt.Errorf("no admin API endpoint %s", r.URL.Path))
	case http.StatusMethodNotAllowed:
		w.Header().Set("Allow", p.header.Get("Allow"))
		writeError(w, p.code, fmt.Errorf("method %s not allowed on %s; allowed: %s", r.Method, r.URL.Path, p.header.Get("Allow")))
	default: // a redirect to the cleaned path
		j.mux.ServeHTTP(w, r)
	}
}

// statusProbe is a ResponseWriter that keeps the header and status code and
// discards the body.
type statusProbe struct {
	header http.Header
	code   int
}

func (p *statusProbe) Header() http.Header { return p.header }

func (p *statusProbe) Write(b []byte) (int, error) {
	if p.code == 0 {
		p.code = http.StatusOK
	}
	return len(b), nil
}

func (p *statusProbe) WriteHeader(code int) {
	if p.code == 0 {
		p.code = code
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, ErrorResponse{Error: err.Error()})
}

// errorStatus maps an error to an HTTP status: unknown IDs are 404, the rest
// is the server's fault and logged.
func (s *Server) writeErr(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, store.ErrNotFound):
		writeError(w, http.StatusNotFound, err)
		return
	case errors.Is(err, bootstrap.ErrInvalidID):
		writeError(w, http.StatusBadRequest, err)
		return
	}
	// The route, not the path: `token revoke` may put the token text in it.
	s.log.Error("admin request failed", "method", r.Method, "route", r.Pattern, "error", err)
	writeError(w, http.StatusInternalServerError, err)
}

func (s *Server) handleTokenCreate(w http.ResponseWriter, r *http.Request) {
	var req TokenCreateRequest
	if err := decodeJSON(w, r, &req); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad request body: %w", err))
		return
	}
	if req.Env == "" {
		req.Env = "default"
	}
	ttl := DefaultTokenTTL
	if req.TTL != "" {
		d, err := time.ParseDuration(req.TTL)
		if err != nil || d <= 0 {
			writeError(w, http.StatusBadRequest, fmt.Errorf("invalid ttl %q: use a positive duration such as 24h or 30m", req.TTL))
			return
		}
		ttl = d
	}
	if err := issuer.ValidateName("service", req.Service); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	if err := issuer.ValidateName("environment", req.Env); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	uses := DefaultTokenUses
	if req.Uses != nil {
		uses = *req.Uses
	}
	if uses < 0 {
		writeError(w, http.StatusBadRequest, fmt.Errorf("invalid uses %d: use 0 (unlimited) or a positive count", uses))
		return
	}
	tok, rec, err := s.cfg.Tokens.Create(r.Context(), bootstrap.CreateOptions{
		Service: req.Service, Env: req.Env, TTL: ttl, MaxUses: uses,
	}, s.Roots()[0])
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	s.log.Info("token created", "token_id", rec.ID, "service", rec.Service, "env", rec.Env,
		"expires_at", rec.ExpiresAt.Format(time.RFC3339), "max_uses", rec.MaxUses)
	writeJSON(w, http.StatusCreated, TokenCreateResponse{Token: tok, Info: s.tokenInfo(rec)})
}

func (s *Server) handleTokenList(w http.ResponseWriter, r *http.Request) {
	recs, err := s.cfg.Tokens.List(r.Context())
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	infos := make([]TokenInfo, 0, len(recs))
	for _, r := range recs {
		infos = append(infos, s.tokenInfo(r))
	}
	writeJSON(w, http.StatusOK, TokenList{Tokens: infos})
}

// TokenList is the answer to GET /v1/tokens (`token list -o json`).
type TokenList struct {
	Tokens []TokenInfo `json:"tokens"`
}

// TokenRevokeResponse is the answer to POST /v1/tokens/{id}/revoke.
type TokenRevokeResponse struct {
	TokenInfo
	// RevokedNodes lists the nodes revoked with the token
	// (?revoke_nodes=true).
	RevokedNodes []string `json:"revoked_nodes,omitempty"`
}

func (s *Server) handleTokenRevoke(w http.ResponseWriter, r *http.Request) {
	withNodes, err := boolParam(r, "revoke_nodes")
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	rec, nodes, err := s.RevokeToken(r.Context(), r.PathValue("id"), withNodes)
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, TokenRevokeResponse{TokenInfo: s.tokenInfo(rec), RevokedNodes: nodes})
}

// boolParam reads an optional true/false query parameter.
func boolParam(r *http.Request, name string) (bool, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("query parameter %s=%q: want true or false", name, v)
	}
	return b, nil
}

// NodeRevokeRequest is the optional body of POST /v1/nodes/{id}/revoke.
type NodeRevokeRequest struct {
	Reason string `json:"reason,omitempty"`
}

func (s *Server) handleNodeRevoke(w http.ResponseWriter, r *http.Request) {
	var req NodeRevokeRequest
	if r.ContentLength != 0 {
		if err := decodeJSON(w, r, &req); err != nil {
			writeError(w, http.StatusBadRequest, fmt.Errorf("bad request body: %w", err))
			return
		}
	}
	if len(req.Reason) > 256 {
		writeError(w, http.StatusBadRequest, fmt.Errorf("reason is %d characters long; keep it under 256", len(req.Reason)))
		return
	}
	keep, err := boolParam(r, "keep_token")
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	revokeTok, err := boolParam(r, "revoke_token")
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	action := TokenAuto
	switch {
	case keep && revokeTok:
		writeError(w, http.StatusBadRequest, errors.New("keep_token and revoke_token exclude each other: choose one"))
		return
	case keep:
		action = TokenKeep
	case revokeTok:
		action = TokenRevoke
	}
	res, err := s.RevokeNodeWith(r.Context(), r.PathValue("id"), req.Reason, action)
	var shared *SharedTokenError
	switch {
	case errors.As(err, &shared):
		writeError(w, http.StatusConflict, err)
		return
	case err != nil && res == nil:
		s.writeErr(w, r, err)
		return
	case errors.Is(err, ErrTokenNotRevoked): // the node is revoked, its token is not
		s.writeErr(w, r, err)
		return
	case err != nil: // revoked here; the CA or the CRL did not follow yet
		s.log.Error("node revoked, but revocation is not complete everywhere", "node_id", res.Node.ID, "error", err)
	}
	out := NodeRevokeResponse{NodeInfo: s.nodeInfo(*res.Node), TokenRevoked: res.TokenRevoked, TokenNote: res.TokenNote}
	if res.Token != nil {
		ti := s.tokenInfo(*res.Token)
		out.Token = &ti
	}
	writeJSON(w, http.StatusOK, out)
}

// NodeRevokeResponse is the answer to POST /v1/nodes/{id}/revoke: the
// revoked node and what became of its token.
type NodeRevokeResponse struct {
	NodeInfo
	// Token is the node's token after the revocation; absent if it no
	// longer exists.
	Token *TokenInfo `json:"token,omitempty"`
	// TokenRevoked is true when the token was revoked with the node.
	TokenRevoked bool `json:"token_revoked"`
	// TokenNote says what happened to the token and why.
	TokenNote string `json:"token_note,omitempty"`
}

// Node states as the admin API shows them (NodeInfo.State).
const (
	// NodeConnected: the node has at least one open xDS stream.
	NodeConnected = "connected"
	// NodeDisconnected: the node is admitted but has no open stream.
	NodeDisconnected = "disconnected"
	// NodeStateRevoked: the node is revoked.
	NodeStateRevoked = "revoked"
)

// NodeModeDirect is NodeInfo.Mode for an Envoy that holds its own xDS
// streams to the server, the only mode so far (a node agent comes later).
const NodeModeDirect = "direct"

// NodeInfo is a node as the admin API shows it: the stored record and, for
// a node this server has seen since it started, its live state. Its
// LastSeen is the live value (moved by every stream bound, request and
// stream closed), which the stored record follows at most once a minute.
type NodeInfo struct {
	Node
	// State is NodeConnected, NodeDisconnected or NodeStateRevoked:
	// unlike Status (the record's lifecycle, active or revoked), it tells
	// whether the node is connected now.
	State string `json:"state"`
	// Mode is how the node talks to the server: NodeModeDirect.
	Mode string `json:"mode"`
	// Streams is the number of open xDS streams.
	Streams int `json:"streams"`
	// RenewAt is when the current certificate is due for renewal.
	RenewAt time.Time `json:"renew_at,omitzero"`
	// RenewalFailures counts consecutive failed renewals; LastError is the
	// last one's reason.
	RenewalFailures int    `json:"renewal_failures,omitempty"`
	LastError       string `json:"last_error,omitempty"`
	// Connections are the peer addresses of the connections with open
	// streams: more than one means the node's key is served to each.
	Connections []string `json:"connections,omitempty"`
	// SharedEvents counts, since the server started, the streams that
	// bound to the node from a new connection while another was open.
	SharedEvents int `json:"shared_events"`
}

func (s *Server) nodeInfo(n Node) NodeInfo {
	info := NodeInfo{Node: n, Mode: NodeModeDirect}
	s.mu.Lock()
	ln := s.live[n.ID]
	if ln != nil {
		info.Streams = ln.streams
		info.Connections, info.SharedEvents = ln.conns.list(), ln.conns.shared
	}
	s.mu.Unlock()
	info.LastSeen = liveLastSeen(n.LastSeen, ln)
	switch {
	case n.Status == NodeRevoked:
		info.State = NodeStateRevoked
	case info.Streams > 0:
		info.State = NodeConnected
	default:
		info.State = NodeDisconnected
	}
	if ln == nil {
		return info
	}
	if at, ok := s.sched.scheduled(ln); ok {
		info.RenewAt = at.UTC()
	}
	ln.hmu.Lock()
	info.RenewalFailures, info.LastError = ln.failures, ln.lastErr
	ln.hmu.Unlock()
	return info
}

func (s *Server) handleNodeList(w http.ResponseWriter, r *http.Request) {
	nodes, err := s.NodeList(r.Context())
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	infos := make([]NodeInfo, 0, len(nodes))
	for _, n := range nodes {
		infos = append(infos, s.nodeInfo(n))
	}
	writeJSON(w, http.StatusOK, NodeList{Nodes: infos})
}

// NodeList is the answer to GET /v1/nodes (`node list -o json`).
type NodeList struct {
	Nodes []NodeInfo `json:"nodes"`
}

func (s *Server) handleNodeGet(w http.ResponseWriter, r *http.Request) {
	n, err := s.nodes.get(r.Context(), r.PathValue("id"))
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.nodeInfo(*n))
}

func (s *Server) handleRoots(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/x-pem-file")
	for _, c := range s.Roots() {
		_ = pem.Encode(w, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
}

func (s *Server) handleACL(w http.ResponseWriter, _ *http.Request) {
	pw := s.policyWatch.Load()
	if pw == nil {
		writeJSON(w, http.StatusOK, PolicyReport{Services: []PolicyStatus{}})
		return
	}
	writeJSON(w, http.StatusOK, pw.report())
}
