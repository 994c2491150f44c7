package sds

import (
	"testing"
	"time"

	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestSweepIdle forgets a node that has been gone long enough and whose
// certificate expired, keeps a connected one and one whose certificate is
// still worth serving again, and a forgotten node can come back.
func TestSweepIdle(t *testing.T) {
	env := newTestEnv(t)
	connTok, connRec := env.token(t, "connected", 3*time.Hour, 0)
	goneTok, goneRec := env.token(t, "gone", 3*time.Hour, 0)
	env.fetch(t, sdsSotw, connTok, "c-1", SecretDefault) // stays open
	_, gone := env.fetch(t, sdsSotw, goneTok, "g-1", SecretDefault)
	connID := env.nodeFor(t, connRec.ID, "c-1").ID
	goneID := env.nodeFor(t, goneRec.ID, "g-1").ID
	gone.close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		env.srv.mu.Lock()
		n := env.srv.live[goneID].streams
		env.srv.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the closed stream is still counted")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Certificate still valid: kept, so a reconnection gets it again.
	if n := env.srv.sweepIdle(0); n != 0 {
		t.Fatalf("swept %d nodes while every certificate is valid", n)
	}
	env.clock.Advance(2 * time.Hour) // past the 1 h certificates
	if n := env.srv.sweepIdle(3 * time.Hour); n != 0 {
		t.Fatalf("swept %d nodes idle for less than the grace period", n)
	}
	if n := env.srv.sweepIdle(time.Minute); n != 1 {
		t.Fatalf("swept %d nodes, want 1 (the idle one with an expired certificate)", n)
	}
	env.srv.mu.Lock()
	_, connKept := env.srv.live[connID]
	_, goneKept := env.srv.live[goneID]
	env.srv.mu.Unlock()
	if !connKept || goneKept {
		t.Fatalf("after the sweep: connected node kept=%v, gone node kept=%v; want true, false", connKept, goneKept)
	}
	if env.srv.cache.has(goneID, xdsres.SecretType, SecretRootCA) {
		t.Fatal("the gone node's resources are still cached")
	}

	// It comes back as the same node with a fresh certificate.
	reply, _ := env.fetch(t, sdsSotw, goneTok, "g-1", SecretDefault)
	chain, _ := leafOf(t, reply.secrets[SecretDefault])
	if chain[0].Subject.CommonName != goneID || !chain[0].NotAfter.After(env.clock.Now()) {
		t.Fatalf("returning node got CN %q expiring %s, want %s with a fresh certificate", chain[0].Subject.CommonName, chain[0].NotAfter, goneID)
	}
}
