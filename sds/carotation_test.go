package sds

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer/local"
)

// acker ACKs every response on s until stop is called.
func acker(t *testing.T, s xdsStream, names []string) (stop func()) {
	t.Helper()
	var wg sync.WaitGroup
	done := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			r, err := s.recv(100 * time.Millisecond)
			if err != nil {
				continue
			}
			_ = s.send(xdsReq{version: r.version, nonce: r.nonce, names: names})
		}
	}()
	return func() { close(done); wg.Wait() }
}

// TestRotationDriver: a sidecar that never ACKs holds phase 1 and is named;
// --continue without --force refuses, with --force advances naming it;
// the rest of the rotation runs on the ACKs of the other sidecar; once
// complete, a token pinning the old root is refused with a message saying
// to create a new one.
func TestRotationDriver(t *testing.T) {
	env := newTestEnv(t)
	ctx := context.Background()
	token, rec := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}

	r, good := env.fetch(t, sdsSotw, token, "good", names...)
	send(t, good, xdsReq{version: r.version, nonce: r.nonce, names: names})
	r, silent := env.fetch(t, sdsSotw, token, "silent", names...)
	send(t, silent, xdsReq{version: r.version, nonce: r.nonce, names: names})
	if !eventually(5*time.Second, func() bool { return env.srv.BundleRollout().Acked == 2 }) {
		t.Fatalf("before the rotation: %+v", env.srv.BundleRollout())
	}
	stopAck := acker(t, good, names)
	defer stopAck()

	d, err := NewRotationDriver(env.srv, env.ca, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	// Envoy refuses a leaf whose issuer has no revocation list in the
	// validation context: the bundle {A, B} must already carry a list signed
	// under B, before any leaf under B exists.
	if !crlOfIncoming(t, env.srv.rootCA.Load().crl.PEM, env.ca) {
		t.Fatal("phase 1's ROOTCA carries no revocation list of B's intermediate")
	}
	silentID := ""
	if !eventually(10*time.Second, func() bool {
		d.tick(ctx)
		st := d.Status()
		if st.Done == 1 && st.Total == 2 && len(st.Laggards) == 1 {
			silentID = st.Laggards[0].NodeID
			return true
		}
		return false
	}) {
		t.Fatalf("phase 1 status %+v: want 1 of 2 done, the silent sidecar named", d.Status())
	}
	for range 3 {
		d.tick(ctx)
	}
	if info, _ := env.ca.Rotation(); info.Phase != local.PhaseTrustBoth {
		t.Fatalf("phase %s advanced past a sidecar that never ACKed", info.Phase)
	}
	if rep := env.srv.Status(ctx); rep.Rotation == nil || rep.Rotation.Phase != local.PhaseTrustBoth {
		t.Errorf("status rotation %+v", rep.Rotation)
	}
	if _, _, err := d.Continue(ctx, false); !errors.Is(err, ErrNotDone) || !strings.Contains(err.Error(), silentID) {
		t.Fatalf("continue without force: %v, want it to name %s", err, silentID)
	}
	phase, lag, err := d.Continue(ctx, true)
	if err != nil || phase != local.PhaseReissue || len(lag) != 1 || lag[0].NodeID != silentID {
		t.Fatalf("continue --force: %s %+v %v", phase, lag, err)
	}
	if h := d.Status().History; len(h) != 2 || len(h[1].Forced) != 1 || h[1].Forced[0] != silentID {
		t.Errorf("history %+v: want the forced step naming %s", h, silentID)
	}
	silent.close() // it leaves; the rest runs on the good sidecar's ACKs

	if !eventually(20*time.Second, func() bool {
		env.clock.Advance(500 * time.Millisecond)
		d.tick(ctx)
		_, ok := env.ca.Rotation()
		return !ok
	}) {
		t.Fatalf("rotation did not complete: %+v", d.Status())
	}
	roots := env.srv.Roots()
	if len(roots) != 1 || !roots[0].Equal(env.ca.Root()) {
		t.Fatalf("bundle after completion has %d roots, want the new root alone", len(roots))
	}
	hist := d.Status().History
	if len(hist) != 4 || hist[3].Phase != local.PhaseComplete || hist[3].Done != hist[3].Total {
		t.Errorf("history %+v", hist)
	}

	// The token pins the old root: listed stale, refused, saying what to do.
	if got := env.srv.tokenInfo(rec).Status; got != TokenStaleRoot {
		t.Errorf("token list status %q, want %q", got, TokenStaleRoot)
	}
	s := env.open(t, sdsSotw, bearer(token))
	_ = s.send(xdsReq{node: "late", names: names})
	_, err = s.recv(5 * time.Second)
	if err == nil || !strings.Contains(err.Error(), "predates a CA rotation") || !strings.Contains(err.Error(), "token create") {
		t.Errorf("token pinning the old root after the rotation: %v", err)
	}
	// The sidecars it admitted before the rotation reconnect with it (their
	// bootstrap is not rewritten) and get their certificate, under the new
	// root, without spending a use.
	usesBefore := tokenUses(t, env, rec.ID)
	for _, node := range []string{"good", "silent"} {
		r, s := env.fetch(t, sdsSotw, token, node, names...)
		chain, _ := leafOf(t, r.secrets[SecretDefault])
		if len(chain) < 2 || chain[1].CheckSignatureFrom(env.ca.Root()) != nil {
			t.Errorf("%s reconnecting after the rotation: chain %d certificates, not under the new root", node, len(chain))
		}
		s.close()
	}
	if got := tokenUses(t, env, rec.ID); got != usesBefore {
		t.Errorf("reconnecting with the stale token took uses: %d -> %d", usesBefore, got)
	}
	// One away until its admission lapsed is a new node: refused.
	if !eventually(5*time.Second, func() bool { return !env.srv.hasOpenStreams(silentID) }) {
		t.Fatal("the silent sidecar's stream is still open after it closed it")
	}
	env.clock.Advance(48 * time.Hour)
	s = env.open(t, sdsSotw, bearer(token))
	_ = s.send(xdsReq{node: "silent", names: names})
	if _, err = s.recv(5 * time.Second); err == nil || !strings.Contains(err.Error(), "admitted again like a new node") || !strings.Contains(err.Error(), "predates a CA rotation") {
		t.Errorf("node away until its admission lapsed, with the stale token: %v", err)
	}
}

func tokenUses(t *testing.T, env *testEnv, id string) int {
	t.Helper()
	rec, err := env.srv.cfg.Tokens.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return rec.Uses
}

// crlOfIncoming reports whether one of the lists in pemCRLs is signed by
// the CA's incoming intermediate (B's, during phase 1).
func crlOfIncoming(t *testing.T, pemCRLs []byte, ca *local.CA) bool {
	t.Helper()
	var incoming *x509.Certificate
	for _, c := range ca.Certificates() {
		if c.Role == "intermediate_incoming" {
			incoming = c.Cert
		}
	}
	if incoming == nil {
		t.Fatal("no incoming intermediate during phase 1")
	}
	for rest := pemCRLs; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			return false
		}
		crl, err := x509.ParseRevocationList(b.Bytes)
		if err != nil {
			t.Fatalf("ROOTCA revocation list: %v", err)
		}
		if crl.CheckSignatureFrom(incoming) == nil {
			return true
		}
	}
}
