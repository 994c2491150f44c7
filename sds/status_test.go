package sds

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// getStatus calls GET /v1/status and decodes it; raw is the JSON text.
func getStatus(t *testing.T, srv *Server) (rep StatusReport, raw string) {
	t.Helper()
	code, body, hdr := adminDo(t, srv.AdminHandler(), http.MethodGet, "/v1/status", "")
	if code != http.StatusOK || hdr.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /v1/status: %d %s %s", code, hdr.Get("Content-Type"), body)
	}
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		t.Fatalf("GET /v1/status: %v\n%s", err, body)
	}
	return rep, body
}

// TestStatusReady: a fresh server is ready and reports its CA (root,
// intermediate, CRL), an empty policy summary and no rotation; a connected
// node is counted; invalid and stray policy files are counted, named and
// warned about without making the server unready.
func TestStatusReady(t *testing.T) {
	env := newTestEnv(t)
	rep, raw := getStatus(t, env.srv)
	if !rep.Ready || len(rep.Reasons) != 0 || rep.NotReadyError() != nil {
		t.Fatalf("fresh server: ready %v, reasons %v; want ready", rep.Ready, rep.Reasons)
	}
	if !strings.Contains(raw, `"rotation":null`) || rep.Rotation != nil {
		t.Errorf("rotation is not null: %s", raw)
	}
	if rep.TrustDomain != testTrustDomain {
		t.Errorf("trust_domain %q", rep.TrustDomain)
	}
	if len(rep.CA.Roots) != 1 || !rep.CA.Roots[0].NotAfter.Equal(env.ca.Root().NotAfter) || rep.CA.Roots[0].Subject == "" {
		t.Errorf("roots %+v, want the CA's root expiring %s", rep.CA.Roots, env.ca.Root().NotAfter)
	}
	if i := rep.CA.Intermediate; i == nil || !i.NotAfter.Equal(env.ca.Intermediate().NotAfter) || i.Serial != serialHex(env.ca.Intermediate()) {
		t.Errorf("intermediate %+v, want the CA's, expiring %s", i, env.ca.Intermediate().NotAfter)
	}
	crl := env.srv.rootCA.Load().crl
	if c := rep.CA.CRL; c == nil || !c.NextUpdate.Equal(crl.NextUpdate) || !c.ThisUpdate.Equal(crl.ThisUpdate) {
		t.Errorf("crl %+v, want next update %s", c, crl.NextUpdate)
	}
	if rep.Nodes != (NodeCounts{}) {
		t.Errorf("nodes %+v before any node, want zeros", rep.Nodes)
	}

	tok, _ := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}
	r, s := env.fetch(t, sdsSotw, tok, "a-1", names...)
	ackReply(t, s, false, names, r)
	if !eventually(2*time.Second, func() bool { rep, _ = getStatus(t, env.srv); return rep.Nodes.Connected == 1 }) {
		t.Fatalf("nodes %+v, want one connected", rep.Nodes)
	}
	if want := (NodeCounts{Total: 1, Connected: 1, Streams: 1}); rep.Nodes != want {
		t.Errorf("nodes %+v, want %+v", rep.Nodes, want)
	}

	dir := t.TempDir()
	writePolicy(t, dir, "default/api.json", `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]}]`)
	writePolicy(t, dir, "default/db.json", `[{"permission": {"method": "GET"}, "allow": ["web"]}]`)
	writePolicy(t, dir, "stray.json", `[]`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := env.srv.WatchPolicies(ctx, dir, "deny", time.Hour); err != nil {
		t.Fatalf("WatchPolicies: %v", err)
	}
	rep, _ = getStatus(t, env.srv)
	if !rep.Ready {
		t.Errorf("policy errors made the server not ready: %v", rep.Reasons)
	}
	p := rep.Policy
	if p.Dir != dir || p.Invalid != 1 || !slices.Equal(p.InvalidFiles, []string{"default/db.json"}) || len(p.Stray) != 1 || !strings.HasPrefix(p.Stray[0], "stray.json") {
		t.Errorf("policy %+v, want db.json invalid and stray.json stray in %s", p, dir)
	}
	if !slices.ContainsFunc(rep.Warnings, func(w string) bool { return strings.Contains(w, "1 invalid and 1 stray") }) {
		t.Errorf("warnings %q lack the policy problems", rep.Warnings)
	}
}

// TestStatusNotReady: a revocation list near its end makes the report not
// ready with the reason, as /readyz.
func TestStatusNotReady(t *testing.T) {
	env, rv := newRevokerEnv(t)
	ctx := context.Background()
	if rep, _ := getStatus(t, env.srv); !rep.Ready {
		t.Fatalf("fresh server not ready: %v", rep.Reasons)
	}
	rv.set(func(r *revokerIssuer) { r.expired = true })
	if _, err := env.srv.refreshRevocations(ctx); err != nil {
		t.Fatalf("refresh: %v", err)
	}
	env.clock.Advance(55 * time.Minute) // within 10 % of the kept list's end
	rep, _ := getStatus(t, env.srv)
	if rep.Ready || len(rep.Reasons) != 1 || !strings.Contains(rep.Reasons[0], "revocation list expires") {
		t.Fatalf("ready %v, reasons %q; want not ready because of the revocation list", rep.Ready, rep.Reasons)
	}
	if err := rep.NotReadyError(); err == nil || !strings.HasPrefix(err.Error(), "not ready: revocation list expires") {
		t.Errorf("NotReadyError = %v", err)
	}
	if err := env.srv.Ready(ctx); err == nil || err.Error() != rep.Reasons[0] {
		t.Errorf("Ready = %v, status reasons %q: they disagree", err, rep.Reasons)
	}
}

func TestSplitJoined(t *testing.T) {
	a, b, c := errors.New("a"), errors.New("b"), errors.New("c")
	tests := []struct {
		err  error
		want []string
	}{
		{a, []string{"a"}},
		{errors.Join(a, nil, b), []string{"a", "b"}},
		{errors.Join(a, errors.Join(b, c)), []string{"a", "b", "c"}},
	}
	for _, tt := range tests {
		if got := splitJoined(tt.err); !slices.Equal(got, tt.want) {
			t.Errorf("splitJoined(%q) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

// TestAdminErrorsAreJSON: unknown paths and wrong methods get the admin
// API's JSON error, with the right status (and Allow for 405).
func TestAdminErrorsAreJSON(t *testing.T) {
	env := newTestEnv(t)
	h := env.srv.AdminHandler()
	tests := []struct {
		method, path string
		code         int
		allow        string
	}{
		{"GET", "/v1/nope", http.StatusNotFound, ""},
		{"GET", "/", http.StatusNotFound, ""},
		{"GET", "/v1/nodes/x/y", http.StatusNotFound, ""},
		{"DELETE", "/v1/tokens", http.StatusMethodNotAllowed, "GET, HEAD, POST"},
		{"POST", "/v1/status", http.StatusMethodNotAllowed, "GET, HEAD"},
		{"GET", "/v1/tokens/abc/revoke", http.StatusMethodNotAllowed, "POST"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			code, body, hdr := adminDo(t, h, tt.method, tt.path, "")
			if code != tt.code {
				t.Fatalf("status %d, want %d: %s", code, tt.code, body)
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			var e ErrorResponse
			dec := json.NewDecoder(strings.NewReader(body))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&e); err != nil || !strings.Contains(e.Error, tt.path) {
				t.Errorf("body %q: %v; want {\"error\": ...} naming %s", body, err, tt.path)
			}
			if got := hdr.Get("Allow"); got != tt.allow {
				t.Errorf("Allow %q, want %q", got, tt.allow)
			}
		})
	}
}

// TestNodeLastSeenAndState: last_seen moves with every request of a node,
// in the admin API at once and in the store at most once a minute; closing
// the stream moves it too and turns the node disconnected; revoking it
// turns it revoked.
func TestNodeLastSeenAndState(t *testing.T) {
	env := newTestEnv(t)
	tok, rec := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}
	r, s := env.fetch(t, sdsSotw, tok, "a-1", names...)
	node := env.nodeFor(t, rec.ID, "a-1")
	info := func() NodeInfo {
		code, body, _ := adminDo(t, env.srv.AdminHandler(), http.MethodGet, "/v1/nodes/"+node.ID, "")
		if code != http.StatusOK {
			t.Fatalf("GET node: %d %s", code, body)
		}
		var n NodeInfo
		if err := json.Unmarshal([]byte(body), &n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := info(); n.State != NodeConnected || n.Mode != NodeModeDirect || n.Streams != 1 || n.ClaimedID != "a-1" {
		t.Fatalf("state %q mode %q streams %d claimed %q; want connected, direct, 1, a-1", n.State, n.Mode, n.Streams, n.ClaimedID)
	}
	stored0 := getNode(t, env.srv, node.ID).LastSeen

	// An ACK 10 s later: live value moves, the store does not.
	env.clock.Advance(10 * time.Second)
	ackAt := env.clock.Now()
	ackReply(t, s, false, names, r)
	if !eventually(2*time.Second, func() bool { return !info().LastSeen.Before(ackAt) }) {
		t.Fatalf("last_seen %s after an ACK at %s, want moved", info().LastSeen, ackAt)
	}
	if got := getNode(t, env.srv, node.ID).LastSeen; !got.Equal(stored0) {
		t.Errorf("stored last_seen moved from %s to %s within a minute: store writes not bounded", stored0, got)
	}

	// A request more than a minute after the stored value: stored.
	env.clock.Advance(lastSeenStoreEvery + time.Second)
	reqAt := env.clock.Now()
	send(t, s, xdsReq{version: r.version, nonce: r.nonce, names: names})
	if !eventually(2*time.Second, func() bool { return !getNode(t, env.srv, node.ID).LastSeen.Before(reqAt) }) {
		t.Errorf("stored last_seen %s, want ≥ %s once a minute passed", getNode(t, env.srv, node.ID).LastSeen, reqAt)
	}

	// The stream closes (a killed sidecar): disconnected, seen then.
	env.clock.Advance(5 * time.Second)
	closedAt := env.clock.Now()
	s.close()
	if !eventually(2*time.Second, func() bool { return info().State == NodeDisconnected }) {
		t.Fatalf("state %q after the stream closed, want disconnected", info().State)
	}
	if n := info(); n.LastSeen.Before(closedAt) || n.Streams != 0 || n.Status != NodeActive {
		t.Errorf("last_seen %s (closed at %s), streams %d, status %s", n.LastSeen, closedAt, n.Streams, n.Status)
	}

	if _, err := env.srv.RevokeNode(context.Background(), node.ID, "test"); err != nil {
		t.Fatalf("RevokeNode: %v", err)
	}
	if n := info(); n.State != NodeStateRevoked {
		t.Errorf("state %q after revocation, want revoked", n.State)
	}
}
