package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// serve starts g on a loopback port and returns its address.
func serve(t *testing.T, g *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return lis.Addr().String()
}

// testConfig writes the CA and a token and returns a run config for addr.
func testConfig(t *testing.T, ca *testCA, addr string, n int) *runConfig {
	t.Helper()
	dir := t.TempDir()
	_, caPEM, _ := ca.current()
	caFile, tokFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "token")
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokFile, []byte("SDSTKN-test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := parseRun([]string{"-addr", addr, "-ca-file", caFile, "-token-file", tokFile, "-n", strconv.Itoa(n),
		"-concurrency", "5", "-timeout", "3s", "-deadline", "60s", "-push-timeout", "30s"}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRunBaseline loads the baseline in every protocol mode: every sidecar
// is served, counted once, with a first-secret time, and a push reaches all.
func TestRunBaseline(t *testing.T) {
	for _, mode := range [][]string{{}, {"delta"}, {"sds"}, {"sds", "delta"}, {"conns"}} {
		t.Run(strings.Join(append([]string{"ads"}, mode...), "-"), func(t *testing.T) {
			g, ca, err := newBaselineServer()
			if err != nil {
				t.Fatal(err)
			}
			c := testConfig(t, ca, serve(t, g), 20)
			for _, m := range mode {
				switch m {
				case "delta":
					c.delta = true
				case "sds":
					c.sds = true
				case "conns":
					c.conns = 2
				}
			}
			c.push, c.pushFn = true, ca.resign
			c.serverPID = os.Getpid()
			res, err := runLoad(context.Background(), c, &strings.Builder{})
			if err != nil {
				t.Fatal(err)
			}
			if res.Served != 20 || len(res.Errors) != 0 || res.FirstSecret.N != 20 {
				t.Fatalf("served %d, errors %v, first-secret samples %d; want 20, none, 20", res.Served, res.Errors, res.FirstSecret.N)
			}
			if res.FirstSecret.Max <= 0 || res.FirstSecret.Max > res.AllServed {
				t.Errorf("first secret max %s not within (0, all served %s]", res.FirstSecret.Max, res.AllServed)
			}
			if res.Push.N != 20 || res.PushMissing != 0 {
				t.Errorf("push reached %d, missing %d; want 20, 0", res.Push.N, res.PushMissing)
			}
			if res.RSSAfterKiB <= 0 {
				t.Errorf("no RSS read for -server-pid")
			}
		})
	}
}

// refusingServer answers node ids by their number: multiples of 4 are
// refused with PermissionDenied, 4k+1 never get an answer, the rest are
// served by the baseline.
type refusingServer struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	base *baselineServer
}

type replayStream struct {
	discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer
	first *discovery.DiscoveryRequest
}

func (r *replayStream) Recv() (*discovery.DiscoveryRequest, error) {
	if f := r.first; f != nil {
		r.first = nil
		return f, nil
	}
	return r.AggregatedDiscoveryService_StreamAggregatedResourcesServer.Recv()
}

func (s *refusingServer) StreamAggregatedResources(st discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	req, err := st.Recv()
	if err != nil {
		return err
	}
	n, _ := strconv.Atoi(strings.TrimPrefix(req.GetNode().GetId(), "load-"))
	switch n % 4 {
	case 0:
		return status.Error(codes.PermissionDenied, "refused by the test")
	case 1:
		<-st.Context().Done()
		return nil
	}
	return s.base.sotw(&replayStream{st, req})
}

// TestRunCountsErrors: the harness counts each failed sidecar once, under
// the code the server gave (or DeadlineExceeded when it never answered), and
// takes timings only from the served ones.
func TestRunCountsErrors(t *testing.T) {
	ca, err := newTestCA()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := newTLSServer(ca)
	if err != nil {
		t.Fatal(err)
	}
	discovery.RegisterAggregatedDiscoveryServiceServer(srv, &refusingServer{base: &baselineServer{ca: ca}})
	c := testConfig(t, ca, serve(t, srv), 40)
	c.timeout = 500 * time.Millisecond
	res, err := runLoad(context.Background(), c, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"PermissionDenied": 10, "DeadlineExceeded": 10}
	if res.Served != 20 || len(res.Errors) != 2 || res.Errors["PermissionDenied"] != 10 || res.Errors["DeadlineExceeded"] != 10 {
		t.Fatalf("served %d, errors %v; want 20 and %v", res.Served, res.Errors, want)
	}
	if res.FirstSecret.N != 20 {
		t.Errorf("first-secret samples %d, want 20 (served ones only)", res.FirstSecret.N)
	}
	if res.FirstSecret.Max >= c.timeout {
		t.Errorf("first secret max %s: timed-out sidecars counted in timings", res.FirstSecret.Max)
	}
}

func TestParseRunErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-token-file", "t"}, "-ca-file is required"},
		{[]string{"-ca-file", "c"}, "-token-file is required"},
		{[]string{"-ca-file", "c", "-token-file", "t", "-n", "0"}, "-n 0"},
		{[]string{"-ca-file", "c", "-token-file", "t", "-concurrency", "0"}, "-concurrency 0"},
		{[]string{"-ca-file", "c", "-token-file", "t", "-push-cmd", "true"}, "-push-cmd needs -push"},
		{[]string{"-ca-file", "c", "-token-file", "t", "extra"}, "unexpected argument"},
	}
	for _, tt := range tests {
		_, err := parseRun(tt.args, &strings.Builder{})
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseRun(%q) = %v, want an error containing %q", tt.args, err, tt.want)
		}
	}
}
