package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// twoFrontends starts a backend and two frontend nodes sharing one token:
// frontend-1 reaches the backend on two outbound listeners with separate
// connection pools ("kept", for a connection opened before a revocation, and
// "fresh", first used after it: a new handshake), frontend-2 on "backend".
// It returns once both frontends reach the backend.
func twoFrontends(t *testing.T, srv *server, envoyBin string) (backend, fe1, fe2 *sidecar) {
	t.Helper()
	backend = startSidecar(t, srv, envoyBin, "backend")
	tok := strings.TrimSpace(srv.cli(t, "token", "create", "--service", "frontend", "--uses", "2"))
	fe1 = startSidecarWith(t, srv, envoyBin, sidecarOpts{service: "frontend", nodeID: "frontend-1", token: tok,
		routes: []route{{"kept", backend}, {"fresh", backend}}})
	fe2 = startSidecarWith(t, srv, envoyBin, sidecarOpts{service: "frontend", nodeID: "frontend-2", token: tok,
		routes: []route{{"backend", backend}}})
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for _, c := range []struct {
		sc    *sidecar
		route string
	}{{fe1, "kept"}, {fe2, "backend"}} {
		eventually(t, 20*time.Second, c.sc.name+" reaches backend", func() error {
			code, _, err := call(fresh, c.sc, c.route, "GET", "/hello")
			if err == nil && code != 200 {
				err = fmt.Errorf("status %d", code)
			}
			return err
		})
	}
	return backend, fe1, fe2
}

// verifyFailures counts the client certificates a sidecar refused at the
// TLS handshake (a revoked certificate shows up here).
func verifyFailures(sc *sidecar) int {
	body, _ := httpGet("http://" + sc.envoy.admin + "/stats?filter=ssl.fail_verify_error")
	n := 0
	for _, l := range lines(body) {
		if _, v, ok := strings.Cut(l, ": "); ok {
			var x int
			fmt.Sscan(v, &x)
			n += x
		}
	}
	return n
}

// nodeByClaim finds a node's server ID by the node.id its sidecar claims.
func nodeByClaim(t *testing.T, srv *server, claimed string) (id string, streams int) {
	t.Helper()
	var out struct {
		Nodes []struct {
			ID      string `json:"id"`
			Claimed string `json:"claimed_node_id"`
			Streams int    `json:"streams"`
		} `json:"nodes"`
	}
	srv.admin(t, "GET", "/v1/nodes", &out)
	for _, n := range out.Nodes {
		if n.Claimed == claimed {
			return n.ID, n.Streams
		}
	}
	t.Fatalf("no node claims %q", claimed)
	return "", 0
}

// TestRevocation revokes one of two frontend nodes: its new connections are
// refused by the backend at the TLS handshake (CRL), its keep-alive
// connection opened before the revocation is denied on the next request
// (ECDS deny list), its SDS streams are closed, the other frontend never
// sees a failure, and all of it survives a server restart.
func TestRevocation(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	srv := startServer(t, bin, "--crl-period", "20s")

	backend, fe1, fe2 := twoFrontends(t, srv, envoyBin)
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

	// fe2 sends steady traffic throughout; none of it may fail.
	var sent, failed atomic.Int64
	var failMu sync.Mutex
	var failures []string
	bg := newBackground(t)
	bg.every(50*time.Millisecond, func() {
		sent.Add(1)
		code, _, err := call(fresh, fe2, "backend", "GET", "/steady")
		if err != nil || code != 200 {
			failed.Add(1)
			failMu.Lock()
			failures = append(failures, fmt.Sprintf("%d %v", code, err))
			failMu.Unlock()
		}
	})
	stopTraffic := bg.stop

	// The keep-alive connection through fe1, opened before the revocation.
	var newConns atomic.Int64
	keep := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Hour}}
	keepCall := func() (int, error) {
		trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
			if !i.Reused {
				newConns.Add(1)
			}
		}}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET",
			fmt.Sprintf("http://127.0.0.1:%d/kept", fe1.out["kept"]), nil)
		resp, err := keep.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}
	if code, err := keepCall(); code != 200 {
		t.Fatalf("keep-alive request before revocation: %d %v", code, err)
	}
	beConns := statValue(t, backend.envoy.admin, "http.inbound.downstream_cx_total")

	id1, streams := nodeByClaim(t, srv, "frontend-1")
	if streams == 0 {
		t.Fatalf("frontend-1 has no open stream before revocation")
	}
	// The token admitted frontend-2 too and is kept: its streams go on.
	srv.cli(t, "node", "revoke", id1, "--reason", "e2e: key compromised", "--keep-token")
	revoked := time.Now()

	// The keep-alive connection: denied on its next request, never 200.
	code, err := keepCall()
	for code == 200 && err == nil && time.Since(revoked) < 5*time.Second {
		time.Sleep(100 * time.Millisecond)
		code, err = keepCall()
	}
	t.Logf("keep-alive request after revocation: %d %v after %s", code, err, time.Since(revoked).Round(time.Millisecond))
	if code == 200 {
		t.Errorf("frontend-1's keep-alive connection still gets 200 %s after revocation", time.Since(revoked))
	}
	if got := statValue(t, backend.envoy.admin, "http.inbound.downstream_cx_total"); got != beConns {
		t.Logf("note: backend accepted %d new connections meanwhile", got-beConns)
	}

	// A new connection from fe1: refused at the TLS handshake by the CRL.
	verifyFails := func() int { return verifyFailures(backend) }
	before := verifyFails()
	eventually(t, 5*time.Second, "frontend-1's new connection refused", func() error {
		code, body, err := call(fresh, fe1, "fresh", "GET", "/fresh")
		if err == nil && code == 200 {
			return fmt.Errorf("frontend-1 still reaches backend on a new connection (200 %q)", body)
		}
		if verifyFails() <= before {
			return fmt.Errorf("got %d %v but the backend counted no certificate verification failure", code, err)
		}
		return nil
	})

	// fe1's streams were closed and it is refused from now on.
	eventually(t, 5*time.Second, "frontend-1's streams closed", func() error {
		if _, n := nodeByClaim(t, srv, "frontend-1"); n != 0 {
			return fmt.Errorf("%d streams still open", n)
		}
		return nil
	})
	eventually(t, 15*time.Second, "frontend-1's reconnection refused", func() error {
		if !strings.Contains(srv.out.String(), "reason=node_revoked") {
			return fmt.Errorf("no refused stream logged for the revoked node")
		}
		return nil
	})

	// A restart keeps the revocation.
	srv.restart(t)
	eventually(t, 20*time.Second, "frontend-2 served again after restart", func() error {
		_, n := nodeByClaim(t, srv, "frontend-2")
		if n == 0 {
			return fmt.Errorf("frontend-2 not reconnected")
		}
		return nil
	})
	time.Sleep(time.Second)
	if code, _, err := call(fresh, fe1, "fresh", "GET", "/after-restart"); err == nil && code == 200 {
		t.Errorf("after a restart frontend-1 reaches backend again")
	}
	if _, n := nodeByClaim(t, srv, "frontend-1"); n != 0 {
		t.Errorf("after a restart frontend-1 has %d open streams", n)
	}
	stopTraffic()
	t.Logf("frontend-2: %d requests, %d failed", sent.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("frontend-2 saw %d failed requests, e.g. %q", failed.Load(), failures[:min(5, len(failures))])
	}
}
