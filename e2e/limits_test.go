package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// TestFloodLimits floods a server serving two real sidecars: idle TCP
// connections past the connection limit and a burst of unauthenticated
// streams. The mesh keeps working, the admin CLI and the metrics stay
// reachable, the log stays small, and the sidecars' connections are never
// cut by the idle timeout.
func TestFloodLimits(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	const maxConns, idle = 60, 2 * time.Second
	cfg := filepath.Join(t.TempDir(), "limits.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("limits:\n  max_connections: %d\n  idle_timeout: %s\n  handshake_timeout: 3s\n", maxConns, idle)), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, bin, "--config", cfg)
	m := startMesh(t, srv, envoyBin)
	through := func() error {
		b, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/hello", m.feOut))
		if err == nil && !strings.Contains(b, "hello from backend") {
			err = fmt.Errorf("body %q", b)
		}
		return err
	}
	eventually(t, 20*time.Second, "request through the mesh", through)
	eventually(t, 10*time.Second, "both sidecars connected", func() error {
		if n := srv.metric(t, "sds_open_connections"); n != 2 {
			return fmt.Errorf("sds_open_connections = %v", n)
		}
		return nil
	})

	// 1. Idle TCP connections, 40 more than the limit leaves room for.
	const idleConns = maxConns - 2 + 40
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := 0; i < idleConns; i++ {
		c, err := net.DialTimeout("tcp", srv.addr, 2*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	eventually(t, 10*time.Second, "connections over the limit closed at once", func() error {
		if n := srv.metric(t, `sds_limit_rejections_total{limit="max_connections"}`); n < 40 {
			return fmt.Errorf("max_connections rejections = %v", n)
		}
		return nil
	})
	// While the listener is full: the mesh, the admin CLI and the metrics.
	if err := through(); err != nil {
		t.Fatalf("request through the mesh while the listener is full: %v", err)
	}
	if out := srv.cli(t, "token", "list"); !strings.Contains(out, "frontend") {
		t.Fatalf("token list while the listener is full: %q", out)
	}
	eventually(t, 10*time.Second, "idle TCP connections closed after the handshake timeout", func() error {
		if n := srv.metric(t, `sds_limit_rejections_total{limit="handshake_timeout"}`); n < maxConns-2 {
			return fmt.Errorf("handshake_timeout rejections = %v", n)
		}
		return nil
	})

	// 2. A burst of unauthenticated streams.
	logBefore := len(srv.out.String())
	conn, err := grpc.NewClient(srv.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true}))) // loopback test client
	if err != nil {
		t.Fatal(err)
	}
	const streams = 1000
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < streams/8; i++ {
				ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer SDSTKN-1-guess"), 5*time.Second)
				if s, err := secretservice.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx); err == nil {
					_, _ = s.Recv()
				}
				cancel()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	conn.Close()
	if err := through(); err != nil {
		t.Fatalf("request through the mesh after the flood: %v", err)
	}
	logBytes := len(srv.out.String()) - logBefore
	refused := srv.metric(t, `sds_authentication_failures_total{reason="malformed"}`) + srv.metric(t, `sds_limit_rejections_total{limit="auth_failure_rate"}`)
	t.Logf("%d unauthenticated streams in %s (%.0f/s): %v refused, %d log bytes", streams, elapsed.Round(time.Millisecond),
		float64(streams)/elapsed.Seconds(), refused, logBytes)
	if refused < streams {
		t.Fatalf("%v streams counted as refused, want %d", refused, streams)
	}
	if logBytes > 32<<10 {
		t.Fatalf("the flood wrote %d log bytes, want under 32 KiB:\n%s", logBytes, tail(srv.out.String(), 20))
	}

	// 3. The sidecars' connections outlive the idle timeout several times.
	time.Sleep(3 * idle) // nothing to poll: the assertion is that nothing happens
	if n := srv.metric(t, `sds_limit_rejections_total{limit="idle_connection"}`); n != 0 {
		t.Fatalf("idle_connection closures = %v, want 0: a sidecar with open streams was cut", n)
	}
	if n := srv.metric(t, "sds_connected_nodes"); n != 2 {
		t.Fatalf("sds_connected_nodes = %v, want 2", n)
	}
	if err := through(); err != nil {
		t.Fatalf("request through the mesh at the end: %v", err)
	}
}
