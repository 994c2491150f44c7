package e2e

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/sds-server/sds"
)

// TestStatus runs `sds-server status -o json` against a running server with
// one real Envoy: ready, one node connected, the CA's expiry and CRL known.
// Then the Envoy is killed (SIGKILL: no goodbye) and `node list -o json`
// shows its node disconnected with its last seen time, and status counts
// no connected node.
func TestStatus(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	srv := startServer(t, bin)
	sc := startSidecar(t, srv, envoyBin, "web")

	status := func() (sds.StatusReport, int) {
		out, errOut, code := srv.cliResult("status", "-o", "json")
		var rep sds.StatusReport
		dec := json.NewDecoder(strings.NewReader(out))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&rep); err != nil {
			t.Fatalf("status -o json: exit %d, %v\nstdout: %s\nstderr: %s", code, err, out, errOut)
		}
		return rep, code
	}
	eventually(t, 15*time.Second, "status: ready with one node connected", func() error {
		rep, code := status()
		if code != 0 || !rep.Ready || rep.Nodes.Connected != 1 {
			return fmt.Errorf("exit %d, ready %v (%q), nodes %+v", code, rep.Ready, rep.Reasons, rep.Nodes)
		}
		return nil
	})
	rep, _ := status()
	if rep.TrustDomain != "mesh.local" || len(rep.CA.Roots) != 1 || rep.CA.Intermediate == nil || rep.CA.CRL == nil || rep.Rotation != nil {
		t.Errorf("status: trust domain %q, CA %+v, rotation %v; want mesh.local, one root, the intermediate, a CRL, no rotation", rep.TrustDomain, rep.CA, rep.Rotation)
	}
	if rep.Nodes.Total != 1 || rep.Nodes.Streams < 1 || rep.Nodes.RenewalFailing != 0 || rep.Nodes.ServingStale != 0 {
		t.Errorf("status nodes %+v, want one node, its streams, nothing failing", rep.Nodes)
	}
	table := srv.cli(t, "status")
	if !regexp.MustCompile(`(?m)^READY:\s+yes$`).MatchString(table) || !strings.Contains(table, "1 connected") {
		t.Errorf("status table:\n%s", table)
	}

	nodes := func() sds.NodeList {
		var nl sds.NodeList
		if err := json.Unmarshal([]byte(srv.cli(t, "node", "list", "-o", "json")), &nl); err != nil {
			t.Fatalf("node list -o json: %v", err)
		}
		if len(nl.Nodes) != 1 {
			t.Fatalf("node list: %d nodes, want 1", len(nl.Nodes))
		}
		return nl
	}
	n := nodes().Nodes[0]
	if n.ClaimedID != "web-1" || n.State != sds.NodeConnected || n.Mode != sds.NodeModeDirect || n.Streams < 1 || n.ServingSerial == "" {
		t.Errorf("node before the kill: claimed %q, state %q, mode %q, streams %d, serving %q", n.ClaimedID, n.State, n.Mode, n.Streams, n.ServingSerial)
	}

	killed := time.Now()
	if err := syscall.Kill(-sc.envoy.pid(), syscall.SIGKILL); err != nil {
		t.Fatalf("kill envoy: %v", err)
	}
	<-sc.envoy.done
	eventually(t, 15*time.Second, "node list: the killed Envoy's node disconnected", func() error {
		if n = nodes().Nodes[0]; n.State != sds.NodeDisconnected || n.Streams != 0 {
			return fmt.Errorf("state %q, %d streams", n.State, n.Streams)
		}
		return nil
	})
	t.Logf("node disconnected %s after the kill", time.Since(killed).Round(time.Millisecond))
	// Last seen is when its streams closed: after it last spoke, around
	// the kill (second precision in the clock skew allowed).
	if n.LastSeen.IsZero() || n.LastSeen.Before(killed.Add(-time.Second)) || n.LastSeen.After(time.Now()) {
		t.Errorf("last seen %s, want the disconnection, around %s", n.LastSeen, killed.UTC())
	}
	if n.Status != "active" {
		t.Errorf("record status %q, want active (disconnected is not revoked)", n.Status)
	}
	if table := srv.cli(t, "node", "list"); !regexp.MustCompile(`(?m)^\S+\s+default/web\s+web-1\s+direct\s+disconnected\s+0\s`).MatchString(table) {
		t.Errorf("node list table does not show web-1 disconnected:\n%s", table)
	}
	if rep, code := status(); code != 0 || !rep.Ready || rep.Nodes.Connected != 0 || rep.Nodes.Total != 1 {
		t.Errorf("status after the kill: exit %d, ready %v, nodes %+v; want ready, none connected, one known", code, rep.Ready, rep.Nodes)
	}
}
