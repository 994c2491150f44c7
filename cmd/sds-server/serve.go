package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/meshid/sds-server/authz"
	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/issuer/stepca"
	"github.com/meshid/sds-server/sds"
	"github.com/meshid/sds-server/store"
)

// serverCertTTL is the lifetime of the SDS listener's own certificate; it is
// renewed in process after two thirds of it.
const serverCertTTL = 30 * 24 * time.Hour

// policyPoll is how often policy_dir is checked for changes: a valid edit
// reaches the sidecars within about this long.
const policyPoll = 250 * time.Millisecond

func newServeCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the SDS server (built-in CA, bbolt state, SDS on 127.0.0.1:8443 by default)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			if err := cfg.validate(); err != nil {
				return err
			}
			return serve(cmd.Context(), cfg, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.String("listen-addr", "127.0.0.1:8443", "SDS gRPC listen address, TLS (SDS_LISTEN_ADDR)")
	f.String("metrics-addr", "127.0.0.1:9102", "metrics and health listen address; empty disables (SDS_METRICS_ADDR)")
	f.Duration("cert-ttl", time.Hour, "workload certificate lifetime (SDS_CERT_TTL)")
	f.String("renew-window", "0.5-0.8", "renew certificates at a random point in this part of their life (SDS_RENEW_WINDOW)")
	f.String("default-policy", "deny", "policy of services without an ACL file: deny or allow (SDS_DEFAULT_POLICY)")
	f.Duration("crl-period", sds.DefaultCRLPeriod, "validity of each signed revocation list; re-signed at half of it (SDS_CRL_PERIOD)")
	f.Bool("allow-short-ttl", false, "allow cert-ttl under 5m: tests and demos only (SDS_ALLOW_SHORT_TTL)")
	f.String("policy-dir", "", "ACL policy directory (SDS_POLICY_DIR; default <data-dir>/policies)")
	f.StringSlice("server-names", []string{"localhost", "127.0.0.1", "::1"}, "DNS names and IPs in the SDS server certificate (SDS_SERVER_NAMES)")
	return cmd
}

func newLogger(w io.Writer, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log_level %q: use debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

// prepareDataDir creates the data directory (0700) or checks the existing one.
func prepareDataDir(dir string) error {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create data dir %s: %w", dir, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("data dir %s: %w", dir, err)
	case !fi.IsDir():
		return fmt.Errorf("data dir %s: not a directory", dir)
	}
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("data dir %s: %w", dir, err)
	}
	_, err = f.Readdirnames(1)
	f.Close()
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("data dir %s: %w", dir, err)
	}
	return nil
}

func serve(ctx context.Context, cfg *config, stdout, stderr io.Writer) error {
	log, err := newLogger(stderr, cfg.LogLevel)
	if err != nil {
		return err
	}
	if err := prepareDataDir(cfg.DataDir); err != nil {
		return err
	}
	if err := securePermissions(log, cfg.DataDir); err != nil {
		return err
	}
	kv, err := store.OpenBolt(filepath.Join(cfg.DataDir, "state.db"))
	if err != nil {
		return err
	}
	defer kv.Close()
	lifecycle := newCALifecycle(log)
	ca, caDesc, err := openIssuer(ctx, cfg, log, lifecycle.observe)
	if err != nil {
		return err
	}
	if l, ok := ca.(*local.CA); ok {
		warnTrustDomainChange(log, l.Root(), filepath.Join(cfg.DataDir, "ca"), cfg.TrustDomain)
	}

	window, err := sds.ParseRenewWindow(cfg.RenewWindow)
	if err != nil {
		return err
	}
	defPolicy := authz.DenyAll()
	if cfg.DefaultPolicy == "allow" {
		if defPolicy, err = authz.AllowAll(cfg.TrustDomain); err != nil {
			return err
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), sds.BuildInfo(version))
	limits := cfg.Limits.sds()
	limits.MaxConnections = fitConnections(limits.MaxConnections, log)
	srv, err := sds.New(ctx, sds.Config{
		TrustDomain:   cfg.TrustDomain,
		CertTTL:       cfg.CertTTL,
		RenewWindow:   window,
		CRLPeriod:     cfg.CRLPeriod,
		DefaultPolicy: defPolicy,
		Issuer:        ca,
		Tokens:        bootstrap.NewRegistry(kv, time.Now),
		Store:         kv,
		Metrics:       sds.NewMetrics(reg),
		Logger:        log,
		Limits:        limits,
		RootsRefresh:  cfg.CA.RootsRefresh,
	})
	if err != nil {
		return err
	}
	if err := srv.WatchPolicies(ctx, cfg.PolicyDir, cfg.DefaultPolicy, policyPoll); err != nil {
		return err
	}
	servingCert, err := sds.NewServingCert(func() (tls.Certificate, error) {
		return ca.ServerCertificate(cfg.ServerNames, serverCertTTL)
	}, nil)
	if err != nil {
		return err
	}
	if sc, ok := ca.(*stepca.Issuer); ok {
		followStepCAIntermediate(ctx, log, sc, servingCert, srv)
	}
	localCA, isLocal := ca.(*local.CA)
	if isLocal {
		reg.MustRegister(lifecycle.renewals)
		lifecycle.srv, lifecycle.servingCert = srv, servingCert
	}

	sdsLis, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("listen_addr %s: %w", cfg.ListenAddr, err)
	}
	adminLis, err := listenUnix(cfg.AdminSocket)
	if err != nil {
		sdsLis.Close()
		return err
	}
	var metricsLis net.Listener
	if cfg.MetricsAddr != "" {
		if metricsLis, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			sdsLis.Close()
			adminLis.Close()
			return fmt.Errorf("metrics_addr %s: %w", cfg.MetricsAddr, err)
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if isLocal {
		go localCA.Run(ctx) // the intermediate renews itself (califecycle.go)
		rot, err := sds.NewRotationDriver(srv, localCA, 0, servingCert.RenewSoon)
		if err != nil {
			return err
		}
		go rot.Run(ctx) // root rotation, when an operator starts one (sds-server ca rotate)
	}
	errc := make(chan error, 3)
	go func() { errc <- srv.Serve(ctx, sdsLis, servingCert.TLSConfig()) }()
	go func() { errc <- serveHTTP(ctx, adminLis, srv.AdminHandler()) }()
	running := 2
	if metricsLis != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
			if err := srv.Ready(r.Context()); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ready")
		})
		go func() { errc <- serveHTTP(ctx, metricsLis, mux) }()
		running++
	}

	fmt.Fprintf(stdout, "sds-server %s serving\n  sds:     %s (TLS, trust domain %s)\n  admin:   %s\n", version, sdsLis.Addr(), cfg.TrustDomain, cfg.AdminSocket)
	if metricsLis != nil {
		fmt.Fprintf(stdout, "  metrics: http://%s/metrics (health: /healthz, /readyz)\n", metricsLis.Addr())
	}
	fmt.Fprintf(stdout, "  data:    %s (%s)\n", cfg.DataDir, caDesc)
	log.Info("serving", "listen_addr", sdsLis.Addr().String(), "metrics_addr", cfg.MetricsAddr, "admin_socket", cfg.AdminSocket, "data_dir", cfg.DataDir)

	var firstErr error
	for i := 0; i < running; i++ {
		if err := <-errc; err != nil && firstErr == nil {
			firstErr = err
			cancel()
		}
		cancel()
	}
	_ = os.Remove(cfg.AdminSocket)
	log.Info("stopped")
	return firstErr
}

// certAuthority is what serve needs of a CA backend: workload certificates
// and the SDS listener's own certificate, chaining to the same root.
type certAuthority interface {
	issuer.Issuer
	ServerCertificate(hosts []string, ttl time.Duration) (tls.Certificate, error)
}

// openIssuer opens the configured CA backend and describes it in a line;
// waits for step-ca are logged to log, and the built-in CA logs its
// lifecycle there and reports it to observe.
func openIssuer(ctx context.Context, cfg *config, log *slog.Logger, observe func(local.Event)) (certAuthority, string, error) {
	if cfg.CA.Backend == backendStepCA {
		c := cfg.CA
		log.Info("connecting to step-ca", "url", c.URL, "provisioner", c.Provisioner)
		ca, err := stepca.Open(ctx, stepca.Options{
			Logger: log,
			URL:    c.URL, RootFingerprint: c.RootFingerprint, RootFile: c.RootFile,
			Provisioner: c.Provisioner, KeyFile: c.KeyFile, PasswordFile: c.PasswordFile,
			TrustDomain: cfg.TrustDomain, TTL: cfg.CertTTL, AllowShortTTL: cfg.AllowShortTTL,
			StateFile: filepath.Join(cfg.DataDir, "stepca-roots.json"),
		})
		if err != nil {
			return nil, "", err
		}
		return ca, fmt.Sprintf("CA: step-ca at %s, provisioner %s, root sha256 %x", c.URL, c.Provisioner, sha256.Sum256(ca.Root().Raw)), nil
	}
	dir := filepath.Join(cfg.DataDir, "ca")
	ca, err := local.Open(ctx, dir, local.Options{TrustDomain: cfg.TrustDomain, AllowShortTTL: cfg.AllowShortTTL,
		IntermediateTTL: cfg.CA.IntermediateTTL, IntermediateRenewBefore: cfg.CA.IntermediateRenewBefore,
		Logger: log, Observe: observe})
	if err != nil {
		return nil, "", err
	}
	return ca, "CA in " + dir, nil
}

// listenUnix listens on the admin socket, readable and writable by the
// server's user only. A stale socket left by a crash is replaced; a live one
// means another server owns this data dir.
func listenUnix(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s is in use: is another sds-server running on this data dir?", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	if len(path) > 104 && !strings.HasPrefix(path, "@") {
		return nil, fmt.Errorf("admin socket path %s is too long for a Unix socket (%d bytes); set admin_socket to a shorter path", path, len(path))
	}
	old := syscallUmask(0o177)
	lis, err := net.Listen("unix", path)
	syscallUmask(old)
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		lis.Close()
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	return lis, nil
}

func serveHTTP(ctx context.Context, lis net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
