package sds

import (
	"context"
	"slices"
	"testing"
	"time"
)

// TestTrustRollout: a node counts as done with a trust bundle only once its
// Envoy ACKed a ROOTCA carrying exactly the current roots; one that NACKs
// or never answers stays pending and is named; a closed stream leaves the
// count.
func TestTrustRollout(t *testing.T) {
	env := newTestEnv(t)
	names := []string{SecretDefault, SecretRootCA}
	v := allVariants[0]
	streams := map[string]xdsStream{}
	for _, svc := range []string{"frontend", "backend"} {
		token, _ := env.token(t, svc, 0, 0)
		r, s := env.fetch(t, v, token, "rollout-"+svc, names...)
		send(t, s, xdsReq{names: names, version: r.version, nonce: r.nonce})
		streams[svc] = s
	}
	nodeOf := map[string]string{}
	nodes, err := env.srv.NodeList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		nodeOf[n.Service] = n.ID
	}
	waitRollout := func(what string, ok func(TrustRolloutStatus) bool) TrustRolloutStatus {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			st := env.srv.TrustRollout()
			if ok(st) {
				return st
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 5s: %+v", what, st)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	first := waitRollout("both nodes ACK the first bundle", func(st TrustRolloutStatus) bool { return st.Connected == 2 && st.Acked == 2 })
	if first.Roots != 1 || len(first.Pending) != 0 {
		t.Fatalf("first bundle: %+v, want 1 root and nothing pending", first)
	}

	env.issuer.addRoot(otherRoot(t))
	if err := env.srv.RefreshRoots(context.Background()); err != nil {
		t.Fatal(err)
	}
	push := map[string]*xdsReply{}
	for svc, s := range streams {
		push[svc] = mustRecv(t, s)
	}
	st := env.srv.TrustRollout()
	if st.RootsID == first.RootsID || st.Roots != 2 || st.Acked != 0 || !slices.Equal(st.Pending, sortedPair(nodeOf["frontend"], nodeOf["backend"])) {
		t.Fatalf("after the push, before any ACK: %+v, want 2 roots, none acked, both pending", st)
	}
	// frontend ACKs, backend NACKs: only the frontend is done.
	send(t, streams["frontend"], xdsReq{names: names, version: push["frontend"].version, nonce: push["frontend"].nonce})
	send(t, streams["backend"], xdsReq{names: names, version: "", nonce: push["backend"].nonce, nack: "bad bundle"})
	st = waitRollout("the frontend's ACK counted", func(st TrustRolloutStatus) bool { return st.Acked == 1 })
	if !slices.Equal(st.Pending, []string{nodeOf["backend"]}) {
		t.Errorf("pending %v, want the backend (%s) that NACKed", st.Pending, nodeOf["backend"])
	}
	// The backend's stream closes: one connected node, done.
	streams["backend"].close()
	waitRollout("the closed backend leaves the count", func(st TrustRolloutStatus) bool { return st.Connected == 1 && st.Acked == 1 && len(st.Pending) == 0 })
}

func sortedPair(a, b string) []string {
	s := []string{a, b}
	slices.Sort(s)
	return s
}
