package sds

import (
	"context"
	"testing"
	"time"
)

// TestBundleRollout: a sidecar counts as having the trust bundle only once
// it ACKed a ROOTCA carrying it; a NACK, or a sidecar that never ACKs,
// leaves it a laggard, named.
func TestBundleRollout(t *testing.T) {
	env := newTestEnv(t)
	token, rec := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}

	type sidecar struct {
		s    xdsStream
		v    variant
		node string
	}
	var sc []sidecar
	for i, v := range allVariants {
		claimed := "rollout-" + v.name
		r, s := env.fetch(t, v, token, claimed, names...)
		n := env.nodeFor(t, rec.ID, claimed)
		sc = append(sc, sidecar{s, v, n.ID})
		if i == 0 {
			continue // this one never ACKs
		}
		ack := xdsReq{version: r.version, nonce: r.nonce}
		if !v.delta {
			ack.names = names
		}
		send(t, s, ack)
	}
	first := env.srv.BundleVersion()
	if !eventually(5*time.Second, func() bool { return env.srv.BundleRollout().Acked == len(sc)-1 }) {
		t.Fatalf("rollout %+v, want %d of %d acked", env.srv.BundleRollout(), len(sc)-1, len(sc))
	}
	r := env.srv.BundleRollout()
	if r.Done() || r.Connected != len(sc) || len(r.Laggards) != 1 || r.Laggards[0].NodeID != sc[0].node || r.Laggards[0].Has != "" {
		t.Fatalf("rollout %+v: want the silent sidecar %s alone named", r, sc[0].node)
	}

	// A new bundle: nobody has it until each ACKs; the one that NACKs
	// stays on the old one.
	env.issuer.addRoot(otherRoot(t))
	if err := env.srv.RefreshRoots(context.Background()); err != nil {
		t.Fatal(err)
	}
	second := env.srv.BundleVersion()
	if second == first {
		t.Fatal("bundle version unchanged by a new root")
	}
	if r := env.srv.BundleRollout(); r.Acked != 0 || r.ByVersion[first] != len(sc)-1 {
		t.Fatalf("right after the push: %+v, want none acked and %d on the first bundle", r, len(sc)-1)
	}
	for i, c := range sc[1:] {
		push := mustRecv(t, c.s)
		reply := xdsReq{version: push.version, nonce: push.nonce}
		if !c.v.delta {
			reply.names = names
		}
		if i == 0 {
			reply.nack = "refused by the test"
		}
		send(t, c.s, reply)
	}
	want := len(sc) - 2
	if !eventually(5*time.Second, func() bool { return env.srv.BundleRollout().Acked == want }) {
		t.Fatalf("rollout %+v, want %d acked", env.srv.BundleRollout(), want)
	}
	r = env.srv.BundleRollout()
	if len(r.Laggards) != 2 || r.ByVersion[first] != 1 || r.ByVersion[""] != 1 {
		t.Fatalf("rollout %+v: want the silent and the NACKing sidecar named", r)
	}
	if countLines(env.logs.String(), "envoy loaded trust bundle", second) != want {
		t.Errorf("want %d log lines of sidecars loading bundle %s:\n%s", want, second, env.logs.String())
	}

	// A sidecar that disconnects is no longer waited for.
	sc[0].s.close()
	sc[1].s.close()
	if !eventually(5*time.Second, func() bool { return env.srv.BundleRollout().Done() }) {
		t.Fatalf("rollout %+v: want done once the laggards left", env.srv.BundleRollout())
	}
}
