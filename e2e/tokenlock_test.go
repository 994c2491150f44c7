package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// nodeDetail is the part of `GET /v1/nodes/{id}` (node show) these tests
// read.
type nodeDetail struct {
	ID           string   `json:"id"`
	Claimed      string   `json:"claimed_node_id"`
	TokenID      string   `json:"token_id"`
	Status       string   `json:"status"`
	Streams      int      `json:"streams"`
	Connections  []string `json:"connections"`
	SharedEvents int      `json:"shared_events"`
}

// TestNodeRevokeLocksToken: `node revoke` on a node admitted with a default
// (single-use) token revokes the token too, and the same token presented by
// a new Envoy under another node.id is refused: no node is admitted, no
// certificate issued. A real Envoy's streams come from one connection, so
// its node shows no shared key.
func TestNodeRevokeLocksToken(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	srv := startServer(t, bin)

	tok := strings.TrimSpace(srv.cli(t, "token", "create", "--service", "frontend"))
	startSidecarWith(t, srv, envoyBin, sidecarOpts{service: "frontend", nodeID: "frontend-1", token: tok})
	id1, _ := nodeByClaim(t, srv, "frontend-1")
	var n nodeDetail
	eventually(t, 20*time.Second, "frontend-1 connected", func() error {
		srv.admin(t, "GET", "/v1/nodes/"+id1, &n)
		if n.Streams == 0 {
			return fmt.Errorf("no open stream")
		}
		return nil
	})
	if len(n.Connections) != 1 || n.SharedEvents != 0 {
		t.Errorf("a real Envoy's node shows connections %v and %d shared events, want one connection and none", n.Connections, n.SharedEvents)
	}

	_, stderr, code := srv.cliResult("node", "revoke", id1, "--reason", "e2e: token leaked")
	if code != 0 || !strings.Contains(stderr, "token "+n.TokenID+" revoked too") {
		t.Fatalf("node revoke: exit %d, stderr %q; want the single-use token %s revoked too", code, stderr, n.TokenID)
	}
	issued := strings.Count(srv.out.String(), "certificate issued")

	// A new Envoy with the same token under another node.id.
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := filepath.Join(t.TempDir(), "frontend-9.yaml")
	srv.cli(t, "bootstrap", "envoy", "--server", srv.addr, "--token", tok, "--service-port", fmt.Sprint(freePort(t)),
		"--listen", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--admin", admin, "--node-id", "frontend-9", "-o", cfg)
	intruder := start(t, "envoy frontend-9", exec.Command(envoyBin, "-c", cfg, "--use-dynamic-base-id", "-l", "info"))
	refused := func() int {
		return countMatching(srv.out.String(), "stream refused", "reason=revoked", n.TokenID)
	}
	eventually(t, 20*time.Second, "frontend-9's streams refused for the revoked token", func() error {
		if !intruder.alive() {
			t.Fatalf("envoy frontend-9 exited:\n%s", tail(intruder.out.String(), 20))
		}
		if refused() == 0 {
			return fmt.Errorf("no refusal naming token %s logged yet", n.TokenID)
		}
		return nil
	})
	t.Logf("%d stream(s) of frontend-9 refused, e.g. %s", refused(), firstMatching(srv.out.String(), "stream refused", n.TokenID))
	var list struct {
		Nodes []nodeDetail `json:"nodes"`
	}
	srv.admin(t, "GET", "/v1/nodes", &list)
	for _, nd := range list.Nodes {
		if nd.Claimed == "frontend-9" {
			t.Errorf("the revoked node's token admitted a new node: %+v", nd)
		}
	}
	if got := strings.Count(srv.out.String(), "certificate issued"); got != issued {
		t.Errorf("%d certificates issued after the revocation, want none", got-issued)
	}
}

// countMatching counts the lines of out holding every one of words.
func countMatching(out string, words ...string) int {
	n := 0
	for _, l := range lines(out) {
		all := true
		for _, w := range words {
			all = all && strings.Contains(l, w)
		}
		if all {
			n++
		}
	}
	return n
}

// firstMatching returns the first line of out holding every one of words.
func firstMatching(out string, words ...string) string {
	for _, l := range lines(out) {
		if countMatching(l, words...) == 1 {
			return l
		}
	}
	return ""
}
