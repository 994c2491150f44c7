package sds

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/store"
)

// ---- test issuer and server ---------------------------------------------------

// crlIssuer is the built-in CA (with bundleIssuer's extra roots) with test
// hooks: it records every certificate issued to each node, can hold
// issuances until the test releases them, and can make SignCRL fail.
type crlIssuer struct {
	*bundleIssuer
	failCRL atomic.Bool

	mu      sync.Mutex
	issued  map[string][]*x509.Certificate // by node ID
	hold    chan struct{}                  // non-nil: Issue waits for it to close
	entered chan string                    // told the node ID of each held issuance
}

func (c *crlIssuer) Issue(ctx context.Context, req issuer.Request) (*issuer.Certificate, error) {
	c.mu.Lock()
	hold, entered := c.hold, c.entered
	c.mu.Unlock()
	if hold != nil {
		select {
		case entered <- req.Identity.NodeID:
		default:
		}
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	cert, err := c.bundleIssuer.Issue(ctx, req)
	if err == nil {
		c.mu.Lock()
		c.issued[req.Identity.NodeID] = append(c.issued[req.Identity.NodeID], cert.Leaf)
		c.mu.Unlock()
	}
	return cert, err
}

func (c *crlIssuer) SignCRL(ctx context.Context, number *big.Int, revoked []issuer.RevokedCertificate, thisUpdate, nextUpdate time.Time) (*issuer.CRL, error) {
	if c.failCRL.Load() {
		return nil, errors.New("CRL signing failed (test)")
	}
	return c.bundleIssuer.CA.SignCRL(ctx, number, revoked, thisUpdate, nextUpdate)
}

// holdIssuance makes every issuance wait until release is called; entered
// receives the node ID of each issuance held.
func (c *crlIssuer) holdIssuance() (entered <-chan string, release func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	hold, ch := make(chan struct{}), make(chan string, 16)
	c.hold, c.entered = hold, ch
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			c.mu.Lock()
			c.hold, c.entered = nil, nil
			c.mu.Unlock()
			close(hold)
		})
	}
}

// issuedTo returns the certificates issued to a node, oldest first.
func (c *crlIssuer) issuedTo(nodeID string) []*x509.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.issued[nodeID])
}

// revokeEnv is a testEnv on a crlIssuer, with a renewal window pinned at
// 90 % of the certificate life (renewals 54 min after issuance) so that
// tests moving the clock know what renews when.
type revokeEnv struct {
	*testEnv
	iss *crlIssuer
}

// newRevokeEnv is newTestEnvWith for the revocation tests: o.wrapIssuer and
// o.renewWindow are set here, and a zero o.crlPeriod means DefaultCRLPeriod
// (not newTestEnv's 24 hours).
func newRevokeEnv(t *testing.T, o envOptions) *revokeEnv {
	t.Helper()
	if o.crlPeriod == 0 {
		o.crlPeriod = DefaultCRLPeriod
	}
	o.renewWindow = RenewWindow{Lo: 0.9, Hi: 0.9}
	var iss *crlIssuer
	o.wrapIssuer = func(bi *bundleIssuer) issuer.Issuer {
		iss = &crlIssuer{bundleIssuer: bi, issued: map[string][]*x509.Certificate{}}
		return iss
	}
	env := newTestEnvWith(t, o)
	return &revokeEnv{testEnv: env, iss: iss}
}

// ---- helpers --------------------------------------------------------------------

// ackReply acknowledges r on s (SotW repeats the names).
func ackReply(t *testing.T, s xdsStream, delta bool, names []string, r *xdsReply) {
	t.Helper()
	req := xdsReq{version: r.version, nonce: r.nonce}
	if !delta {
		req.names = names
	}
	send(t, s, req)
}

// parseCRLPEM decodes a PEM CRL and checks it is signed by the CA's
// intermediate, the CA that issues the leaves.
func parseCRLPEM(t *testing.T, env *testEnv, b []byte) *x509.RevocationList {
	t.Helper()
	blk, rest := pem.Decode(b)
	if blk == nil || blk.Type != "X509 CRL" || strings.TrimSpace(string(rest)) != "" {
		t.Fatalf("not exactly one PEM X509 CRL: %q", b)
	}
	crl, err := x509.ParseRevocationList(blk.Bytes)
	if err != nil {
		t.Fatalf("parse CRL: %v", err)
	}
	if err := crl.CheckSignatureFrom(env.ca.Intermediate()); err != nil {
		t.Errorf("CRL is not signed by the intermediate: %v", err)
	}
	return crl
}

// rootCACRL checks a ROOTCA secret (the CA root, and a CRL checked for
// leaves only) and returns its CRL.
func rootCACRL(t *testing.T, env *testEnv, sec *tlsv3.Secret) *x509.RevocationList {
	t.Helper()
	checkRootCA(t, env, sec)
	vc := sec.GetValidationContext()
	if !vc.GetOnlyVerifyLeafCertCrl() {
		t.Errorf("ROOTCA does not set only_verify_leaf_cert_crl: Envoy would want a CRL for every CA of the chain")
	}
	if vc.GetCrl().GetInlineBytes() == nil {
		t.Fatalf("ROOTCA carries no CRL")
	}
	return parseCRLPEM(t, env, vc.GetCrl().GetInlineBytes())
}

// currentCRL returns the CRL the server publishes now.
func currentCRL(t *testing.T, env *testEnv) *x509.RevocationList {
	t.Helper()
	b := env.srv.rootCA.Load()
	if b == nil || b.crl == nil {
		t.Fatalf("the server publishes no CRL")
	}
	return parseCRLPEM(t, env, b.crl.PEM)
}

// crlSerials returns the serials (hex) a CRL lists.
func crlSerials(crl *x509.RevocationList) []string {
	var out []string
	for _, e := range crl.RevokedCertificateEntries {
		out = append(out, fmt.Sprintf("%x", e.SerialNumber))
	}
	slices.Sort(out)
	return out
}

// serialsOf returns the serials (hex) of certs, sorted.
func serialsOf(certs ...*x509.Certificate) []string {
	out := make([]string, 0, len(certs))
	for _, c := range certs {
		out = append(out, serialHex(c))
	}
	slices.Sort(out)
	return out
}

// awaitCRL receives (and ACKs) responses on s until one carries a ROOTCA
// whose CRL satisfies ok, and returns the CRL and the secret.
func awaitCRL(t *testing.T, env *testEnv, s xdsStream, delta bool, names []string, ok func(*x509.RevocationList) bool) (*x509.RevocationList, *tlsv3.Secret) {
	t.Helper()
	deadline := time.Now().Add(recvTimeout)
	var last []string
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("no ROOTCA with the expected CRL in %s (last CRL listed %v)", recvTimeout, last)
		}
		r, err := s.recv(left)
		if err != nil {
			t.Fatalf("waiting for a ROOTCA with the expected CRL: %v (last CRL listed %v)", err, last)
		}
		ackReply(t, s, delta, names, r)
		sec, has := r.secrets[SecretRootCA]
		if !has {
			continue
		}
		crl := rootCACRL(t, env, sec)
		last = crlSerials(crl)
		if ok(crl) {
			return crl, sec
		}
	}
}

// awaitEnd waits for s to end and returns its status, skipping responses.
func awaitEnd(t *testing.T, s xdsStream) error {
	t.Helper()
	deadline := time.Now().Add(recvTimeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("stream still open after %s", recvTimeout)
		}
		_, err := s.recv(left)
		if errors.Is(err, errNoReply) {
			t.Fatalf("stream still open after %s", recvTimeout)
		}
		if err != nil {
			return err
		}
	}
}

// checkEnded checks that a stream ended with PermissionDenied and a message
// holding every one of words.
func checkEnded(t *testing.T, name string, s xdsStream, words ...string) {
	t.Helper()
	err := awaitEnd(t, s)
	st, _ := status.FromError(err)
	if st.Code() != codes.PermissionDenied {
		t.Errorf("%s ended with %v, want PermissionDenied", name, err)
		return
	}
	for _, w := range words {
		if !strings.Contains(st.Message(), w) {
			t.Errorf("%s ended with %q, which does not say %q", name, st.Message(), w)
		}
	}
}

// liveNodeOf returns the in-memory node id.
func liveNodeOf(t *testing.T, srv *Server, id string) *liveNode {
	t.Helper()
	srv.mu.Lock()
	defer srv.mu.Unlock()
	ln := srv.live[id]
	if ln == nil {
		t.Fatalf("node %s is not live", id)
	}
	return ln
}

// forceRenew issues a new certificate to a node now, as a renewal does.
func forceRenew(t *testing.T, srv *Server, id string) error {
	t.Helper()
	ln := liveNodeOf(t, srv, id)
	ctx, cancel := context.WithTimeout(context.Background(), recvTimeout)
	defer cancel()
	ln.mu.Lock()
	defer ln.mu.Unlock()
	return srv.issueLocked(ctx, ln)
}

// wakeScheduler makes the renewal scheduler look at the (test) clock again:
// it sleeps on a real-time timer that moving the test clock does not cut.
func wakeScheduler(srv *Server) {
	select {
	case srv.sched.wake <- struct{}{}:
	default:
	}
}

// awaitNewDefault receives (and ACKs) responses on s until one carries a
// default certificate other than old, and returns its leaf.
func awaitNewDefault(t *testing.T, s xdsStream, delta bool, names []string, old *x509.Certificate) *x509.Certificate {
	t.Helper()
	deadline := time.Now().Add(recvTimeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("no renewed certificate in %s", recvTimeout)
		}
		r, err := s.recv(left)
		if err != nil {
			t.Fatalf("waiting for a renewed certificate: %v", err)
		}
		ackReply(t, s, delta, names, r)
		if sec, ok := r.secrets[SecretDefault]; ok {
			if l := leaf(t, sec); l.SerialNumber.Cmp(old.SerialNumber) != 0 {
				return l
			}
		}
	}
}

// revokedKeys returns the serials in the store's revocation bucket.
func revokedKeys(t *testing.T, kv store.Store) []string {
	t.Helper()
	var out []string
	if err := kv.List(context.Background(), bucketRevoked, func(k string, _ []byte) error {
		out = append(out, k)
		return nil
	}); err != nil {
		t.Fatalf("list %s: %v", bucketRevoked, err)
	}
	slices.Sort(out)
	return out
}

func getNode(t *testing.T, srv *Server, id string) *Node {
	t.Helper()
	n, err := srv.nodes.get(context.Background(), id)
	if err != nil {
		t.Fatalf("get node %s: %v", id, err)
	}
	return n
}

// ---- tests ------------------------------------------------------------------------

// TestRevokeNode: revoking a node ends its open streams (SotW SDS and delta
// ADS) with PermissionDenied naming it and the reason, refuses its new
// streams, stops its certificates, and puts every unexpired certificate it
// was issued (not the expired one) on the CRL pushed in ROOTCA to the other
// nodes. With keep_token=true the token itself still admits a new node.
func TestRevokeNode(t *testing.T) {
	env := newRevokeEnv(t, envOptions{})
	h := env.srv.AdminHandler()
	tokA, recA := env.token(t, "frontend", 0, 0)
	namesA := []string{SecretDefault, SecretRootCA}

	r, sA := env.fetch(t, sdsSotw, tokA, "a-1", namesA...)
	ackReply(t, sA, false, namesA, r)
	r, dA := env.fetch(t, adsDelta, tokA, "a-1", SecretDefault)
	ackReply(t, dA, true, nil, r)
	nodeA := env.nodeFor(t, recA.ID, "a-1")
	if empty := rootCACRL(t, env.testEnv, mustRecvRootCA(t, env, tokA)); len(empty.RevokedCertificateEntries) != 0 {
		t.Errorf("CRL before any revocation lists %v", crlSerials(empty))
	}

	// Two renewals at +10 min: A1 (expires at +60) is still in the record
	// when A2 and A3 (+70, renewed at +64) are issued.
	env.clock.Advance(10 * time.Minute)
	for range 2 {
		if err := forceRenew(t, env.srv, nodeA.ID); err != nil {
			t.Fatalf("renew: %v", err)
		}
	}
	// A control node whose renewal falls due with A3's, to prove the
	// scheduler runs when A's does not.
	tokC, recC := env.token(t, "control", 0, 0)
	r, sC := env.fetch(t, sdsSotw, tokC, "c-1", SecretDefault)
	ackReply(t, sC, false, []string{SecretDefault}, r)
	c1 := leaf(t, r.secrets[SecretDefault])
	nodeC := env.nodeFor(t, recC.ID, "c-1")

	issuedA := env.iss.issuedTo(nodeA.ID)
	if len(issuedA) != 3 {
		t.Fatalf("node A was issued %d certificates, want 3", len(issuedA))
	}
	a1, a2, a3 := issuedA[0], issuedA[1], issuedA[2]
	if rec := getNode(t, env.srv, nodeA.ID); len(rec.Certs) != 3 {
		t.Fatalf("node record holds %d certificates, want 3: %+v", len(rec.Certs), rec.Certs)
	}

	env.clock.Advance(51 * time.Minute) // +61: A1 expired, A2 and A3 not
	if now := env.clock.Now(); now.Before(a1.NotAfter) || !now.Before(a2.NotAfter) || !now.Before(a3.NotAfter) {
		t.Fatalf("clock %s: A1 ends %s, A2 %s, A3 %s", now, a1.NotAfter, a2.NotAfter, a3.NotAfter)
	}

	// Another node, subscribed to ROOTCA, watches the CRL.
	tokB, _ := env.token(t, "backend", 0, 0)
	namesB := []string{SecretRootCA}
	r, sB := env.fetch(t, sdsSotw, tokB, "b-1", namesB...)
	ackReply(t, sB, false, namesB, r)
	before := rootCACRL(t, env.testEnv, r.secrets[SecretRootCA])

	issued := metricValue(t, env.metrics.certsIssued.WithLabelValues("success"))
	code, body, _ := adminDo(t, h, "POST", "/v1/nodes/"+nodeA.ID+"/revoke?keep_token=true", `{"reason":"key leaked"}`)
	if code != http.StatusOK {
		t.Fatalf("revoke: %d %s", code, body)
	}
	var info NodeInfo
	if err := json.Unmarshal([]byte(body), &info); err != nil {
		t.Fatalf("decode %s: %v", body, err)
	}
	if info.ID != nodeA.ID || info.Status != NodeRevoked || info.RevokeReason != "key leaked" || info.RevokedAt.IsZero() {
		t.Errorf("revoke answered %+v", info)
	}

	// Its open streams end at once, naming the node and the reason.
	checkEnded(t, "SotW SDS stream", sA, nodeA.ID, "revoked", "key leaked")
	checkEnded(t, "delta ADS stream", dA, nodeA.ID, "revoked", "key leaked")

	// The other node gets a CRL listing A2 and A3, not the expired A1.
	crl, _ := awaitCRL(t, env.testEnv, sB, false, namesB, func(c *x509.RevocationList) bool { return len(c.RevokedCertificateEntries) > 0 })
	if got, want := crlSerials(crl), serialsOf(a2, a3); !slices.Equal(got, want) {
		t.Errorf("CRL lists %v, want A2 and A3 %v (A1, expired, is %s)", got, want, serialHex(a1))
	}
	for _, e := range crl.RevokedCertificateEntries {
		if d := e.RevocationTime.Sub(info.RevokedAt); d < -time.Second || d > time.Second {
			t.Errorf("entry %x revoked at %s, the node at %s", e.SerialNumber, e.RevocationTime, info.RevokedAt)
		}
	}
	if crl.Number.Cmp(before.Number) <= 0 {
		t.Errorf("CRL number %v after revocation, %v before: want it to grow", crl.Number, before.Number)
	}
	if !crl.NextUpdate.After(env.clock.Now()) {
		t.Errorf("pushed CRL expired at %s", crl.NextUpdate)
	}
	if got, want := revokedKeys(t, env.kv), serialsOf(a2, a3); !slices.Equal(got, want) {
		t.Errorf("store holds revocations %v, want %v", got, want)
	}

	// No further certificate: not scheduled, refused if asked, and not
	// renewed when its renewal time (+64) passes while the control node
	// (same renewal time) is.
	lnA := liveNodeOf(t, env.srv, nodeA.ID)
	if at, ok := env.srv.sched.scheduled(lnA); ok {
		t.Errorf("revoked node still scheduled for renewal at %s", at)
	}
	if err := forceRenew(t, env.srv, nodeA.ID); !errors.Is(err, ErrNodeRevoked) {
		t.Errorf("issuing to the revoked node: %v, want ErrNodeRevoked", err)
	}
	env.clock.Advance(5 * time.Minute) // +66
	wakeScheduler(env.srv)
	c2 := awaitNewDefault(t, sC, false, []string{SecretDefault}, c1)
	if len(env.iss.issuedTo(nodeC.ID)) != 2 || c2.Subject.CommonName != nodeC.ID {
		t.Errorf("control node renewal: %d certificates", len(env.iss.issuedTo(nodeC.ID)))
	}
	if n := len(env.iss.issuedTo(nodeA.ID)); n != 3 {
		t.Errorf("revoked node was issued %d certificates, want still 3", n)
	}
	if got := metricValue(t, env.metrics.certsIssued.WithLabelValues("success")); got != issued+1 {
		t.Errorf("sds_certificates_issued_total grew by %v since the revocation, want 1 (the control node)", got-issued)
	}
	if rec := getNode(t, env.srv, nodeA.ID); rec.IssuedSerial != serialHex(a3) || rec.Status != NodeRevoked {
		t.Errorf("revoked node record: issued %s, status %s", rec.IssuedSerial, rec.Status)
	}

	// New streams of the node are refused, in every variant.
	refusals := env.metrics.authFailures.WithLabelValues("node_revoked")
	refused := metricValue(t, refusals)
	for _, v := range allVariants {
		s := env.open(t, v, bearer(tokA))
		send(t, s, xdsReq{node: "a-1", names: []string{SecretDefault}})
		_, err := s.recv(recvTimeout)
		if st, _ := status.FromError(err); st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), nodeA.ID) {
			t.Errorf("%s: new stream of the revoked node: %v, want PermissionDenied naming %s", v.name, err, nodeA.ID)
		}
	}
	if got := metricValue(t, refusals); got != refused+float64(len(allVariants)) {
		t.Errorf("node_revoked refusals grew by %v, want %d", got-refused, len(allVariants))
	}

	// The token was kept: a new node.id is a new node.
	r, _ = env.fetch(t, sdsSotw, tokA, "a-2", SecretDefault)
	nodeA2 := env.nodeFor(t, recA.ID, "a-2")
	if nodeA2.ID == nodeA.ID || nodeA2.Status != NodeActive {
		t.Errorf("new node.id bound to %+v", nodeA2)
	}
	checkWorkloadSecret(t, env.testEnv, r.secrets[SecretDefault], "frontend", nodeA2.ID)
}

// mustRecvRootCA returns the ROOTCA a new stream of a throwaway node gets.
func mustRecvRootCA(t *testing.T, env *revokeEnv, token string) *tlsv3.Secret {
	t.Helper()
	r, s := env.fetch(t, sdsSotw, token, fmt.Sprintf("probe-%d", time.Now().UnixNano()), SecretRootCA)
	s.close()
	sec, ok := r.secrets[SecretRootCA]
	if !ok {
		t.Fatalf("no ROOTCA in %v", r.names)
	}
	return sec
}

// TestRevokeNodeTwiceAndErrors: revoking again changes nothing; the admin API
// answers 404 for an unknown node and 400 for a bad body.
func TestRevokeNodeTwiceAndErrors(t *testing.T) {
	env := newRevokeEnv(t, envOptions{})
	h := env.srv.AdminHandler()
	ctx := context.Background()
	tok, rec := env.token(t, "frontend", 0, 0)
	for _, claimed := range []string{"n-1", "n-2"} {
		_, s := env.fetch(t, sdsSotw, tok, claimed, SecretDefault)
		s.close()
	}
	n1 := env.nodeFor(t, rec.ID, "n-1")
	n2 := env.nodeFor(t, rec.ID, "n-2")

	first, err := env.srv.RevokeNode(ctx, n1.ID, "first")
	if err != nil {
		t.Fatalf("revoke: %v", err)
	}
	number := currentCRL(t, env.testEnv).Number
	env.clock.Advance(time.Minute)
	again, err := env.srv.RevokeNode(ctx, n1.ID, "second")
	if err != nil {
		t.Fatalf("revoke again: %v", err)
	}
	if !again.RevokedAt.Equal(first.RevokedAt) || again.RevokeReason != "first" || again.Status != NodeRevoked {
		t.Errorf("revoked again: %+v, first %+v", again, first)
	}
	if got := currentCRL(t, env.testEnv); got.Number.Cmp(number) != 0 {
		t.Errorf("revoking again re-signed the CRL (number %v, was %v)", got.Number, number)
	}

	tests := []struct {
		name, path, body string
		code             int
		word             string // of the error, or of the answer
	}{
		{"again through the API", "/v1/nodes/" + n1.ID + "/revoke?keep_token=true", `{"reason":"third"}`, http.StatusOK, `"revoke_reason":"first"`},
		{"unknown node", "/v1/nodes/00000000000000000000/revoke", "", http.StatusNotFound, "not found"},
		{"not JSON", "/v1/nodes/" + n2.ID + "/revoke?keep_token=true", `reason=x`, http.StatusBadRequest, "bad request body"},
		{"unknown field", "/v1/nodes/" + n2.ID + "/revoke?keep_token=true", `{"why":"x"}`, http.StatusBadRequest, "unknown field"},
		{"reason too long", "/v1/nodes/" + n2.ID + "/revoke?keep_token=true", `{"reason":"` + strings.Repeat("x", 300) + `"}`, http.StatusBadRequest, "256"},
		{"bad keep_token", "/v1/nodes/" + n2.ID + "/revoke?keep_token=yes", "", http.StatusBadRequest, "keep_token"},
		{"bad revoke_token", "/v1/nodes/" + n2.ID + "/revoke?revoke_token=2", "", http.StatusBadRequest, "revoke_token"},
		{"both token flags", "/v1/nodes/" + n2.ID + "/revoke?keep_token=true&revoke_token=true", "", http.StatusBadRequest, "exclude each other"},
		{"multi-use token without a choice", "/v1/nodes/" + n2.ID + "/revoke", "", http.StatusConflict, "Nothing was revoked"},
		{"no body", "/v1/nodes/" + n2.ID + "/revoke?keep_token=true", "", http.StatusOK, `"status":"revoked"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body, _ := adminDo(t, h, "POST", tc.path, tc.body)
			if code != tc.code || !strings.Contains(body, tc.word) {
				t.Errorf("POST %s: %d %s, want %d and %q", tc.path, code, body, tc.code, tc.word)
			}
		})
	}
	if n := getNode(t, env.srv, n1.ID); !n.RevokedAt.Equal(first.RevokedAt) || n.RevokeReason != "first" {
		t.Errorf("stored record changed by later revocations: %+v", n)
	}
	// Refused bodies revoked nothing before the valid request.
	if n := getNode(t, env.srv, n2.ID); n.Status != NodeRevoked || n.RevokeReason != "" {
		t.Errorf("n-2 record %+v", n)
	}
}

// TestRevocationSurvivesRestart: a new server on the same bbolt store and CA
// still refuses the node and publishes, at start, a CRL listing its
// certificates with a higher number.
func TestRevocationSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	caDir, dbPath := filepath.Join(dir, "ca"), filepath.Join(dir, "sds.db")
	clock := &testClock{}
	kv1, err := store.OpenBolt(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kv1.Close() })
	env1 := newRevokeEnv(t, envOptions{store: kv1, caDir: caDir, clock: clock})
	tok, rec := env1.token(t, "frontend", 0, 0)
	_, s := env1.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
	node := env1.nodeFor(t, rec.ID, "a-1")
	if err := forceRenew(t, env1.srv, node.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := env1.srv.RevokeNode(context.Background(), node.ID, "restart test"); err != nil {
		t.Fatal(err)
	}
	checkEnded(t, "stream", s, node.ID)
	want := serialsOf(env1.iss.issuedTo(node.ID)...)
	crl1 := currentCRL(t, env1.testEnv)
	if got := crlSerials(crl1); len(want) != 2 || !slices.Equal(got, want) {
		t.Fatalf("CRL lists %v, want %v", got, want)
	}
	env1.stop()
	if err := kv1.Close(); err != nil {
		t.Fatal(err)
	}

	kv2, err := store.OpenBolt(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kv2.Close() })
	env2 := newRevokeEnv(t, envOptions{store: kv2, caDir: caDir, clock: clock})
	if !env2.ca.Intermediate().Equal(env1.ca.Intermediate()) {
		t.Fatal("the second server did not load the same CA")
	}
	crl2 := currentCRL(t, env2.testEnv)
	if got := crlSerials(crl2); !slices.Equal(got, want) {
		t.Errorf("CRL after restart lists %v, want %v", got, want)
	}
	if crl2.Number.Cmp(crl1.Number) <= 0 {
		t.Errorf("CRL number %v after restart, %v before: want it to grow", crl2.Number, crl1.Number)
	}
	// Pushed as such to a node connecting now.
	tokB, _ := env2.token(t, "backend", 0, 0)
	if got := crlSerials(rootCACRL(t, env2.testEnv, mustRecvRootCA(t, env2, tokB))); !slices.Equal(got, want) {
		t.Errorf("ROOTCA after restart lists %v, want %v", got, want)
	}
	for _, v := range []variant{sdsSotw, adsDelta} {
		s := env2.open(t, v, bearer(tok))
		send(t, s, xdsReq{node: "a-1", names: []string{SecretDefault}})
		if _, err := s.recv(recvTimeout); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), node.ID) {
			t.Errorf("%s: revoked node after restart: %v, want PermissionDenied", v.name, err)
		}
	}
	if n := len(env2.iss.issuedTo(node.ID)); n != 0 {
		t.Errorf("the restarted server issued %d certificates to the revoked node", n)
	}
}

// TestRevokeToken: revoking a token (without revoke_nodes) refuses its new
// streams, ends the open streams of every node it admitted at once with
// PermissionDenied naming the token, and no certificate is issued to those
// nodes afterwards (a node of another token renews meanwhile); their
// records stay active. revoke_nodes=true then revokes them and lists them,
// and their certificates go on the CRL.
func TestRevokeToken(t *testing.T) {
	env := newRevokeEnv(t, envOptions{})
	h := env.srv.AdminHandler()
	tok, rec := env.token(t, "frontend", 0, 0)
	tokO, recO := env.token(t, "backend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}

	rA, sA := env.fetch(t, sdsSotw, tok, "a-1", names...)
	ackReply(t, sA, false, names, rA)
	rB, sB := env.fetch(t, adsDelta, tok, "b-1", SecretDefault)
	ackReply(t, sB, true, nil, rB)
	rO, sO := env.fetch(t, sdsSotw, tokO, "o-1", names...)
	ackReply(t, sO, false, names, rO)
	nodeA, nodeB := env.nodeFor(t, rec.ID, "a-1"), env.nodeFor(t, rec.ID, "b-1")
	nodeO := env.nodeFor(t, recO.ID, "o-1")
	issuedA, issuedB := len(env.iss.issuedTo(nodeA.ID)), len(env.iss.issuedTo(nodeB.ID))

	code, body, _ := adminDo(t, h, "POST", "/v1/tokens/"+rec.ID+"/revoke", "")
	var out TokenRevokeResponse
	if code != http.StatusOK || json.Unmarshal([]byte(body), &out) != nil || out.Status != bootstrap.ReasonRevoked || len(out.RevokedNodes) != 0 {
		t.Fatalf("revoke token: %d %s", code, body)
	}

	// Open streams end at once, naming the token.
	checkEnded(t, "node A stream", sA, "bootstrap token "+rec.ID+" was revoked")
	checkEnded(t, "node B stream", sB, "bootstrap token "+rec.ID+" was revoked")
	for _, id := range []string{nodeA.ID, nodeB.ID} {
		if at, ok := env.srv.sched.scheduled(liveNodeOf(t, env.srv, id)); ok {
			t.Errorf("node %s of the revoked token still scheduled for renewal at %s", id, at)
		}
		if err := forceRenew(t, env.srv, id); !errors.Is(err, ErrTokenRevoked) {
			t.Errorf("issuing to node %s of the revoked token: %v, want ErrTokenRevoked", id, err)
		}
	}

	// No renewal after the revocation (+55 min: past the renewal at 54),
	// while the other token's node renews.
	env.clock.Advance(55 * time.Minute)
	wakeScheduler(env.srv)
	awaitNewDefault(t, sO, false, names, leaf(t, rO.secrets[SecretDefault]))
	if a, b := len(env.iss.issuedTo(nodeA.ID)), len(env.iss.issuedTo(nodeB.ID)); a != issuedA || b != issuedB {
		t.Errorf("after the token's revocation nodes A and B were issued %d and %d more certificates, want none", a-issuedA, b-issuedB)
	}
	for _, id := range []string{nodeA.ID, nodeB.ID} {
		if n := getNode(t, env.srv, id); n.Status != NodeActive {
			t.Errorf("node %s is %s after its token was revoked without revoke_nodes", id, n.Status)
		}
	}

	// New streams with the token are refused, for a known node.id too.
	for _, claimed := range []string{"a-1", "c-1"} {
		s := env.open(t, sdsSotw, bearer(tok))
		send(t, s, xdsReq{node: claimed, names: []string{SecretDefault}})
		if _, err := s.recv(recvTimeout); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("new stream (node.id %s) with the revoked token: %v, want PermissionDenied", claimed, err)
		}
	}
	if a, b := len(env.iss.issuedTo(nodeA.ID)), len(env.iss.issuedTo(nodeB.ID)); a != issuedA || b != issuedB {
		t.Errorf("reconnections after the token's revocation issued %d and %d certificates, want none", a-issuedA, b-issuedB)
	}

	// revoke_nodes=true revokes what it admitted, and says which.
	code, body, _ = adminDo(t, h, "POST", "/v1/tokens/"+rec.ID+"/revoke?revoke_nodes=true", "")
	out = TokenRevokeResponse{}
	if code != http.StatusOK || json.Unmarshal([]byte(body), &out) != nil {
		t.Fatalf("revoke token with nodes: %d %s", code, body)
	}
	if got, want := sortedCopy(out.RevokedNodes), sortedCopy([]string{nodeA.ID, nodeB.ID}); !slices.Equal(got, want) {
		t.Errorf("revoked nodes %v, want %v", got, want)
	}
	want := serialsOf(append(env.iss.issuedTo(nodeA.ID), env.iss.issuedTo(nodeB.ID)...)...)
	crl, _ := awaitCRL(t, env.testEnv, sO, false, names, func(c *x509.RevocationList) bool { return len(c.RevokedCertificateEntries) == len(want) })
	if got := crlSerials(crl); len(want) != 2 || !slices.Equal(got, want) {
		t.Errorf("CRL lists %v, want the certificates of A and B %v", got, want)
	}
	if n := getNode(t, env.srv, nodeO.ID); n.Status != NodeActive {
		t.Errorf("node of another token is %s", n.Status)
	}
	// Revoking again with nodes lists none: they are revoked already.
	code, body, _ = adminDo(t, h, "POST", "/v1/tokens/"+rec.ID+"/revoke?revoke_nodes=true", "")
	out = TokenRevokeResponse{}
	if code != http.StatusOK || json.Unmarshal([]byte(body), &out) != nil || len(out.RevokedNodes) != 0 {
		t.Errorf("revoke token with nodes again: %d %s", code, body)
	}
	if code, body, _ := adminDo(t, h, "POST", "/v1/tokens/"+rec.ID+"/revoke?revoke_nodes=maybe", ""); code != http.StatusBadRequest || !strings.Contains(body, "revoke_nodes") {
		t.Errorf("revoke_nodes=maybe: %d %s, want 400 naming the parameter", code, body)
	}
}

// TestCRLFreshness: with a 4 s CRL period (real clock; re-signed every 2 s),
// during 6 s every ROOTCA a stream receives carries a CRL valid past its
// arrival, each arrives while the one before is still valid (a sidecar never
// holds an expired list), fresh lists keep coming, and Ready stays nil.
//
// The period leaves room for the CRL's whole-second times: a list signed at
// S says NextUpdate > S+3 s, and the next one is signed by S+2.5 s.
func TestCRLFreshness(t *testing.T) {
	t.Parallel()
	const period, run = 4 * time.Second, 6 * time.Second
	env := newRevokeEnv(t, envOptions{crlPeriod: period})
	tok, rec := env.token(t, "frontend", 0, 0)
	_, s := env.fetch(t, sdsSotw, tok, "revoked", SecretDefault)
	node := env.nodeFor(t, rec.ID, "revoked")
	if _, err := env.srv.RevokeNode(context.Background(), node.ID, ""); err != nil {
		t.Fatal(err)
	}
	checkEnded(t, "revoked stream", s, node.ID)
	want := serialsOf(env.iss.issuedTo(node.ID)...)

	type watcher struct {
		v       variant
		s       xdsStream
		held    *x509.RevocationList // the last list received
		numbers map[string]bool
	}
	names := []string{SecretDefault, SecretRootCA}
	var ws []*watcher
	for _, v := range []variant{sdsSotw, adsDelta} {
		tokW, _ := env.token(t, "watcher", 0, 0)
		w := &watcher{v: v, s: env.open(t, v, bearer(tokW)), numbers: map[string]bool{}}
		send(t, w.s, xdsReq{node: "w-" + v.name, names: names})
		ws = append(ws, w)
	}
	if err := env.srv.Ready(context.Background()); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	end := time.Now().Add(run)
	for time.Now().Before(end) {
		for _, w := range ws {
			r, err := w.s.recv(50 * time.Millisecond)
			if errors.Is(err, errNoReply) {
				continue
			}
			if err != nil {
				t.Fatalf("%s: %v", w.v.name, err)
			}
			arrived := time.Now()
			ackReply(t, w.s, w.v.delta, names, r)
			sec, ok := r.secrets[SecretRootCA]
			if !ok {
				continue
			}
			crl := rootCACRL(t, env.testEnv, sec)
			if !crl.NextUpdate.After(arrived) {
				t.Errorf("%s: CRL %v arrived at %s, expired at %s", w.v.name, crl.Number, arrived.Format(time.RFC3339Nano), crl.NextUpdate)
			}
			if crl.ThisUpdate.After(arrived) {
				t.Errorf("%s: CRL %v not valid before %s", w.v.name, crl.Number, crl.ThisUpdate)
			}
			if w.held != nil && !w.held.NextUpdate.After(arrived) {
				t.Errorf("%s: CRL %v arrived at %s, after the one before (%v) expired at %s", w.v.name, crl.Number,
					arrived.Format(time.RFC3339Nano), w.held.Number, w.held.NextUpdate)
			}
			if w.held != nil && crl.Number.Cmp(w.held.Number) < 0 {
				t.Errorf("%s: CRL number went back from %v to %v", w.v.name, w.held.Number, crl.Number)
			}
			if got := crlSerials(crl); !slices.Equal(got, want) {
				t.Errorf("%s: CRL %v lists %v, want %v", w.v.name, crl.Number, got, want)
			}
			w.held = crl
			w.numbers[crl.Number.String()] = true
		}
		if err := env.srv.Ready(context.Background()); err != nil {
			t.Errorf("Ready during the run: %v", err)
		}
	}
	for _, w := range ws {
		// The first list and at least two re-signings.
		if len(w.numbers) < 3 {
			t.Errorf("%s received %d distinct CRLs in %s with a %s period, want at least 3", w.v.name, len(w.numbers), run, period)
		}
	}
}

// TestCRLRetriedAfterFailure: a revocation whose CRL could not be signed is
// published by the CRL loop's next tick (every period/8), not half a period
// after the last good list.
func TestCRLRetriedAfterFailure(t *testing.T) {
	t.Parallel()
	env := newRevokeEnv(t, envOptions{crlPeriod: 16 * time.Second}) // ticks every 2 s, re-signs after 8 s
	tok, rec := env.token(t, "frontend", 0, 0)
	_, s := env.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
	node := env.nodeFor(t, rec.ID, "a-1")

	env.iss.failCRL.Store(true)
	n, err := env.srv.RevokeNode(context.Background(), node.ID, "")
	if err == nil || n == nil || n.Status != NodeRevoked {
		t.Fatalf("revoke with CRL signing failing: (%+v, %v), want the node revoked and an error", n, err)
	}
	checkEnded(t, "stream", s, node.ID)
	env.iss.failCRL.Store(false)
	want := serialsOf(env.iss.issuedTo(node.ID)...)
	if !eventually(5*time.Second, func() bool { return slices.Equal(crlSerials(currentCRL(t, env.testEnv)), want) }) {
		t.Errorf("CRL still lists %v 5 s after signing recovered, want %v", crlSerials(currentCRL(t, env.testEnv)), want)
	}
}

// TestRevokedEntriesExpire: an entry drops off the CRL, and out of the
// store, once the certificate it names has expired; the node stays revoked.
func TestRevokedEntriesExpire(t *testing.T) {
	env := newRevokeEnv(t, envOptions{})
	ctx := context.Background()
	tok, rec := env.token(t, "frontend", 0, 0)
	_, s := env.fetch(t, sdsSotw, tok, "a-1", SecretDefault)
	node := env.nodeFor(t, rec.ID, "a-1")
	env.clock.Advance(30 * time.Minute)
	if err := forceRenew(t, env.srv, node.ID); err != nil {
		t.Fatal(err)
	}
	certs := env.iss.issuedTo(node.ID)
	if len(certs) != 2 {
		t.Fatalf("%d certificates, want 2", len(certs))
	}
	a1, a2 := certs[0], certs[1] // expire at +60 and +90
	if _, err := env.srv.RevokeNode(ctx, node.ID, ""); err != nil {
		t.Fatal(err)
	}
	checkEnded(t, "stream", s, node.ID)
	if got, want := crlSerials(currentCRL(t, env.testEnv)), serialsOf(a1, a2); !slices.Equal(got, want) {
		t.Fatalf("CRL lists %v, want %v", got, want)
	}

	steps := []struct {
		name    string
		advance time.Duration
		want    []string
	}{
		{"first expired", 35 * time.Minute, serialsOf(a2)}, // +65
		{"both expired", 30 * time.Minute, nil},            // +95
	}
	for _, st := range steps {
		env.clock.Advance(st.advance)
		if err := env.srv.refreshCRL(ctx); err != nil {
			t.Fatalf("%s: refreshCRL: %v", st.name, err)
		}
		crl := currentCRL(t, env.testEnv)
		if got := crlSerials(crl); !slices.Equal(got, st.want) {
			t.Errorf("%s: CRL lists %v, want %v", st.name, got, st.want)
		}
		if !crl.NextUpdate.After(env.clock.Now()) {
			t.Errorf("%s: CRL expired at %s", st.name, crl.NextUpdate)
		}
		if got := revokedKeys(t, env.kv); !slices.Equal(got, st.want) {
			t.Errorf("%s: store holds revocations %v, want %v", st.name, got, st.want)
		}
	}
	if n := getNode(t, env.srv, node.ID); n.Status != NodeRevoked {
		t.Errorf("node is %s once its certificates expired, want still revoked", n.Status)
	}
	s2 := env.open(t, sdsSotw, bearer(tok))
	send(t, s2, xdsReq{node: "a-1", names: []string{SecretDefault}})
	if _, err := s2.recv(recvTimeout); status.Code(err) != codes.PermissionDenied {
		t.Errorf("revoked node with no certificate left on the CRL: %v, want PermissionDenied", err)
	}
}

// TestRevokeDuringRenewal: a renewal in flight when the node is revoked must
// not hand the node a certificate missing from the CRL.
func TestRevokeDuringRenewal(t *testing.T) {
	env := newRevokeEnv(t, envOptions{})
	ctx := context.Background()
	tok, rec := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}
	r, s := env.fetch(t, sdsSotw, tok, "a-1", names...)
	ackReply(t, s, false, names, r)
	node := env.nodeFor(t, rec.ID, "a-1")

	entered, release := env.iss.holdIssuance()
	defer release()
	env.clock.Advance(55 * time.Minute) // past the renewal at 54
	wakeScheduler(env.srv)
	select {
	case <-entered:
	case <-time.After(recvTimeout):
		t.Fatal("the renewal did not start")
	}
	revoked := make(chan error, 1)
	go func() {
		_, err := env.srv.RevokeNode(ctx, node.ID, "during renewal")
		revoked <- err
	}()
	if !eventually(recvTimeout, func() bool { return getNode(t, env.srv, node.ID).Status == NodeRevoked }) {
		t.Fatal("node not marked revoked")
	}
	release() // the CA answers the renewal now
	select {
	case err := <-revoked:
		if err != nil {
			t.Fatalf("RevokeNode: %v", err)
		}
	case <-time.After(recvTimeout):
		t.Fatal("RevokeNode did not return")
	}

	listed := currentCRL(t, env.testEnv)
	onCRL := func(c *x509.Certificate) bool { return slices.Contains(crlSerials(listed), serialHex(c)) }
	// Whatever the node holds, or was sent, is on the list.
	for cs := liveNodeOf(t, env.srv, node.ID).cur.Load(); cs != nil; cs = cs.prev {
		if !onCRL(cs.cert.Leaf) {
			t.Errorf("certificate %s, published to the revoked node, is not on the CRL %v", cs.serial, crlSerials(listed))
		}
	}
	for {
		r, err := s.recv(recvTimeout)
		if err != nil {
			if status.Code(err) != codes.PermissionDenied {
				t.Errorf("stream ended with %v, want PermissionDenied", err)
			}
			break
		}
		if sec, ok := r.secrets[SecretDefault]; ok && !onCRL(leaf(t, sec)) {
			t.Errorf("stream received certificate %s, not on the CRL %v", serialHex(leaf(t, sec)), crlSerials(listed))
		}
	}
	if got := getNode(t, env.srv, node.ID); len(got.Certs) != len(crlSerials(listed)) {
		t.Errorf("node record holds %d certificates, the CRL lists %d", len(got.Certs), len(crlSerials(listed)))
	}
}

// ---- a TLS handshake checked the way Envoy checks it ---------------------------

// opensslHandshake serves cert on loopback and has openssl s_client connect
// with the ROOTCA's trusted CA and CRL, checking the leaf against the CRL
// (what only_verify_leaf_cert_crl does in Envoy). It returns the client's
// output and whether the handshake verified.
func opensslHandshake(t *testing.T, dir string, cert tls.Certificate, caFile, crlFile string) (string, error) {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "openssl", "s_client", "-connect", lis.Addr().String(), "-servername", "localhost",
		"-CAfile", caFile, "-CRL", crlFile, "-crl_check", "-verify_return_error", "-brief")
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader("")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestRevocationHandshake: the ROOTCA of a server with no revocation (an
// empty CRL) lets a workload certificate through a CRL-checking handshake;
// once its node is revoked the new ROOTCA refuses it and still admits
// another node's.
func TestRevocationHandshake(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl is not on PATH")
	}
	env := newRevokeEnv(t, envOptions{})
	dir := t.TempDir()
	names := []string{SecretDefault, SecretRootCA}
	certOf := func(sec *tlsv3.Secret) tls.Certificate {
		tc := sec.GetTlsCertificate()
		c, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	writeRootCA := func(sec *tlsv3.Secret, ca, crl string) {
		vc := sec.GetValidationContext()
		if err := os.WriteFile(filepath.Join(dir, ca), vc.GetTrustedCa().GetInlineBytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, crl), vc.GetCrl().GetInlineBytes(), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	tokA, recA := env.token(t, "frontend", 0, 0)
	rA, sA := env.fetch(t, sdsSotw, tokA, "a-1", names...)
	tokB, _ := env.token(t, "backend", 0, 0)
	rB, sB := env.fetch(t, sdsSotw, tokB, "b-1", names...)
	ackReply(t, sB, false, names, rB)
	if crl := rootCACRL(t, env.testEnv, rA.secrets[SecretRootCA]); len(crl.RevokedCertificateEntries) != 0 {
		t.Fatalf("CRL before any revocation lists %v", crlSerials(crl))
	}
	writeRootCA(rA.secrets[SecretRootCA], "ca.pem", "empty.pem")
	certA, certB := certOf(rA.secrets[SecretDefault]), certOf(rB.secrets[SecretDefault])
	for name, c := range map[string]tls.Certificate{"A": certA, "B": certB} {
		if out, err := opensslHandshake(t, dir, c, "ca.pem", "empty.pem"); err != nil {
			t.Errorf("node %s with the empty CRL: handshake failed: %v\n%s", name, err, out)
		}
	}

	nodeA := env.nodeFor(t, recA.ID, "a-1")
	if _, err := env.srv.RevokeNode(context.Background(), nodeA.ID, ""); err != nil {
		t.Fatal(err)
	}
	checkEnded(t, "node A stream", sA, nodeA.ID)
	_, sec := awaitCRL(t, env.testEnv, sB, false, names, func(c *x509.RevocationList) bool {
		return len(c.RevokedCertificateEntries) > 0
	})
	writeRootCA(sec, "ca2.pem", "revoked.pem")
	out, err := opensslHandshake(t, dir, certA, "ca2.pem", "revoked.pem")
	if err == nil || !strings.Contains(out, "certificate revoked") {
		t.Errorf("revoked node A: handshake %v, want it refused as revoked\n%s", err, out)
	}
	if out, err := opensslHandshake(t, dir, certB, "ca2.pem", "revoked.pem"); err != nil {
		t.Errorf("node B with the CRL listing A: handshake failed: %v\n%s", err, out)
	}
}

// ---- a CA that keeps its own list (issuer.Revoker) ---------------------------

// revokerIssuer is a CA like step-ca: it is not a CRLSigner, it records
// revocations (Revoke) and serves its own list (CRL), here signed by the
// built-in CA's intermediate. Tests can make Revoke fail for some serials
// and have CRL return an expired list.
type revokerIssuer struct {
	b     *bundleIssuer
	clock *testClock

	mu         sync.Mutex
	revoked    map[string]string // serial (hex) -> reason
	calls      []string          // serials (hex) Revoke was called with
	failSerial map[string]bool
	validity   time.Duration // of each list; default 1h
	expired    bool          // CRL returns a list whose NextUpdate is past
	crlCalls   int
}

var _ issuer.Revoker = (*revokerIssuer)(nil)

func (r *revokerIssuer) Issue(ctx context.Context, req issuer.Request) (*issuer.Certificate, error) {
	return r.b.Issue(ctx, req)
}

func (r *revokerIssuer) Roots(ctx context.Context) ([]*x509.Certificate, error) {
	return r.b.Roots(ctx)
}

func (r *revokerIssuer) Revoke(_ context.Context, serial *big.Int, reason string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	sn := fmt.Sprintf("%x", serial)
	r.calls = append(r.calls, sn)
	if r.failSerial[sn] {
		return fmt.Errorf("CA unavailable for %s (test)", sn)
	}
	r.revoked[sn] = reason
	return nil
}

func (r *revokerIssuer) CRL(ctx context.Context) (*issuer.CRL, error) {
	r.mu.Lock()
	r.crlCalls++
	validity := cmp.Or(r.validity, time.Hour)
	expired := r.expired
	var entries []issuer.RevokedCertificate
	for sn := range r.revoked {
		n, _ := new(big.Int).SetString(sn, 16)
		entries = append(entries, issuer.RevokedCertificate{SerialNumber: n, RevokedAt: r.clock.Now()})
	}
	r.mu.Unlock()
	now := r.clock.Now().Truncate(time.Second)
	this := now.Add(-time.Minute)
	if expired {
		this = now.Add(-validity - time.Minute)
	}
	return r.b.CA.SignCRL(ctx, big.NewInt(int64(r.crlCalls)), entries, this, this.Add(validity))
}

func (r *revokerIssuer) set(f func(*revokerIssuer)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r)
}

func newRevokerEnv(t *testing.T) (*testEnv, *revokerIssuer) {
	t.Helper()
	clock := &testClock{}
	var rv *revokerIssuer
	env := newTestEnvWith(t, envOptions{clock: clock, crlPeriod: DefaultCRLPeriod, wrapIssuer: func(b *bundleIssuer) issuer.Issuer {
		rv = &revokerIssuer{b: b, clock: clock, revoked: map[string]string{}, failSerial: map[string]bool{}}
		return rv
	}})
	return env, rv
}

// TestRevokerIssuer: with a CA that keeps its own list, RevokeNode revokes
// every unexpired certificate of the node at the CA, and ROOTCA carries the
// CA's list with them; a failure at the CA is reported, naming the serial,
// but the node is revoked all the same; an expired list from the CA never
// reaches a sidecar (the last good one stays) and makes the server not
// ready as that one nears its end.
func TestRevokerIssuer(t *testing.T) {
	env, rv := newRevokerEnv(t)
	ctx := context.Background()
	if b := env.srv.rootCA.Load(); b.crl == nil {
		t.Fatal("ROOTCA carries no CRL at start: the CA's list was not published")
	}

	tok, rec := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}
	r, s := env.fetch(t, sdsSotw, tok, "a-1", names...)
	ackReply(t, s, false, names, r)
	node := env.nodeFor(t, rec.ID, "a-1")
	for range 2 {
		if err := forceRenew(t, env.srv, node.ID); err != nil {
			t.Fatalf("renew: %v", err)
		}
	}
	certs := getNode(t, env.srv, node.ID).Certs
	if len(certs) != 3 {
		t.Fatalf("node holds %d certificates, want 3", len(certs))
	}
	var want []string
	for _, c := range certs {
		want = append(want, c.Serial)
	}
	slices.Sort(want)

	// Watcher of ROOTCA.
	tokB, _ := env.token(t, "backend", 0, 0)
	r, sB := env.fetch(t, sdsSotw, tokB, "b-1", SecretRootCA)
	ackReply(t, sB, false, []string{SecretRootCA}, r)

	rv.set(func(r *revokerIssuer) { r.failSerial[certs[1].Serial] = true })
	n, err := env.srv.RevokeNode(ctx, node.ID, "key leaked")
	if n == nil || n.Status != NodeRevoked {
		t.Fatalf("RevokeNode: %+v, %v; want the node revoked", n, err)
	}
	if err == nil || !strings.Contains(err.Error(), certs[1].Serial) || !strings.Contains(err.Error(), "did not revoke") {
		t.Errorf("RevokeNode error %v, want one naming serial %s the CA did not revoke", err, certs[1].Serial)
	}
	rv.mu.Lock()
	calls := slices.Sorted(slices.Values(rv.calls))
	reason := rv.revoked[certs[0].Serial]
	rv.mu.Unlock()
	if !slices.Equal(calls, want) {
		t.Errorf("Revoke called for %v, want every unexpired certificate %v", calls, want)
	}
	if reason != "key leaked" {
		t.Errorf("Revoke reason %q", reason)
	}
	if got := getNode(t, env.srv, node.ID); got.Status != NodeRevoked {
		t.Errorf("node status %s after a CA failure, want revoked", got.Status)
	}
	// The deny list holds all three, the CA's list the two it revoked.
	wantCA := slices.DeleteFunc(slices.Clone(want), func(s string) bool { return s == certs[1].Serial })
	crl, _ := awaitCRL(t, env, sB, false, []string{SecretRootCA}, func(c *x509.RevocationList) bool {
		return slices.Equal(crlSerials(c), wantCA)
	})
	good := env.srv.rootCA.Load().crl
	if !crl.NextUpdate.Equal(good.NextUpdate) {
		t.Errorf("published NextUpdate %s, CRL %s", good.NextUpdate, crl.NextUpdate)
	}

	// An expired list from the CA is refused: the last good one stays.
	rv.set(func(r *revokerIssuer) { r.expired = true })
	if caErr, err := env.srv.refreshRevocations(ctx); err != nil || caErr == nil || !strings.Contains(caErr.Error(), "too soon") {
		t.Errorf("refresh with an expired CA list: %v, %v; want a CA list error", caErr, err)
	}
	if b := env.srv.rootCA.Load(); b.crl != good {
		t.Fatalf("an expired CA list replaced the good one (next update %s)", b.crl.NextUpdate)
	}
	if err := env.srv.Ready(ctx); err != nil {
		t.Errorf("Ready with a fresh list kept: %v", err)
	}
	if next := env.srv.nextRevocationRefresh(); next.After(env.clock.Now().Add(revokerCRLRetry)) {
		t.Errorf("next refresh at %s, want a retry within %s", next, revokerCRLRetry)
	}
	env.clock.Advance(55 * time.Minute) // within 10 % of the kept list's end
	if err := env.srv.Ready(ctx); err == nil || !strings.Contains(err.Error(), "revocation list expires") {
		t.Errorf("Ready with the kept list about to expire: %v, want not ready", err)
	}

	// Fresh lists again: published, ready.
	rv.set(func(r *revokerIssuer) { r.expired = false })
	if caErr, err := env.srv.refreshRevocations(ctx); err != nil || caErr != nil {
		t.Fatalf("refresh: %v, %v", caErr, err)
	}
	if b := env.srv.rootCA.Load(); b.crl == good || !b.crl.NextUpdate.After(env.clock.Now()) {
		t.Error("a fresh CA list was not published")
	}
	if err := env.srv.Ready(ctx); err != nil {
		t.Errorf("Ready: %v", err)
	}
}

// TestRevokerRefreshSchedule: a CA's list is fetched again half-way to its
// NextUpdate when that comes before half a CRL period.
func TestRevokerRefreshSchedule(t *testing.T) {
	env, rv := newRevokerEnv(t)
	rv.set(func(r *revokerIssuer) { r.validity = 10 * time.Minute })
	if err := env.srv.refreshCRL(context.Background()); err != nil {
		t.Fatal(err)
	}
	b := env.srv.rootCA.Load()
	last := time.Unix(0, env.srv.lastRevocationRefresh.Load())
	want := last.Add(b.crl.NextUpdate.Sub(last) / 2)
	if got := env.srv.nextRevocationRefresh(); !got.Equal(want) {
		t.Errorf("next refresh %s, want %s (half-way to the list's next update %s)", got, want, b.crl.NextUpdate)
	}
	if got := env.srv.nextRevocationRefresh(); !got.Before(last.Add(DefaultCRLPeriod / 2)) {
		t.Errorf("next refresh %s is not before half the CRL period", got)
	}
}
