package sds

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/store"
)

// Found by FuzzAdminAPI: a body with a second JSON value or stray text after
// the object was accepted and its tail silently dropped; and requests with no
// route got ServeMux's plain-text errors instead of the JSON error body that
// every other admin error has.
func TestAdminAPIStrictBodiesAndJSONErrors(t *testing.T) {
	env := newTestEnv(t)
	h := env.srv.AdminHandler()
	ctx := context.Background()
	token, rec := env.token(t, "frontend", 0, 0)
	env.fetch(t, sdsSotw, token, "strict-node", SecretDefault)
	node := env.nodeFor(t, rec.ID, "strict-node")

	tests := []struct {
		name, method, path, body string
		code                     int
		errWord                  string // in the JSON error
		allow                    string // the Allow header of a 405
	}{
		{name: "second object after a token request", method: "POST", path: "/v1/tokens",
			body: `{"service":"web"}{"service":"db"}`, code: http.StatusBadRequest, errWord: "more than one JSON value"},
		{name: "text after a token request", method: "POST", path: "/v1/tokens",
			body: `{"service":"web"} please`, code: http.StatusBadRequest, errWord: "after the JSON object"},
		{name: "second object after a node revoke request", method: "POST", path: "/v1/nodes/" + node.ID + "/revoke",
			body: `{"reason":"a"}{"reason":"b"}`, code: http.StatusBadRequest, errWord: "more than one JSON value"},
		{name: "unknown path", method: "GET", path: "/v2/tokens", code: http.StatusNotFound, errWord: "no admin API endpoint /v2/tokens"},
		{name: "root", method: "GET", path: "/", code: http.StatusNotFound, errWord: "no admin API endpoint"},
		{name: "trailing slash", method: "GET", path: "/v1/tokens/", code: http.StatusNotFound, errWord: "no admin API endpoint"},
		{name: "wrong method", method: "DELETE", path: "/v1/tokens", code: http.StatusMethodNotAllowed,
			errWord: "method DELETE not allowed on /v1/tokens", allow: "GET, HEAD, POST"},
		{name: "GET on a POST route", method: "GET", path: "/v1/nodes/" + node.ID + "/revoke", code: http.StatusMethodNotAllowed,
			errWord: "not allowed", allow: "POST"},
		{name: "asterisk target", method: "OPTIONS", path: "*", code: http.StatusBadRequest, errWord: "no admin API endpoint * for OPTIONS"},
		{name: "a trailing newline is fine", method: "POST", path: "/v1/tokens", body: "{\"service\":\"web\"}\n", code: http.StatusCreated},
		{name: "unclean path redirects", method: "GET", path: "/v1//tokens", code: http.StatusTemporaryRedirect},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body, hdr := adminDo(t, h, tc.method, tc.path, tc.body)
			if code != tc.code {
				t.Fatalf("%s %s: status %d, want %d; body %s", tc.method, tc.path, code, tc.code, body)
			}
			if code == http.StatusTemporaryRedirect { // ServeMux's path cleaning
				if loc := hdr.Get("Location"); loc != "/v1/tokens" {
					t.Errorf("redirect to %q, want /v1/tokens", loc)
				}
				return
			}
			if code < 400 {
				return
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			var e ErrorResponse
			if err := json.Unmarshal([]byte(body), &e); err != nil || !strings.Contains(e.Error, tc.errWord) {
				t.Errorf("error body %q (%v), want a JSON error saying %q", body, err, tc.errWord)
			}
			if got := hdr.Get("Allow"); got != tc.allow {
				t.Errorf("Allow %q, want %q", got, tc.allow)
			}
		})
	}

	// Nothing was half-applied: no token for web or db besides the one of
	// the accepted request, and the node is still active.
	recs, err := env.reg.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	services := map[string]int{}
	for _, r := range recs {
		services[r.Service]++
	}
	if services["web"] != 1 || services["db"] != 0 {
		t.Errorf("tokens by service %v, want one for web (the well-formed request) and none for db", services)
	}
	n, err := env.srv.nodes.get(ctx, node.ID)
	if err != nil {
		t.Fatal(err)
	}
	if n.Status != NodeActive {
		t.Errorf("node %s is %s after refused revoke requests", n.ID, n.Status)
	}
}

// brokenTokenStore fails every update of a token record, as a full disk
// would.
type brokenTokenStore struct{ store.Store }

func (b brokenTokenStore) Update(ctx context.Context, bucket, key string, fn func([]byte) ([]byte, error)) error {
	if bucket == bootstrap.Bucket {
		return errors.New("disk full")
	}
	return b.Store.Update(ctx, bucket, key, fn)
}

// `token revoke` accepts the token text as ID, so it travels in the path; a
// failed request used to log that path, and with it the secret.
func TestAdminAPIErrorLogHasNoTokenText(t *testing.T) {
	mem := store.NewMemory()
	env := newTestEnvWith(t, envOptions{store: brokenTokenStore{mem}})
	// Created past the broken store, on the memory store beneath it.
	text, _, err := bootstrap.NewRegistry(mem, nil).Create(context.Background(), bootstrap.CreateOptions{Service: "web", Env: "default", TTL: time.Hour}, env.srv.Roots()[0])
	if err != nil {
		t.Fatal(err)
	}
	code, body, _ := adminDo(t, env.srv.AdminHandler(), "POST", "/v1/tokens/"+url.PathEscape(text)+"/revoke", "")
	if code != http.StatusInternalServerError || !strings.Contains(body, "disk full") {
		t.Fatalf("status %d, body %s; want 500 saying disk full", code, body)
	}
	logs := env.logs.String()
	if strings.Contains(logs, secretOf(t, text)) {
		t.Errorf("the log shows the token secret:\n%s", logs)
	}
	if !strings.Contains(logs, `route="POST /v1/tokens/{id}/revoke"`) || !strings.Contains(logs, "disk full") {
		t.Errorf("the log does not name the route and the error:\n%s", logs)
	}
}
