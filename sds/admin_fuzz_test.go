package sds

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/store"
)

// adminFuzzEnv is a server for FuzzAdminAPI: the built-in CA, a memory
// store, one token and one node. No listener: requests go straight to the
// admin handler.
type adminFuzzEnv struct {
	srv       *Server
	kv        store.Store
	h         http.Handler
	token     string // the token's text
	tokenID   string
	secret    string
	nodeID    string
	replacer  *strings.Replacer
	logs      *logBuffer
	tokenIDs  map[string]bool // IDs that exist: the fixed token's
	nodeIDs   map[string]bool // and the fixed node's
	validPath map[string]bool // GET paths that answer 200
}

// fuzzNodeID is the ID of the node the fuzz environment stores.
const fuzzNodeID = "0123456789abcdef0123"

func newAdminFuzzEnv(f *testing.F) *adminFuzzEnv {
	f.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f.Cleanup(cancel)
	ca, err := local.Open(ctx, f.TempDir(), local.Options{TrustDomain: testTrustDomain})
	if err != nil {
		f.Fatalf("open CA: %v", err)
	}
	kv := store.NewMemory()
	f.Cleanup(func() { _ = kv.Close() })
	reg := bootstrap.NewRegistry(kv, nil)
	logs := &logBuffer{}
	srv, err := New(ctx, Config{
		TrustDomain: testTrustDomain,
		CertTTL:     time.Hour,
		CRLPeriod:   24 * time.Hour,
		Issuer:      ca,
		Tokens:      reg,
		Store:       kv,
		Metrics:     NewMetrics(prometheus.NewRegistry()),
		Logger:      slog.New(slog.NewTextHandler(logs, nil)),
	})
	if err != nil {
		f.Fatalf("sds.New: %v", err)
	}
	text, rec, err := reg.Create(ctx, bootstrap.CreateOptions{Service: "web", Env: "default", TTL: time.Hour}, srv.Roots()[0])
	if err != nil {
		f.Fatal(err)
	}
	tok, err := bootstrap.Parse(text)
	if err != nil {
		f.Fatal(err)
	}
	now := time.Now().UTC()
	if err := srv.nodes.put(ctx, &Node{ID: fuzzNodeID, Service: "web", Env: "default", TokenID: rec.ID,
		ClaimedID: "sidecar-1", Status: NodeActive, FirstSeen: now, LastSeen: now}); err != nil {
		f.Fatal(err)
	}
	return &adminFuzzEnv{
		srv: srv, kv: kv, h: srv.AdminHandler(), token: text, tokenID: rec.ID, secret: tok.Secret, nodeID: fuzzNodeID,
		replacer: strings.NewReplacer("{token}", rec.ID, "{tokentext}", text, "{node}", fuzzNodeID),
		logs:     logs,
		tokenIDs: map[string]bool{rec.ID: true, text: true},
		nodeIDs:  map[string]bool{fuzzNodeID: true},
		validPath: map[string]bool{
			"/v1/tokens": true, "/v1/nodes": true, "/v1/roots": true, "/v1/acl": true, "/v1/nodes/" + fuzzNodeID: true,
		},
	}
}

// strictJSON reports whether body is exactly one JSON value that decodes
// into v with no unknown field, and nothing after it but white space.
func strictJSON(body []byte, v any) bool {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return false
	}
	return errors.Is(dec.Decode(new(json.RawMessage)), io.EOF)
}

// FuzzAdminAPI sends any method, path and body to the admin API: no panic;
// every error is a 4xx or 5xx with a JSON body that is exactly
// {"error": "<non-empty>"}; a success (2xx) answers only a well-formed
// request (a known route, an existing ID, a body that is exactly one JSON
// object of the route's request type); redirects only to clean the path; no
// answer shows the stored token's secret unless the request carried it; and
// no log line shows it unless the body did (a free-text revoke reason), not
// even when the path carried it (`token revoke` accepts the token text as
// ID). In the path and body, "{token}", "{tokentext}" and "{node}" stand for
// the existing token's ID and text and the node's ID, so that mutations
// reach the handlers' success paths.
func FuzzAdminAPI(f *testing.F) {
	env := newAdminFuzzEnv(f)
	for _, s := range []struct {
		method, path, body string
		chunked            bool
	}{
		{"GET", "/v1/tokens", "", false},
		{"GET", "/v1/nodes", "", false},
		{"GET", "/v1/nodes/{node}", "", false},
		{"GET", "/v1/nodes/00000000000000000000", "", false},
		{"GET", "/v1/nodes/..%2f..%2ftokens", "", false},
		{"GET", "/v1/roots", "", false},
		{"GET", "/v1/acl", "", false},
		{"HEAD", "/v1/tokens", "", false},
		{"POST", "/v1/tokens", `{"service":"web","env":"prod","ttl":"2h","uses":3}`, false},
		{"POST", "/v1/tokens", `{"service":"web"}`, true},
		{"POST", "/v1/tokens", `{"service":"Bad Name!"}`, false},
		{"POST", "/v1/tokens", `{}`, false},
		{"POST", "/v1/tokens", `{"service":"web","env":"-prod"}`, false},
		{"POST", "/v1/tokens", `{"service":"web","color":"blue"}`, false},
		{"POST", "/v1/tokens", `service=web`, false},
		{"POST", "/v1/tokens", `{"service":"web","ttl":"-1h"}`, false},
		{"POST", "/v1/tokens", `{"service":"web","ttl":"9999999999h"}`, false},
		{"POST", "/v1/tokens", `{"service":"web","uses":-1}`, false},
		{"POST", "/v1/tokens", `{"service":"web","uses":1e100}`, false},
		{"POST", "/v1/tokens", `{"service":"web"}{"service":"db"}`, false},
		{"POST", "/v1/tokens", `{"service":"web"} trailing`, false},
		{"POST", "/v1/tokens", `{"service":"web","Service":"db"}`, false},
		{"POST", "/v1/tokens", `null`, false},
		{"POST", "/v1/tokens", `[]`, false},
		{"POST", "/v1/tokens", "", false},
		{"POST", "/v1/tokens", `{"service":"` + strings.Repeat("a", 70000) + `"}`, false},
		{"POST", "/v1/tokens/{token}/revoke", "", false},
		{"POST", "/v1/tokens/{token}/revoke?revoke_nodes=true", "", false},
		{"POST", "/v1/tokens/{tokentext}/revoke", "", false},
		{"POST", "/v1/tokens/0123456789abcdef/revoke", "", false},
		{"POST", "/v1/tokens/not-an-id/revoke", "", false},
		{"POST", "/v1/tokens/SDSTKN-1-x-y/revoke", "", false},
		{"POST", "/v1/nodes/{node}/revoke", `{"reason":"compromised"}`, false},
		{"POST", "/v1/nodes/{node}/revoke", "", true},
		{"POST", "/v1/nodes/{node}/revoke", `{"reason":"` + strings.Repeat("x", 300) + `"}`, false},
		{"POST", "/v1/nodes/{node}/revoke", `{"reason":1}`, false},
		{"POST", "/v1/nodes/{node}/revoke", `{"why":"x"}`, false},
		{"POST", "/v1/nodes/nope/revoke", "", false},
		{"DELETE", "/v1/tokens", "", false},
		{"PUT", "/v1/nodes/{node}", "{}", false},
		{"GET", "/v1/tokens/{token}/revoke", "", false},
		{"GET", "/", "", false},
		{"GET", "/v2/tokens", "", false},
		{"GET", "/v1//tokens", "", false},
		{"GET", "/v1/tokens/", "", false},
		{"GET", "/v1/./nodes", "", false},
		{"OPTIONS", "*", "", false},
		{"CONNECT", "/v1/tokens", "", false},
		{"BREW", "/v1/tokens", "", false},
	} {
		f.Add(s.method, s.path, []byte(s.body), s.chunked)
	}
	f.Fuzz(func(t *testing.T, method, path string, body []byte, chunked bool) {
		env.logs.mu.Lock()
		env.logs.b.Reset() // keep only this request's log lines
		env.logs.mu.Unlock()
		env.check(t, method, path, body, chunked)
		if logs := env.logs.String(); strings.Contains(logs, env.secret) && !strings.Contains(env.replacer.Replace(string(body)), env.secret) {
			t.Fatalf("%s %q: the log shows the stored token's secret:\n%s", method, path, logs)
		}
	})
}

// check sends one fuzzed request and checks the answer (see FuzzAdminAPI).
func (env *adminFuzzEnv) check(t *testing.T, method, path string, body []byte, chunked bool) {
	t.Helper()
	path = env.replacer.Replace(path)
	body = []byte(env.replacer.Replace(string(body)))
	target := path
	if !strings.HasPrefix(target, "/") && target != "*" {
		target = "/" + target
	}
	req, err := http.NewRequest(method, "http://sds-server"+target, bytes.NewReader(body))
	if err != nil {
		return // net/http would refuse such a request line before any handler
	}
	req.RequestURI = target
	method = req.Method // "" means GET
	if chunked {
		req.ContentLength = -1
	}
	if len(body) > 0 {
		req.Header.Set("Content-Type", "application/json")
	}
	rec := httptest.NewRecorder()
	env.h.ServeHTTP(rec, req)
	code, out := rec.Code, rec.Body.Bytes()
	where := method + " " + target

	// The server keeps only the secret's hash: an answer may show the
	// secret only by echoing a request that carried it (an error naming
	// the path the caller sent), and never in a log line (FuzzAdminAPI).
	if bytes.Contains(out, []byte(env.secret)) && !strings.Contains(method+" "+path+" "+string(body), env.secret) {
		t.Fatalf("%s: the answer shows the stored token's secret: %s", where, out)
	}
	switch {
	case code >= 400 && code < 600:
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("%s: error %d with Content-Type %q, body %q; want application/json", where, code, ct, out)
		}
		var e ErrorResponse
		if !strictJSON(out, &e) || e.Error == "" {
			t.Fatalf("%s: error %d body %q is not {\"error\": ...}", where, code, out)
		}
		return
	case code == http.StatusMovedPermanently || code == http.StatusTemporaryRedirect || code == http.StatusPermanentRedirect:
		if rec.Header().Get("Location") == "" {
			t.Fatalf("%s: redirect %d without Location", where, code)
		}
		return
	case code < 200 || code >= 300:
		t.Fatalf("%s: status %d, body %q", where, code, out)
	}

	// A success: the request must have been well-formed.
	p := req.URL.Path
	get := method == http.MethodGet || method == http.MethodHead
	switch {
	case get && env.validPath[p]:
		if code != http.StatusOK {
			t.Fatalf("%s: status %d, want 200", where, code)
		}
	case method == http.MethodPost && p == "/v1/tokens":
		var tr TokenCreateRequest
		if code != http.StatusCreated || !strictJSON(body, &tr) {
			t.Fatalf("%s: status %d for body %q; want 201 only for one TokenCreateRequest object", where, code, body)
		}
		var resp TokenCreateResponse
		if err := json.Unmarshal(out, &resp); err != nil || resp.Info.ID == "" || resp.Info.Service != tr.Service {
			t.Fatalf("%s: answer %q (%v)", where, out, err)
		}
		// Keep the store to the fixed token, so that iterations stay
		// fast and alike.
		if err := env.kv.Delete(context.Background(), bootstrap.Bucket, resp.Info.ID); err != nil {
			t.Fatal(err)
		}
	case method == http.MethodPost && strings.HasPrefix(p, "/v1/tokens/") && strings.HasSuffix(p, "/revoke"):
		id := strings.TrimSuffix(strings.TrimPrefix(p, "/v1/tokens/"), "/revoke")
		if !env.tokenIDs[strings.TrimSpace(id)] {
			t.Fatalf("%s: status %d revoking token %q, which does not exist", where, code, id)
		}
	case method == http.MethodPost && p == "/v1/nodes/"+env.nodeID+"/revoke":
		var nr NodeRevokeRequest
		if req.ContentLength == 0 && len(body) == 0 {
			break
		}
		if !strictJSON(body, &nr) {
			t.Fatalf("%s: status %d for body %q; want 200 only for one NodeRevokeRequest object", where, code, body)
		}
	default:
		t.Fatalf("%s: status %d for a request that names nothing: %q", where, code, out)
	}
}
