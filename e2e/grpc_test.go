package e2e

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// TestGRPCThroughMesh calls a gRPC service (plaintext HTTP/2 from the app,
// as emojivoto's web calls its backends) through frontend's and backend's
// sidecars: the sidecars carry HTTP/2 end to end, and the backend's ACL
// matches the gRPC method path.
func TestGRPCThroughMesh(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	policyDir := filepath.Join(t.TempDir(), "policies")
	writeFile(t, filepath.Join(policyDir, "default", "backend.json"),
		`[{"permission": {"method": "POST", "resource": "/grpc.health.v1.Health/Check"}, "allow": ["frontend"]}]`)
	srv := startServer(t, bin, "--policy-dir", policyDir, "--default-policy", "deny")

	// The backend app is a gRPC server; its sidecar forwards to it.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("emoji", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(g, hs)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	backend := startSidecarWith(t, srv, envoyBin, sidecarOpts{service: "backend", nodeID: "backend-1",
		appPort: lis.Addr().(*net.TCPAddr).Port})
	frontend := startSidecarWith(t, srv, envoyBin, sidecarOpts{service: "frontend", nodeID: "frontend-1",
		routes: []route{{"backend", backend}}})

	conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", frontend.out["backend"]), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	eventually(t, 20*time.Second, "gRPC Check through the mesh", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "emoji"})
		if err != nil {
			return err
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("status %v", resp.GetStatus())
		}
		return nil
	})
	// A method the ACL does not list is refused by the backend's sidecar.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = client.List(ctx, &healthpb.HealthListRequest{})
	if st, _ := status.FromError(err); st.Code() != codes.PermissionDenied {
		t.Fatalf("List, not in the ACL: %v, want the RBAC denial", err)
	} else {
		t.Logf("List refused: %v", err)
	}
}
