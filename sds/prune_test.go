package sds

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/meshid/sds-server/store"
)

// TestPruneNodes: records whose certificates all expired more than the
// retention ago are removed with their index entry; revoked nodes, nodes in
// memory and recent records are kept.
func TestPruneNodes(t *testing.T) {
	env := newTestEnvWith(t, envOptions{limits: Limits{NodeRetention: 7 * 24 * time.Hour}})
	ctx := context.Background()
	tokA, recA := env.token(t, "gone", 0, 0)
	tokB, recB := env.token(t, "connected", 0, 0)
	tokC, recC := env.token(t, "revoked", 0, 0)
	_, a := env.fetch(t, sdsSotw, tokA, "a", SecretDefault)
	env.fetch(t, sdsSotw, tokB, "b", SecretDefault) // stays open
	_, c := env.fetch(t, sdsSotw, tokC, "c", SecretDefault)
	idA, idB, idC := env.nodeFor(t, recA.ID, "a").ID, env.nodeFor(t, recB.ID, "b").ID, env.nodeFor(t, recC.ID, "c").ID
	a.close()
	c.close()
	if _, err := env.srv.RevokeNode(ctx, idC, "test"); err != nil {
		t.Fatalf("RevokeNode: %v", err)
	}
	// A record that was never in memory, last seen long ago.
	old := env.clock.Now().Add(-30 * 24 * time.Hour)
	if err := env.srv.nodes.put(ctx, &Node{ID: "d0d0", Service: "old", Env: "default", TokenID: "t-old", ClaimedID: "d",
		Status: NodeActive, FirstSeen: old, LastSeen: old, IssuedNotAfter: old.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if err := env.kv.Put(ctx, bucketNodeIndex, indexKey("t-old", "d"), []byte("d0d0")); err != nil {
		t.Fatal(err)
	}
	if n, err := env.srv.pruneNodes(ctx); err != nil || n != 1 {
		t.Fatalf("pruneNodes = %d, %v; want 1 (the old record), nothing recent", n, err)
	}

	env.clock.Advance(8 * 24 * time.Hour)
	if !eventually(5*time.Second, func() bool {
		env.srv.sweepIdle(0) // once their streams are counted closed
		return !env.srv.isLive(idA) && !env.srv.isLive(idC)
	}) {
		t.Fatal("the closed nodes stay in memory")
	}
	// A recent record, never in memory.
	now := env.clock.Now()
	if err := env.srv.nodes.put(ctx, &Node{ID: "e0e0", Service: "new", Env: "default", TokenID: "t-new", ClaimedID: "e",
		Status: NodeActive, FirstSeen: now, LastSeen: now}); err != nil {
		t.Fatal(err)
	}
	if n, err := env.srv.pruneNodes(ctx); err != nil || n != 1 {
		t.Fatalf("pruneNodes = %d, %v; want 1 (the node gone for 8 days)", n, err)
	}
	for _, tc := range []struct {
		id   string
		kept bool
	}{{idA, false}, {idB, true}, {idC, true}, {"d0d0", false}, {"e0e0", true}} {
		_, err := env.srv.nodes.get(ctx, tc.id)
		if kept := err == nil; kept != tc.kept {
			t.Errorf("node %s kept=%v (%v), want %v", tc.id, kept, err, tc.kept)
		}
	}
	if _, err := env.kv.Get(ctx, bucketNodeIndex, indexKey(recA.ID, "a")); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("index entry of the pruned node: %v, want not found", err)
	}
	if _, err := env.kv.Get(ctx, bucketNodeIndex, indexKey(recC.ID, "c")); err != nil {
		t.Errorf("index entry of the revoked node: %v, want kept", err)
	}
	if got := metricValue(t, env.metrics.limits.nodesPruned); got != 2 {
		t.Fatalf("sds_nodes_pruned_total = %v, want 2", got)
	}
}

func TestPrunable(t *testing.T) {
	cutoff := time.Date(2030, 1, 8, 0, 0, 0, 0, time.UTC)
	before, after := cutoff.Add(-time.Hour), cutoff.Add(time.Hour)
	tests := []struct {
		name string
		n    Node
		want bool
	}{
		{"old, never issued", Node{Status: NodeActive, LastSeen: before}, true},
		{"old, certificate expired before", Node{Status: NodeActive, LastSeen: before, IssuedNotAfter: before}, true},
		{"seen recently", Node{Status: NodeActive, LastSeen: after}, false},
		{"certificate expires after", Node{Status: NodeActive, LastSeen: before, IssuedNotAfter: after}, false},
		{"an older certificate expires after", Node{Status: NodeActive, LastSeen: before, Certs: []IssuedCert{{NotAfter: after}}}, false},
		{"serving certificate expires after", Node{Status: NodeActive, LastSeen: before, ServingNotAfter: after}, false},
		{"revoked long ago", Node{Status: NodeRevoked, LastSeen: before, RevokedAt: before}, false},
	}
	for _, tt := range tests {
		if got := prunable(&tt.n, cutoff); got != tt.want {
			t.Errorf("%s: prunable = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestPruneSkipsNodeBeingAdmitted: a record is not pruned while a stream of
// its token is between the registry lookup and the in-memory node.
func TestPruneSkipsNodeBeingAdmitted(t *testing.T) {
	env := newTestEnv(t)
	ctx := context.Background()
	old := env.clock.Now().Add(-30 * 24 * time.Hour)
	n := &Node{ID: "f0f0", Service: "old", Env: "default", TokenID: "t-busy", ClaimedID: "f", Status: NodeActive, FirstSeen: old, LastSeen: old}
	if err := env.srv.nodes.put(ctx, n); err != nil {
		t.Fatal(err)
	}
	env.srv.mu.Lock()
	env.srv.streams[999] = &streamState{ctx: ctx}
	env.srv.streams[999].token.ID = "t-busy"
	env.srv.mu.Unlock()
	if got, err := env.srv.pruneNodes(ctx); err != nil || got != 0 {
		t.Fatalf("pruneNodes = %d, %v while a stream of its token is being admitted; want 0", got, err)
	}
	env.srv.mu.Lock()
	delete(env.srv.streams, 999)
	env.srv.mu.Unlock()
	if got, err := env.srv.pruneNodes(ctx); err != nil || got != 1 {
		t.Fatalf("pruneNodes = %d, %v once the stream is gone; want 1", got, err)
	}
}
