package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
		Use:   "envoy --server HOST:PORT --token-file FILE --service-port PORT --listen [HOST:]PORT [--upstream NAME=SERVICE@HOST:PORT,LOCAL_PORT ...]",
		Short: "Print an Envoy bootstrap for a sidecar, after checking the server's root CA against the token",
		Long: `Downloads the server's root CA without trusting the channel, refuses it unless its
SHA-256 matches the digest inside the token, and prints an Envoy bootstrap (YAML) with
an inbound mTLS listener in front of the local app, one outbound listener per upstream,
and an ADS connection to the server pinned to that root and carrying the token.

The trust domain is the one in the server's own certificate (spiffe://<trust
domain>/sds-server), verified under that root; a --trust-domain (or SDS_TRUST_DOMAIN,
or trust_domain in --config) that disagrees is refused and nothing is written.

The token comes from exactly one of --token-file, $SDS_TOKEN and --token (which every
local user can read in the process list). The bootstrap holds the token: with the node
id, it is the node's identity, private key included, for as long as the token or the
node is admitted. It is written with mode 0600 (-o FILE, or stdout redirected to a
file, which is made 0600 first). Envoy's admin interface shows the token too
(/config_dump), so by default it listens on a Unix socket with mode 0600 next to the
output: <dir of -o>/<name of -o without extension>.admin.sock, or ./envoy.admin.sock
when printing to stdout (always an absolute path). A TCP admin address must be loopback
unless --admin-insecure is given.`,
		Args: cobra.NoArgs,
		RunE: runBootstrapEnvoy,
	}
	f := envoy.Flags()
	f.String("server", "", "sds-server address HOST:PORT (required)")
	addTokenFlags(envoy)
	f.Int("service-port", 0, "port of the local app on 127.0.0.1 (required)")
	f.String("listen", "", "inbound listener [HOST:]PORT; HOST defaults to 0.0.0.0 (required)")
	f.StringArray("upstream", nil, "outbound route NAME=SERVICE@HOST:PORT,LOCAL_PORT; SERVICE may be ENV/SERVICE (repeatable)")
	f.String("env", "default", "environment of upstream services given without one")
	f.String("node-id", "", "Envoy node.id (default: a random sidecar-<hex>)")
	f.String("cluster", "sidecar", "Envoy node.cluster")
	f.String("admin", "", "Envoy admin interface: unix:/ABS/PATH (a 0600 socket), IP:PORT (TCP, loopback only), or none (default: unix:<dir of -o>/<name>.admin.sock, see above)")
	f.Bool("admin-insecure", false, "allow a non-loopback TCP --admin: whoever reaches it can take the node's identity")
	f.Duration("max-connection-duration", 10*time.Minute, "upper bound on the life of pooled upstream connections, so an old client certificate leaves the pool")
	f.Int64("max-downstream-connections", bootstrap.DefaultMaxDownstreamConnections, "limit on the sidecar's active downstream connections (Envoy's overload manager); beyond it new connections are refused")
	f.String("access-log", "", "write Envoy's access log (one line per request: code, flags, RBAC details, peer SPIFFE ID, path) to this file")
	f.StringP("output", "o", "", "write the bootstrap to this file (mode 0600: it holds the token) instead of stdout")
	f.Duration("timeout", 10*time.Second, "time allowed to fetch the root CA")
	cmd.AddCommand(envoy)
	return cmd
}

func runBootstrapEnvoy(cmd *cobra.Command, _ []string) error {
	f := cmd.Flags()
	server, _ := f.GetString("server")
	servicePort, _ := f.GetInt("service-port")
	listen, _ := f.GetString("listen")
	ups, _ := f.GetStringArray("upstream")
	env, _ := f.GetString("env")
	nodeID, _ := f.GetString("node-id")
	cluster, _ := f.GetString("cluster")
	admin, _ := f.GetString("admin")
	adminInsecure, _ := f.GetBool("admin-insecure")
	mcd, _ := f.GetDuration("max-connection-duration")
	maxConns, _ := f.GetInt64("max-downstream-connections")
	accessLog, _ := f.GetString("access-log")
	output, _ := f.GetString("output")
	timeout, _ := f.GetDuration("timeout")
	switch {
	case server == "":
		return usageError{fmt.Errorf("--server is required")}
	case servicePort == 0:
		return usageError{fmt.Errorf("--service-port is required")}
	case listen == "":
		return usageError{fmt.Errorf("--listen is required")}
	case maxConns < 1:
		return usageError{fmt.Errorf("--max-downstream-connections %d: want at least 1", maxConns)}
	}
	if accessLog != "" {
		// Envoy opens a relative path from its own working directory.
		abs, err := filepath.Abs(accessLog)
		if err != nil {
			return fmt.Errorf("--access-log %q: %w", accessLog, err)
		}
		accessLog = abs
	}
	tokText, tokSource, err := readToken(cmd)
	if err != nil {
		return err
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
		return fmt.Errorf("%s: %w", tokSource, err)
	}
	adminSocket, adminAddr, err := adminSetting(admin, output, adminInsecure)
	if err != nil {
		return err
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
	if output == "" {
		// Before anything is fetched: refuse early if stdout is a file
		// that would leak the token.
		if err := privateStdout(cmd.OutOrStdout()); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
	defer cancel()
	tdSource, err := trustDomainSource(cmd)
	if err != nil {
		return err
	}
	srv, err := bootstrap.FetchServer(ctx, server, tok)
	if err != nil {
		return err
	}
	trustDomain, err := bootstrapTrustDomain(srv, server, cfg.TrustDomain, tdSource)
	if err != nil {
		return err
	}
	out, err := bootstrap.RenderEnvoy(bootstrap.EnvoyOptions{
		NodeID: nodeID, Cluster: cluster, Server: server, Token: tokText, RootPEM: srv.RootPEM,
		TrustDomain: trustDomain, Env: env, ListenAddr: listen, ServicePort: servicePort,
		Upstreams: upstreams, AdminSocket: adminSocket, AdminAddr: adminAddr, AllowInsecureAdmin: adminInsecure,
		MaxConnectionDuration: mcd, MaxDownstreamConnections: maxConns, AccessLog: accessLog,
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

// adminSetting turns --admin into the bootstrap's admin socket or address:
// "" is the default socket next to the output, "none" no admin interface,
// "unix:PATH" a socket, anything else a TCP HOST:PORT, which must be
// loopback unless insecure.
func adminSetting(admin, output string, insecure bool) (socket, addr string, err error) {
	switch {
	case admin == "":
		if socket, err = defaultAdminSocket(output); err == nil {
			err = bootstrap.CheckAdminSocket(socket)
		}
		if err != nil {
			return "", "", fmt.Errorf("default admin socket: %w; give --admin unix:PATH", err)
		}
		return socket, "", nil
	case admin == "none":
		return "", "", nil
	case strings.HasPrefix(admin, "unix:"):
		socket = strings.TrimPrefix(admin, "unix:")
		if err := bootstrap.CheckAdminSocket(socket); err != nil {
			return "", "", fmt.Errorf("--admin: %w", err)
		}
		return socket, "", nil
	}
	if _, _, err := bootstrap.CheckAdminAddr(admin, insecure); err != nil {
		if errors.Is(err, bootstrap.ErrAdminNotLoopback) {
			return "", "", fmt.Errorf("--admin: %w; use --admin unix:PATH (the default) or a loopback address, or give --admin-insecure to accept that", err)
		}
		return "", "", fmt.Errorf("--admin: %w (want unix:/ABS/PATH, IP:PORT or none)", err)
	}
	return "", admin, nil
}

// defaultAdminSocket is the absolute path of the admin socket beside the
// bootstrap: FILE.yaml gets FILE.admin.sock; stdout gets
// ./envoy.admin.sock.
func defaultAdminSocket(output string) (string, error) {
	dir, name := ".", "envoy"
	if output != "" {
		dir = filepath.Dir(output)
		if n := strings.TrimSuffix(filepath.Base(output), filepath.Ext(output)); n != "" && n != "." {
			name = n
		}
	}
	return filepath.Abs(filepath.Join(dir, name+".admin.sock"))
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
