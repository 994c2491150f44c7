package sds

import (
	"bytes"
	"context"
	"encoding/pem"
	"fmt"
	"sync"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// bundleDER returns the DER certificates of a ROOTCA secret.
func bundleDER(sec *tlsv3.Secret) [][]byte {
	var out [][]byte
	rest := sec.GetValidationContext().GetTrustedCa().GetInlineBytes()
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return out
		}
		out = append(out, b.Bytes)
	}
}

// TestRootsPush: a trust-bundle change reaches every open, ACKed stream as a
// new ROOTCA; an unchanged bundle pushes nothing.
func TestRootsPush(t *testing.T) {
	env := newTestEnv(t)
	token, _ := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}

	streams := map[string]xdsStream{}
	for _, v := range allVariants {
		r, s := env.fetch(t, v, token, "roots-"+v.name, names...)
		ack := xdsReq{version: r.version, nonce: r.nonce}
		if !v.delta {
			ack.names = names
		}
		send(t, s, ack)
		streams[v.name] = s
	}

	// Unchanged bundle: nothing pushed.
	if err := env.srv.RefreshRoots(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, v := range allVariants {
		if r, err := streams[v.name].recv(200 * time.Millisecond); err != errNoReply {
			t.Errorf("%s: unchanged trust bundle pushed (%v, %v)", v.name, r, err)
		}
	}

	extra := otherRoot(t)
	env.issuer.addRoot(extra)
	if err := env.srv.RefreshRoots(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := env.srv.Roots(); len(got) != 2 || !got[0].Equal(env.ca.Root()) {
		t.Errorf("Roots() after the refresh has %d roots", len(got))
	}
	for _, v := range allVariants {
		t.Run(v.name, func(t *testing.T) {
			r := mustRecv(t, streams[v.name])
			want := names
			if v.delta {
				want = []string{SecretRootCA} // only what changed
			}
			if !sameNames(r.names, want) {
				t.Fatalf("push carries %v, want %v", r.names, want)
			}
			der := bundleDER(r.secrets[SecretRootCA])
			if len(der) != 2 || !bytes.Equal(der[0], env.ca.Root().Raw) || !bytes.Equal(der[1], extra.Raw) {
				t.Errorf("pushed ROOTCA holds %d certificates, want the CA root and the new one", len(der))
			}
		})
	}
}

// TestConcurrentStreamsOneNode: the several streams one Envoy opens at once
// bind to one node and consume one use of the token.
func TestConcurrentStreamsOneNode(t *testing.T) {
	env := newTestEnv(t)
	token, rec := env.token(t, "frontend", 0, 1)
	const n = 8
	var wg sync.WaitGroup
	replies := make([]*xdsReply, n)
	errs := make([]error, n)
	streams := make([]xdsStream, n)
	for i := range n {
		streams[i] = env.open(t, allVariants[i%len(allVariants)], bearer(token))
	}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := streams[i].send(xdsReq{node: "envoy-1", names: []string{SecretDefault}}); err != nil {
				errs[i] = err
				return
			}
			replies[i], errs[i] = streams[i].recv(recvTimeout)
		}()
	}
	wg.Wait()
	serials := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("stream %d: %v", i, errs[i])
		}
		serials[fmt.Sprintf("%x", leaf(t, replies[i].secrets[SecretDefault]).SerialNumber)] = true
	}
	if len(serials) != 1 {
		t.Errorf("%d different certificates for one node, want 1", len(serials))
	}
	nodes, err := env.srv.NodeList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 1 {
		t.Errorf("%d nodes, want 1", len(nodes))
	}
	if u := mustGetToken(t, env, rec.ID).Uses; u != 1 {
		t.Errorf("token Uses = %d, want 1", u)
	}
	if got := metricValue(t, env.metrics.connectedSidecars); got != 1 {
		t.Errorf("sds_connected_nodes = %v, want 1", got)
	}
}

// TestConcurrentNewNodesUseLimit: a token with 2 uses admits exactly 2 of
// several sidecars racing to join.
func TestConcurrentNewNodesUseLimit(t *testing.T) {
	env := newTestEnv(t)
	token, rec := env.token(t, "frontend", 0, 2)
	const n = 6
	var wg sync.WaitGroup
	errs := make([]error, n)
	streams := make([]xdsStream, n)
	for i := range n {
		streams[i] = env.open(t, sdsSotw, bearer(token))
	}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = streams[i].send(xdsReq{node: fmt.Sprintf("envoy-%d", i), names: []string{SecretDefault}})
			_, errs[i] = streams[i].recv(recvTimeout)
		}()
	}
	wg.Wait()
	ok, refused := 0, 0
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case status.Code(err) == codes.PermissionDenied:
			refused++
		default:
			t.Errorf("stream %d: %v", i, err)
		}
	}
	if ok != 2 || refused != n-2 {
		t.Errorf("%d admitted and %d refused, want 2 and %d", ok, refused, n-2)
	}
	if u := mustGetToken(t, env, rec.ID).Uses; u != 2 {
		t.Errorf("token Uses = %d, want 2", u)
	}
}

// TestExpiredTokenKnownNode: expiry stops a token admitting new nodes, not
// the nodes it already admitted.
func TestExpiredTokenKnownNode(t *testing.T) {
	env := newTestEnv(t)
	token, _ := env.token(t, "frontend", 10*time.Minute, 0)
	first, s := env.fetch(t, sdsSotw, token, "known", SecretDefault)
	s.close()
	env.clock.Advance(11 * time.Minute)

	again, s2 := env.fetch(t, sdsSotw, token, "known", SecretDefault)
	s2.close()
	if a, b := leaf(t, first.secrets[SecretDefault]), leaf(t, again.secrets[SecretDefault]); a.SerialNumber.Cmp(b.SerialNumber) != 0 {
		t.Errorf("known node got a new certificate after its token expired")
	}

	s3 := env.open(t, sdsSotw, bearer(token))
	send(t, s3, xdsReq{node: "new", names: []string{SecretDefault}})
	if _, err := s3.recv(recvTimeout); status.Code(err) != codes.PermissionDenied {
		t.Errorf("new node with an expired token: %v, want PermissionDenied", err)
	}
}

// TestSotwAndDeltaStreamsKeptApart: go-control-plane numbers SotW and delta
// streams with separate counters, so the first stream of each has the same
// ID. Each must keep its own credential, node and state.
func TestSotwAndDeltaStreamsKeptApart(t *testing.T) {
	env := newTestEnv(t)
	backendToken, _ := env.token(t, "backend", 0, 0)
	frontendToken, _ := env.token(t, "frontend", 0, 0)
	opened := func(protocol string) func() bool {
		return func() bool { return metricValue(t, env.metrics.streams.WithLabelValues("sds", protocol)) == 1 }
	}

	// Stream 1 of the SotW server, then stream 1 of the delta server.
	sotw := env.open(t, sdsSotw, bearer(backendToken))
	if !eventually(2*time.Second, opened("sotw")) {
		t.Fatal("SotW stream not opened")
	}
	delta := env.open(t, sdsDelta, bearer(frontendToken))
	if !eventually(2*time.Second, opened("delta")) {
		t.Fatal("delta stream not opened")
	}

	send(t, sotw, xdsReq{node: "sotw-sidecar", names: []string{SecretDefault}})
	r := mustRecv(t, sotw)
	if l := leaf(t, r.secrets[SecretDefault]); len(l.URIs) != 1 || l.URIs[0].String() != spiffeID("backend") {
		t.Fatalf("SotW stream with the backend token got a certificate for %v", l.URIs)
	}
	send(t, delta, xdsReq{node: "delta-sidecar", names: []string{SecretDefault}})
	d := mustRecv(t, delta)
	if l := leaf(t, d.secrets[SecretDefault]); len(l.URIs) != 1 || l.URIs[0].String() != spiffeID("frontend") {
		t.Fatalf("delta stream with the frontend token got a certificate for %v", l.URIs)
	}

	// Closing the delta stream leaves the SotW stream working.
	delta.close()
	if !eventually(2*time.Second, func() bool { return !opened("delta")() }) {
		t.Fatal("delta stream not closed")
	}
	send(t, sotw, xdsReq{names: []string{SecretDefault, SecretRootCA}, version: r.version, nonce: r.nonce})
	r2, err := sotw.recv(recvTimeout)
	if err != nil {
		t.Fatalf("SotW stream after the delta stream closed: %v", err)
	}
	if !sameNames(r2.names, []string{SecretDefault, SecretRootCA}) {
		t.Errorf("SotW stream got %v, want [ROOTCA default]", r2.names)
	}
	if got := metricValue(t, env.metrics.streams.WithLabelValues("sds", "sotw")); got != 1 {
		t.Errorf("open SotW streams = %v, want 1", got)
	}
}
