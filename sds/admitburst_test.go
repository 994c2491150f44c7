package sds

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/store"
)

// plainStore hides the store's multi-key transactions (store.MultiUpdater),
// as a store without them would.
type plainStore struct{ store.Store }

// TestAdmissionBurst admits sidecars of one limited token all at once, on
// every kind of store: exactly the token's uses are admitted, the rest are
// refused, and the token's count, the nodes and their index agree (no use
// lost or doubled by parallel admissions sharing commits).
func TestAdmissionBurst(t *testing.T) {
	const sidecars, uses = 40, 25
	stores := []struct {
		name string
		open func(t *testing.T) store.Store
	}{
		{"bolt", func(t *testing.T) store.Store {
			kv, err := store.OpenBolt(filepath.Join(t.TempDir(), "state.db"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { kv.Close() })
			return kv
		}},
		{"memory", func(*testing.T) store.Store { return store.NewMemory() }},
		{"no multi-key transactions", func(*testing.T) store.Store { return plainStore{store.NewMemory()} }},
	}
	for _, st := range stores {
		t.Run(st.name, func(t *testing.T) {
			env := newTestEnvWith(t, envOptions{store: st.open(t)})
			tok, rec := env.token(t, "burst", 0, uses)
			var wg sync.WaitGroup
			var mu sync.Mutex
			got := map[codes.Code]int{}
			for i := range sidecars {
				s := env.open(t, sdsSotw, bearer(tok))
				wg.Add(1)
				go func() {
					defer wg.Done()
					err := s.send(xdsReq{node: fmt.Sprintf("side-%d", i), names: []string{SecretDefault}})
					if err == nil {
						_, err = s.recv(recvTimeout)
					}
					mu.Lock()
					got[status.Code(err)]++
					mu.Unlock()
				}()
			}
			wg.Wait()
			if got[codes.OK] != uses || got[codes.PermissionDenied] != sidecars-uses {
				t.Errorf("answers by code %v, want %d OK and %d PermissionDenied", got, uses, sidecars-uses)
			}
			if r := mustToken(t, env, rec.ID); r.Uses != uses {
				t.Errorf("token uses = %d, want %d", r.Uses, uses)
			}
			nodes, err := env.srv.NodeList(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if len(nodes) != uses {
				t.Errorf("%d nodes, want %d", len(nodes), uses)
			}
			for _, n := range nodes {
				if l, err := env.srv.nodes.lookup(context.Background(), rec.ID, n.ClaimedID); err != nil || l == nil || l.ID != n.ID {
					t.Errorf("node %s (%s) not found by its index: %v, %v", n.ID, n.ClaimedID, l, err)
				}
			}
		})
	}
}
