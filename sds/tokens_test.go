package sds

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/store"
)

// expectRefused sends a request for claimed on a new stream with token and
// checks it is refused with code and a message holding every one of words.
func expectRefused(t *testing.T, env *testEnv, token, claimed string, code codes.Code, words ...string) {
	t.Helper()
	s := env.open(t, sdsSotw, bearer(token))
	defer s.close()
	send(t, s, xdsReq{node: claimed, names: []string{SecretDefault}})
	_, err := s.recv(recvTimeout)
	st, _ := status.FromError(err)
	if st.Code() != code {
		t.Fatalf("node.id %s: %v, want %v", claimed, err, code)
	}
	for _, w := range words {
		if !strings.Contains(st.Message(), w) {
			t.Errorf("node.id %s refused with %q, which does not say %q", claimed, st.Message(), w)
		}
	}
}

// stillOpen checks that s has not ended.
func stillOpen(t *testing.T, name string, s xdsStream) {
	t.Helper()
	if r, err := s.recv(200 * time.Millisecond); !errors.Is(err, errNoReply) {
		t.Errorf("%s: (%v, %v), want it open and quiet", name, r, err)
	}
}

func mustToken(t *testing.T, env *testEnv, id string) bootstrap.Record {
	t.Helper()
	rec, err := env.reg.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("get token %s: %v", id, err)
	}
	return rec
}

// TestNodeRevokeToken: revoking a node also stops its token admitting a
// replacement. A single-use token is revoked with it; a token that can still
// admit several nodes makes the revocation refused (409, nothing revoked)
// unless keep_token (the token keeps admitting) or revoke_token (the token
// is revoked and its other node's streams end) is given; a token that
// admits no new node anyway (expired) is left as it is.
func TestNodeRevokeToken(t *testing.T) {
	tests := []struct {
		name      string
		uses      int
		ttl       time.Duration // of the token; zero: 24 h
		age       time.Duration // clock moved before the revocation
		query     string
		code      int
		word      string // of the answer or the error
		tokStatus string // the token's status afterwards
		// revoked: the node is revoked; othersCut: the token's other node's
		// stream ends; newNode: a new node.id is admitted afterwards.
		revoked, othersCut, newNode bool
	}{
		{name: "single-use, no flag", uses: 1, code: http.StatusOK, word: `"token_revoked":true`,
			tokStatus: bootstrap.ReasonRevoked, revoked: true},
		{name: "single-use, keep-token", uses: 1, query: "?keep_token=true", code: http.StatusOK, word: `"token_revoked":false`,
			tokStatus: bootstrap.ReasonExhausted, revoked: true},
		{name: "three uses, no flag", uses: 3, code: http.StatusConflict, word: "Nothing was revoked",
			tokStatus: "active", newNode: true},
		{name: "unlimited, no flag", uses: 0, code: http.StatusConflict, word: "unlimited uses",
			tokStatus: "active", newNode: true},
		{name: "three uses, keep-token", uses: 3, query: "?keep_token=true", code: http.StatusOK, word: "kept",
			tokStatus: "active", revoked: true, newNode: true},
		{name: "unlimited, revoke-token", uses: 0, query: "?revoke_token=true", code: http.StatusOK, word: `"token_revoked":true`,
			tokStatus: bootstrap.ReasonRevoked, revoked: true, othersCut: true},
		{name: "expired multi-use, no flag", uses: 3, ttl: 30 * time.Minute, age: 31 * time.Minute, code: http.StatusOK,
			word: "admits no new node (expired)", tokStatus: bootstrap.ReasonExpired, revoked: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := newRevokeEnv(t, envOptions{})
			h := env.srv.AdminHandler()
			tok, rec := env.token(t, "frontend", tc.ttl, tc.uses)
			_, target := env.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
			node := env.nodeFor(t, rec.ID, "a-1")
			var other xdsStream
			if tc.uses != 1 {
				_, other = env.fetch(t, adsDelta, tok, "a-2", SecretDefault)
			}
			env.clock.Advance(tc.age)

			code, body, _ := adminDo(t, h, "POST", "/v1/nodes/"+node.ID+"/revoke"+tc.query, `{"reason":"test"}`)
			if code != tc.code || !strings.Contains(body, tc.word) {
				t.Fatalf("revoke: %d %s, want %d and %q", code, body, tc.code, tc.word)
			}
			if code == http.StatusConflict {
				var e ErrorResponse
				if err := json.Unmarshal([]byte(body), &e); err != nil || !strings.Contains(e.Error, rec.ID) ||
					!strings.Contains(e.Error, "--revoke-token") || !strings.Contains(e.Error, "--keep-token") {
					t.Errorf("refusal %s: want a JSON error naming the token and both flags", body)
				}
			}
			if got := mustToken(t, env.testEnv, rec.ID).Status(env.clock.Now()); got != tc.tokStatus {
				t.Errorf("token is %s, want %s", got, tc.tokStatus)
			}
			if n := getNode(t, env.srv, node.ID); (n.Status == NodeRevoked) != tc.revoked {
				t.Errorf("node is %s, want revoked=%v", n.Status, tc.revoked)
			}
			if tc.revoked {
				checkEnded(t, "the node's stream", target, node.ID, "revoked")
			} else {
				stillOpen(t, "the node's stream", target)
			}
			if other != nil {
				if tc.othersCut {
					checkEnded(t, "the token's other node's stream", other, "bootstrap token "+rec.ID+" was revoked")
					if n := env.nodeFor(t, rec.ID, "a-2"); n.Status != NodeActive {
						t.Errorf("the token's other node is %s: revoke_token must not revoke it", n.Status)
					}
				} else {
					stillOpen(t, "the token's other node's stream", other)
				}
			}
			if tc.newNode {
				r, s := env.fetch(t, sdsSotw, tok, "a-new", SecretDefault)
				s.close()
				checkWorkloadSecret(t, env.testEnv, r.secrets[SecretDefault], "frontend", env.nodeFor(t, rec.ID, "a-new").ID)
			} else {
				expectRefused(t, env.testEnv, tok, "a-new", codes.PermissionDenied, rec.ID)
			}
		})
	}
}

// failingStore fails every update of one bucket while fail is set.
type failingStore struct {
	store.Store
	bucket string
	fail   atomic.Bool
}

func (f *failingStore) Update(ctx context.Context, bucket, key string, fn func([]byte) ([]byte, error)) error {
	if bucket == f.bucket && f.fail.Load() {
		return errors.New("disk full (test)")
	}
	return f.Store.Update(ctx, bucket, key, fn)
}

// TestNodeRevokeTokenFails: when the node is revoked but its token cannot
// be, the answer is an error that says both, and the node stays revoked.
func TestNodeRevokeTokenFails(t *testing.T) {
	kv := &failingStore{Store: store.NewMemory(), bucket: bootstrap.Bucket}
	env := newRevokeEnv(t, envOptions{store: kv})
	tok, rec := env.token(t, "frontend", 0, 1)
	_, s := env.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
	node := env.nodeFor(t, rec.ID, "a-1")
	kv.fail.Store(true)
	code, body, _ := adminDo(t, env.srv.AdminHandler(), "POST", "/v1/nodes/"+node.ID+"/revoke", "")
	var e ErrorResponse
	if code != http.StatusInternalServerError || json.Unmarshal([]byte(body), &e) != nil {
		t.Fatalf("revoke with a failing token store: %d %s, want 500 and a JSON error", code, body)
	}
	for _, w := range []string{"node " + node.ID + " is revoked", "token was not revoked", "disk full", "sds-server token revoke " + rec.ID} {
		if !strings.Contains(e.Error, w) {
			t.Errorf("error %q does not say %q", e.Error, w)
		}
	}
	if n := getNode(t, env.srv, node.ID); n.Status != NodeRevoked {
		t.Errorf("node is %s, want revoked", n.Status)
	}
	checkEnded(t, "the node's stream", s, node.ID)
	kv.fail.Store(false)
	if got := mustToken(t, env.testEnv, rec.ID); got.Revoked {
		t.Errorf("token revoked although its update failed")
	}
}

// TestTokenRevokedBeforeBind: a node of a revoked token that becomes live
// again only after the revocation (a stream authenticated before it, or a
// node forgotten while idle) is never issued a certificate.
func TestTokenRevokedBeforeBind(t *testing.T) {
	env := newRevokeEnv(t, envOptions{})
	tok, rec := env.token(t, "frontend", 0, 0)
	_, s := env.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
	node := env.nodeFor(t, rec.ID, "a-1")
	s.close()
	if !eventually(recvTimeout, func() bool { return !env.srv.hasOpenStreams(node.ID) }) {
		t.Fatal("the node's stream did not close")
	}
	env.srv.mu.Lock()
	delete(env.srv.live, node.ID) // as sweepIdle does
	env.srv.mu.Unlock()
	if _, _, err := env.srv.RevokeToken(context.Background(), rec.ID, false); err != nil {
		t.Fatal(err)
	}
	n := getNode(t, env.srv, node.ID)
	ln := env.srv.liveNodeFor(n)
	if !ln.tokenRevoked.Load() {
		t.Fatal("a node of the revoked token made live after the revocation is not marked")
	}
	issued := len(env.iss.issuedTo(node.ID))
	if err := env.srv.ensureCertificate(context.Background(), ln); !errors.Is(err, ErrTokenRevoked) {
		t.Errorf("ensureCertificate: %v, want ErrTokenRevoked", err)
	}
	if got := len(env.iss.issuedTo(node.ID)); got != issued {
		t.Errorf("%d certificates issued after the revocation", got-issued)
	}
}

// TestAwayUntilExpired: a node that comes back after its certificate
// expired is admitted again only if its token still admits a new node, and
// that takes one use of it (one for all the streams of the sidecar);
// otherwise it is refused (node_expired) with a message saying to create a
// new token. A node back before its certificate expired takes no use. The
// rule holds when the server has forgotten the node (as after a restart).
func TestAwayUntilExpired(t *testing.T) {
	tests := []struct {
		name    string
		uses    int
		ttl     time.Duration // of the token; zero: 24 h
		away    time.Duration
		forget  bool // drop the in-memory node, as a restart does
		streams int  // opened at once on return
		// admitted: the node comes back; wantUses: the token's uses after.
		admitted bool
		wantUses int
		words    []string // of the refusal
	}{
		{name: "back before expiry", uses: 1, away: 30 * time.Minute, streams: 1, admitted: true, wantUses: 1},
		{name: "single-use token spent", uses: 1, away: 61 * time.Minute, streams: 1, wantUses: 1,
			words: []string{"away until its certificate expired", "admitted 1 of its 1", "sds-server token create"}},
		{name: "single-use token spent, node forgotten", uses: 1, away: 61 * time.Minute, forget: true, streams: 1, wantUses: 1,
			words: []string{"away until its certificate expired", "sds-server token create"}},
		{name: "token with a use left", uses: 2, away: 61 * time.Minute, streams: 1, admitted: true, wantUses: 2},
		{name: "unlimited token, three streams at once", uses: 0, away: 61 * time.Minute, forget: true, streams: 3, admitted: true, wantUses: 2},
		{name: "token expired", uses: 0, ttl: time.Hour, away: 61 * time.Minute, streams: 1, wantUses: 1,
			words: []string{"away until its certificate expired", "expired at", "sds-server token create"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := newRevokeEnv(t, envOptions{})
			tok, rec := env.token(t, "frontend", tc.ttl, tc.uses)
			r, s := env.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
			first := leaf(t, r.secrets[SecretDefault])
			node := env.nodeFor(t, rec.ID, "a-1")
			s.close()
			if !eventually(recvTimeout, func() bool { return !env.srv.hasOpenStreams(node.ID) }) {
				t.Fatal("the node's stream did not close")
			}
			env.clock.Advance(tc.away)
			if tc.forget {
				if n := env.srv.sweepIdle(0); n != 1 {
					t.Fatalf("sweepIdle forgot %d nodes, want 1", n)
				}
			}
			refusals := metricValue(t, env.metrics.authFailures.WithLabelValues(reasonNodeExpired))

			if !tc.admitted {
				expectRefused(t, env.testEnv, tok, "a-1", codes.PermissionDenied, append(tc.words, node.ID)...)
				if got := metricValue(t, env.metrics.authFailures.WithLabelValues(reasonNodeExpired)); got != refusals+1 {
					t.Errorf("node_expired refusals grew by %v, want 1", got-refusals)
				}
			} else {
				var ss []xdsStream
				for i := range tc.streams {
					s := env.open(t, allVariants[i%len(allVariants)], bearer(tok))
					send(t, s, xdsReq{node: "a-1", names: []string{SecretDefault}})
					ss = append(ss, s)
				}
				for i, s := range ss {
					r := mustRecv(t, s)
					if l := leaf(t, r.secrets[SecretDefault]); l.Subject.CommonName != node.ID {
						t.Errorf("stream %d got a certificate for %s, want node %s", i, l.Subject.CommonName, node.ID)
					} else if tc.away > time.Hour && l.SerialNumber.Cmp(first.SerialNumber) == 0 {
						t.Errorf("stream %d got the expired certificate again", i)
					}
				}
			}
			if got := mustToken(t, env.testEnv, rec.ID).Uses; got != tc.wantUses {
				t.Errorf("token uses %d, want %d", got, tc.wantUses)
			}
			if n := env.nodeFor(t, rec.ID, "a-1"); n.ID != node.ID {
				t.Errorf("node.id a-1 bound to %s, want the same node %s", n.ID, node.ID)
			}
		})
	}
}

// dialAgain opens a second client connection to env's server: another
// peer address, as another process would have.
func dialAgain(t *testing.T, env *testEnv) *testEnv {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(env.ca.Root())
	creds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	conn, err := grpc.NewClient(env.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	other := *env
	other.conn = conn
	return &other
}

// nodeShow is GET /v1/nodes/{id}.
func nodeShow(t *testing.T, env *testEnv, id string) NodeInfo {
	t.Helper()
	code, body, _ := adminDo(t, env.srv.AdminHandler(), "GET", "/v1/nodes/"+id, "")
	var info NodeInfo
	if code != http.StatusOK || json.Unmarshal([]byte(body), &info) != nil {
		t.Fatalf("GET node %s: %d %s", id, code, body)
	}
	return info
}

// TestSharedIdentity: a node's streams from one connection are not
// reported; a stream from a second connection while the first is open is
// (one warning naming the node and both peers, one count in the metric,
// shown by node show) once per new connection; closing it leaves one
// connection.
func TestSharedIdentity(t *testing.T) {
	env := newTestEnv(t)
	tok, rec := env.token(t, "frontend", 0, 1)
	shared := func() float64 { return metricValue(t, env.metrics.sharedIdentity) }

	_, s1 := env.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
	_, s2 := env.fetch(t, adsDelta, tok, "a-1", SecretDefault)
	defer s1.close()
	defer s2.close()
	node := env.nodeFor(t, rec.ID, "a-1")
	info := nodeShow(t, env, node.ID)
	if got := shared(); got != 0 || len(info.Connections) != 1 || info.SharedEvents != 0 || info.Streams != 2 {
		t.Fatalf("one connection, two streams: metric %v, node show %+v", got, info)
	}
	peer1 := info.Connections[0]

	other := dialAgain(t, env)
	_, o1 := other.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
	_, o2 := other.fetch(t, sdsDelta, tok, "a-1", SecretDefault)
	info = nodeShow(t, env, node.ID)
	if got := shared(); got != 1 {
		t.Errorf("sds_node_shared_identity_total %v after a second connection with two streams, want 1", got)
	}
	if len(info.Connections) != 2 || info.SharedEvents != 1 || info.Streams != 4 {
		t.Errorf("node show %+v: want 2 connections, 1 shared event, 4 streams", info)
	}
	peer2 := info.Connections[0]
	if peer2 == peer1 {
		peer2 = info.Connections[1]
	}
	logs := env.logs.String()
	if n := countLines(logs, "served to two connections", "node_id="+node.ID, "peer="+peer2, peer1); n != 1 {
		t.Errorf("%d warnings naming the node and both peers, want 1:\n%s", n, logs)
	}
	if strings.Contains(logs, secretOf(t, tok)) {
		t.Errorf("the log contains the token secret")
	}

	o1.close()
	o2.close()
	if !eventually(recvTimeout, func() bool { return len(nodeShow(t, env, node.ID).Connections) == 1 }) {
		t.Errorf("node show still lists %v after the second connection's streams closed", nodeShow(t, env, node.ID).Connections)
	}
	if info := nodeShow(t, env, node.ID); info.SharedEvents != 1 || info.Connections[0] != peer1 {
		t.Errorf("after the second connection left: %+v", info)
	}
}
