package sds

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/meshid/sds-server/bootstrap"
)

// adminDo sends one request to the admin API and returns the status code
// and body.
func adminDo(t *testing.T, h http.Handler, method, path, body string) (int, string, http.Header) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String(), rec.Header()
}

func TestAdminAPI(t *testing.T) {
	env := newTestEnv(t)
	h := env.srv.AdminHandler()
	ctx := context.Background()

	// A node to list, and a token created outside the API.
	token, rec := env.token(t, "frontend", 0, 0)
	env.fetch(t, sdsSotw, token, "listed-node", SecretDefault)
	node := env.nodeFor(t, rec.ID, "listed-node")

	var created TokenCreateResponse
	tests := []struct {
		name, method, path, body string
		code                     int
		errWord                  string // for 4xx: a word of the JSON error
		check                    func(t *testing.T, body string)
	}{
		{name: "bad service name", method: "POST", path: "/v1/tokens", body: `{"service":"Bad Name!"}`,
			code: http.StatusBadRequest, errWord: "invalid service"},
		{name: "empty service", method: "POST", path: "/v1/tokens", body: `{}`,
			code: http.StatusBadRequest, errWord: "invalid service"},
		{name: "bad env", method: "POST", path: "/v1/tokens", body: `{"service":"web","env":"-prod"}`,
			code: http.StatusBadRequest, errWord: "invalid environment"},
		{name: "unknown field", method: "POST", path: "/v1/tokens", body: `{"service":"web","color":"blue"}`,
			code: http.StatusBadRequest, errWord: "unknown field"},
		{name: "not JSON", method: "POST", path: "/v1/tokens", body: `service=web`,
			code: http.StatusBadRequest, errWord: "bad request body"},
		{name: "bad ttl", method: "POST", path: "/v1/tokens", body: `{"service":"web","ttl":"-1h"}`,
			code: http.StatusBadRequest, errWord: "invalid ttl"},
		{name: "negative uses", method: "POST", path: "/v1/tokens", body: `{"service":"web","uses":-1}`,
			code: http.StatusBadRequest, errWord: "invalid uses"},
		{name: "good token", method: "POST", path: "/v1/tokens", body: `{"service":"web","env":"prod","ttl":"2h","uses":3}`,
			code: http.StatusCreated, check: func(t *testing.T, body string) {
				if err := json.Unmarshal([]byte(body), &created); err != nil {
					t.Fatalf("decode %s: %v", body, err)
				}
				got, err := env.reg.Authenticate(ctx, bearer(created.Token), env.srv.Roots())
				if err != nil {
					t.Fatalf("the created token does not authenticate: %v", err)
				}
				i := created.Info
				if got.ID != i.ID || i.Service != "web" || i.Env != "prod" || i.MaxUses != 3 || i.Status != "active" ||
					i.ExpiresAt.Sub(i.CreatedAt).Hours() != 2 {
					t.Errorf("created token info %+v (record %+v)", i, got)
				}
				if strings.Contains(body, "secret_hash") {
					t.Errorf("create response includes secret_hash: %s", body)
				}
			}},
		{name: "list tokens", method: "GET", path: "/v1/tokens", code: http.StatusOK, check: func(t *testing.T, body string) {
			var out struct{ Tokens []TokenInfo }
			if err := json.Unmarshal([]byte(body), &out); err != nil {
				t.Fatalf("decode %s: %v", body, err)
			}
			ids := map[string]bool{}
			for _, i := range out.Tokens {
				ids[i.ID] = true
			}
			if !ids[rec.ID] || !ids[created.Info.ID] || len(out.Tokens) != 2 {
				t.Errorf("listed %v, want %s and %s", ids, rec.ID, created.Info.ID)
			}
			if strings.Contains(body, "secret_hash") {
				t.Errorf("token list includes secret_hash: %s", body)
			}
			for _, text := range []string{token, created.Token} {
				if strings.Contains(body, secretOf(t, text)) {
					t.Errorf("token list includes a token secret: %s", body)
				}
			}
		}},
		{name: "revoke unknown token", method: "POST", path: "/v1/tokens/0123456789abcdef/revoke",
			code: http.StatusNotFound, errWord: "no bootstrap token"},
		{name: "revoke malformed ID", method: "POST", path: "/v1/tokens/not-an-id/revoke",
			code: http.StatusBadRequest, errWord: "invalid bootstrap token ID"},
		{name: "revoke", method: "POST", path: "/v1/tokens/" + rec.ID + "/revoke", code: http.StatusOK,
			check: func(t *testing.T, body string) {
				var i TokenInfo
				if err := json.Unmarshal([]byte(body), &i); err != nil {
					t.Fatalf("decode %s: %v", body, err)
				}
				if i.ID != rec.ID || i.Status != bootstrap.ReasonRevoked || i.RevokedAt.IsZero() {
					t.Errorf("revoked token info %+v", i)
				}
				_, err := env.reg.Authenticate(ctx, token, env.srv.Roots())
				if ae, ok := bootstrap.AsAuthError(err); !ok || ae.Reason != bootstrap.ReasonRevoked {
					t.Errorf("revoked token authenticates: %v", err)
				}
			}},
		{name: "list nodes", method: "GET", path: "/v1/nodes", code: http.StatusOK, check: func(t *testing.T, body string) {
			var out struct{ Nodes []Node }
			if err := json.Unmarshal([]byte(body), &out); err != nil {
				t.Fatalf("decode %s: %v", body, err)
			}
			if len(out.Nodes) != 1 {
				t.Fatalf("listed %d nodes, want 1: %s", len(out.Nodes), body)
			}
			n := out.Nodes[0]
			if n.ID != node.ID || n.Service != "frontend" || n.Env != "default" || n.ClaimedID != "listed-node" ||
				n.TokenID != rec.ID || n.Status != NodeActive || n.IssuedSerial == "" {
				t.Errorf("listed node %+v", n)
			}
		}},
		{name: "get node", method: "GET", path: "/v1/nodes/" + node.ID, code: http.StatusOK, check: func(t *testing.T, body string) {
			var n Node
			if err := json.Unmarshal([]byte(body), &n); err != nil {
				t.Fatalf("decode %s: %v", body, err)
			}
			if n.ID != node.ID {
				t.Errorf("got node %+v, want %s", n, node.ID)
			}
		}},
		{name: "get unknown node", method: "GET", path: "/v1/nodes/00000000000000000000", code: http.StatusNotFound, errWord: "not found"},
		{name: "roots", method: "GET", path: "/v1/roots", code: http.StatusOK, check: func(t *testing.T, body string) {
			b, rest := pem.Decode([]byte(body))
			if b == nil || !bytes.Equal(b.Bytes, env.ca.Root().Raw) || len(bytes.TrimSpace(rest)) != 0 {
				t.Errorf("roots: %q, want the CA root alone", body)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body, hdr := adminDo(t, h, tc.method, tc.path, tc.body)
			if code != tc.code {
				t.Fatalf("%s %s: status %d, want %d; body %s", tc.method, tc.path, code, tc.code, body)
			}
			if code >= 400 {
				if ct := hdr.Get("Content-Type"); ct != "application/json" {
					t.Errorf("error Content-Type %q, want application/json", ct)
				}
				var e ErrorResponse
				if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == "" {
					t.Fatalf("error body %q is not a JSON error (%v)", body, err)
				}
				if !strings.Contains(e.Error, tc.errWord) {
					t.Errorf("error %q does not say %q", e.Error, tc.errWord)
				}
			}
			if tc.check != nil {
				tc.check(t, body)
			}
		})
	}
	if logs := env.logs.String(); strings.Contains(logs, secretOf(t, created.Token)) || strings.Contains(logs, secretOf(t, token)) {
		t.Errorf("the log contains a token secret:\n%s", logs)
	}
}
