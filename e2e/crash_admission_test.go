package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Admission burst sizes: every loop is bounded by these and the timeouts.
const (
	crashSidecars    = 3000
	crashAfterServed = 300
)

// TestCrashDuringAdmission kills the server (SIGKILL) in the middle of an
// admission burst (sds-load, 100 sidecars opening at once, one unlimited
// token) and restarts it on the same data dir: every sidecar that had been
// served a certificate is still a known node, with that certificate on its
// record, and the token's use count is exactly the number of nodes it
// admitted (a use is never lost nor counted twice: use, node and index are
// one commit).
func TestCrashDuringAdmission(t *testing.T) {
	if testing.Short() {
		t.Skip("admission burst e2e")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	load := tool(t, "SDS_LOAD_BIN", "bin/sds-load")
	srv := startServer(t, bin)
	dir := t.TempDir()
	tokFile, servedFile := filepath.Join(dir, "token"), filepath.Join(dir, "served")
	tok := strings.TrimSpace(srv.cli(t, "token", "create", "--service", "load", "--uses", "0"))
	if err := os.WriteFile(tokFile, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(load, "run", "-addr", srv.addr, "-ca-file", filepath.Join(srv.dataDir, "ca", "root.crt"),
		"-token-file", tokFile, "-n", "3000", "-concurrency", "100", "-timeout", "10s", "-deadline", "90s",
		"-served-out", servedFile)
	lp := start(t, "sds-load", cmd)
	served := func() []string {
		b, _ := os.ReadFile(servedFile)
		return strings.Fields(string(b))
	}
	eventually(t, 60*time.Second, "sds-load to have 300 sidecars served", func() error {
		if !lp.alive() {
			t.Fatalf("sds-load ended before the crash:\n%s", lp.out.String())
		}
		if n := len(served()); n < crashAfterServed {
			return fmt.Errorf("%d served", n)
		}
		return nil
	})
	if err := syscall.Kill(srv.pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-srv.done
	select {
	case <-lp.done:
	case <-time.After(60 * time.Second):
		t.Fatal("sds-load did not end within 60 s of the crash")
	}
	ids := served()
	if len(ids) >= crashSidecars {
		t.Fatalf("all %d served before the kill: the crash hit no admission", len(ids))
	}
	t.Logf("server killed with %d of %d sidecars served", len(ids), crashSidecars)

	srv.restart(t)
	var nodes struct {
		Nodes []struct {
			ID           string `json:"id"`
			ClaimedID    string `json:"claimed_node_id"`
			TokenID      string `json:"token_id"`
			IssuedSerial string `json:"issued_serial"`
		} `json:"nodes"`
	}
	srv.admin(t, "GET", "/v1/nodes", &nodes)
	known := map[string]bool{}
	perClaim := map[string]int{}
	for _, n := range nodes.Nodes {
		perClaim[n.ClaimedID]++
		if n.IssuedSerial != "" {
			known[n.ClaimedID] = true
		}
	}
	missing := 0
	for _, id := range ids {
		if !known[id] {
			missing++
			if missing <= 5 {
				t.Errorf("sidecar %s was served a certificate before the crash but is not a node with one after the restart", id)
			}
		}
	}
	for c, k := range perClaim {
		if k > 1 {
			t.Errorf("claimed node.id %s bound to %d nodes", c, k)
		}
	}
	var toks struct {
		Tokens []struct {
			ID   string `json:"id"`
			Uses int    `json:"uses"`
		} `json:"tokens"`
	}
	srv.admin(t, "GET", "/v1/tokens", &toks)
	if len(toks.Tokens) != 1 {
		t.Fatalf("%d tokens, want 1", len(toks.Tokens))
	}
	if got, want := toks.Tokens[0].Uses, len(nodes.Nodes); got != want {
		t.Errorf("token uses = %d, want %d (one per node admitted)", got, want)
	}
	t.Logf("after restart: %d nodes (%d served before the crash, %d missing), token uses %d",
		len(nodes.Nodes), len(ids), missing, toks.Tokens[0].Uses)
}
