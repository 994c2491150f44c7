package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/sds-server/bootstrap"
)

func newBootstrapCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bootstrap",
		Short: "Generate sidecar bootstraps",
		Args:  cobra.NoArgs,
	}
	envoy := &cobra.Command{
		Use:   "envoy --server HOST:PORT --token T --service-port PORT --listen [HOST:]PORT [--upstream NAME=SERVICE@HOST:PORT,LOCAL_PORT ...]",
		Short: "Print an Envoy bootstrap for a sidecar, after checking the server's root CA against the token",
		Long: `Downloads the server's root CA without trusting the channel, refuses it unless its
SHA-256 matches the digest inside the token, and prints an Envoy bootstrap (YAML) with
an inbound mTLS listener in front of the local app, one outbound listener per upstream,
and an ADS connection to the server pinned to that root and carrying the token.`,
		Args: cobra.NoArgs,
		RunE: runBootstrapEnvoy,
	}
	f := envoy.Flags()
	f.String("server", "", "sds-server address HOST:PORT (required)")
	f.String("token", "", "bootstrap token (required; or SDS_TOKEN)")
	f.Int("service-port", 0, "port of the local app on 127.0.0.1 (required)")
	f.String("listen", "", "inbound listener [HOST:]PORT; HOST defaults to 0.0.0.0 (required)")
	f.StringArray("upstream", nil, "outbound route NAME=SERVICE@HOST:PORT,LOCAL_PORT; SERVICE may be ENV/SERVICE (repeatable)")
	f.String("env", "default", "environment of upstream services given without one")
	f.String("node-id", "", "Envoy node.id (default: a random sidecar-<hex>)")
	f.String("cluster", "sidecar", "Envoy node.cluster")
	f.String("admin", "", "Envoy admin listener HOST:PORT (default: none)")
	f.Duration("max-connection-duration", 10*time.Minute, "upper bound on the life of pooled upstream connections, so an old client certificate leaves the pool")
	f.StringP("output", "o", "", "write the bootstrap to this file (mode 0600: it holds the token) instead of stdout")
	f.Duration("timeout", 10*time.Second, "time allowed to fetch the root CA")
	cmd.AddCommand(envoy)
	return cmd
}

func runBootstrapEnvoy(cmd *cobra.Command, _ []string) error {
	f := cmd.Flags()
	server, _ := f.GetString("server")
	tokText, _ := f.GetString("token")
	if tokText == "" {
		tokText = os.Getenv("SDS_TOKEN")
	}
	servicePort, _ := f.GetInt("service-port")
	listen, _ := f.GetString("listen")
	ups, _ := f.GetStringArray("upstream")
	env, _ := f.GetString("env")
	nodeID, _ := f.GetString("node-id")
	cluster, _ := f.GetString("cluster")
	admin, _ := f.GetString("admin")
	mcd, _ := f.GetDuration("max-connection-duration")
	output, _ := f.GetString("output")
	timeout, _ := f.GetDuration("timeout")
	switch {
	case server == "":
		return usageError{fmt.Errorf("--server is required")}
	case tokText == "":
		return usageError{fmt.Errorf("--token is required")}
	case servicePort == 0:
		return usageError{fmt.Errorf("--service-port is required")}
	case listen == "":
		return usageError{fmt.Errorf("--listen is required")}
	}
	if _, err := strconv.Atoi(listen); err == nil {
		listen = net.JoinHostPort("0.0.0.0", listen)
	}
	cfg, err := loadConfig(cmd)
	if err != nil {
		return err
	}
	tok, err := bootstrap.Parse(tokText)
	if err != nil {
		return fmt.Errorf("--token: %w", err)
	}
	var upstreams []bootstrap.Upstream
	for _, u := range ups {
		up, err := bootstrap.ParseUpstream(u, env)
		if err != nil {
			return fmt.Errorf("--upstream %q: %w", u, err)
		}
		upstreams = append(upstreams, up)
	}
	if nodeID == "" {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return err
		}
		nodeID = "sidecar-" + hex.EncodeToString(b[:])
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
	defer cancel()
	_, rootPEM, err := bootstrap.FetchRoot(ctx, server, tok)
	if err != nil {
		return err
	}
	out, err := bootstrap.RenderEnvoy(bootstrap.EnvoyOptions{
		NodeID: nodeID, Cluster: cluster, Server: server, Token: tokText, RootPEM: rootPEM,
		TrustDomain: cfg.TrustDomain, Env: env, ListenAddr: listen, ServicePort: servicePort,
		Upstreams: upstreams, AdminAddr: admin, MaxConnectionDuration: mcd,
	})
	if err != nil {
		return err
	}
	if output == "" {
		_, err := cmd.OutOrStdout().Write(out)
		return err
	}
	return writeFileAtomic(output, out, 0o600)
}

// writeFileAtomic writes data to path through a temporary file and a rename,
// so a failure leaves nothing half written.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
