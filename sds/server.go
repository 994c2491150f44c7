// Package sds is sds-server's xDS server: it authenticates each Envoy stream
// with its bootstrap token, binds it to a node, issues the node's workload
// certificate and serves it, the trust bundle and (later) policy over SDS,
// ECDS and ADS, in both the state-of-the-world and the delta protocol, on
// go-control-plane's server.
package sds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extensionservice "github.com/envoyproxy/go-control-plane/envoy/service/extension/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/store"
)

// Secret names a sidecar may ask for (DESIGN.md "Secret names").
const (
	// SecretDefault is the stream's own certificate chain and private key.
	SecretDefault = "default"
	// SecretRootCA is the validation context: every trusted root.
	SecretRootCA = "ROOTCA"
)

// Config configures a Server.
type Config struct {
	TrustDomain string
	// CertTTL is the lifetime requested for workload certificates.
	CertTTL time.Duration
	Issuer  issuer.Issuer
	Tokens  *bootstrap.Registry
	Store   store.Store
	Metrics *Metrics
	Logger  *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Server is the xDS server. Create it with New, expose it with Serve.
type Server struct {
	cfg   Config
	log   *slog.Logger
	now   func() time.Time
	cache *resourceCache
	xds   serverv3.Server
	nodes *nodeRegistry

	rootCA atomic.Pointer[rootBundle]

	mu      sync.Mutex
	streams map[int64]*streamState
	live    map[string]*liveNode
}

// rootBundle is the current trust bundle and its encoded ROOTCA secret.
type rootBundle struct {
	roots []*x509.Certificate
	res   *resource
}

// streamState is what the server knows of one open stream.
type streamState struct {
	ctx      context.Context
	kind     string // ads, sds, ecds
	protocol string // sotw, delta
	peer     string
	token    bootstrap.Record
	node     *liveNode
	xdsNode  *core.Node
	unknown  map[string]bool // names already reported as not served
}

// liveNode is a node with its in-memory state: current certificate and open
// streams. Its mutex serialises issuance for the node only; no lock shared by
// several nodes is held across a CA call.
type liveNode struct {
	rec      Node
	identity issuer.Identity

	mu      sync.Mutex
	cert    *issuer.Certificate
	streams int
}

// New creates a Server and loads the issuer's trust bundle.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Issuer == nil || cfg.Tokens == nil || cfg.Store == nil || cfg.Metrics == nil {
		return nil, errors.New("sds: Issuer, Tokens, Store and Metrics are required")
	}
	if err := issuer.ValidateTrustDomain(cfg.TrustDomain); err != nil {
		return nil, err
	}
	if cfg.CertTTL <= 0 {
		cfg.CertTTL = issuer.DefaultTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger,
		now:     cfg.Now,
		cache:   newResourceCache(),
		nodes:   &nodeRegistry{kv: cfg.Store, now: cfg.Now},
		streams: make(map[int64]*streamState),
		live:    make(map[string]*liveNode),
	}
	if err := s.RefreshRoots(ctx); err != nil {
		return nil, err
	}
	s.xds = serverv3.NewServer(ctx, s.cache, callbacks{s})
	return s, nil
}

// Roots returns the current trust bundle; the first root is the one new
// bootstrap tokens pin.
func (s *Server) Roots() []*x509.Certificate { return s.rootCA.Load().roots }

// RefreshRoots reloads the trust bundle from the issuer and, if it changed,
// pushes the new ROOTCA to every node.
func (s *Server) RefreshRoots(ctx context.Context) error {
	roots, err := s.cfg.Issuer.Roots(ctx)
	if err != nil {
		return fmt.Errorf("load trust bundle from issuer: %w", err)
	}
	if len(roots) == 0 {
		return errors.New("issuer returned an empty trust bundle")
	}
	var bundle []byte
	for _, r := range roots {
		bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	res, err := newResource(SecretRootCA, &tlsv3.Secret{
		Name: SecretRootCA,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: bundle}},
		}},
	})
	if err != nil {
		return err
	}
	old := s.rootCA.Swap(&rootBundle{roots: roots, res: res})
	if old != nil && old.res.version == res.version {
		return nil
	}
	for _, id := range s.cache.nodeIDs() {
		s.cache.set(id, xdsres.SecretType, map[string]*resource{SecretRootCA: res})
	}
	return nil
}

// Register adds the SDS, ECDS and ADS services to g.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	secretservice.RegisterSecretDiscoveryServiceServer(g, s.xds)
	extensionservice.RegisterExtensionConfigDiscoveryServiceServer(g, s.xds)
}

// Serve serves xDS over TLS on lis until ctx ends, then stops gracefully
// (streams are cut after a grace period: Envoy reconnects elsewhere).
func (s *Server) Serve(ctx context.Context, lis net.Listener, tlsConf *tls.Config) error {
	g := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsConf)),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(1024),
	)
	s.Register(g)
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
			return
		}
		stopped := make(chan struct{})
		go func() { g.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			g.Stop()
		}
	}()
	err := g.Serve(lis)
	close(done)
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// authenticate checks the stream's bearer token.
func (s *Server) authenticate(ctx context.Context) (bootstrap.Record, error) {
	raw := bearerToken(ctx)
	rec, err := s.cfg.Tokens.Authenticate(ctx, raw, s.Roots())
	if err != nil {
		return bootstrap.Record{}, err
	}
	return rec, nil
}

// admit binds a stream to its node, admitting a new node if the token has
// not seen this sidecar before, and makes sure the node has a certificate.
func (s *Server) admit(st *streamState, claimed *core.Node) (*liveNode, error) {
	claimedID := claimed.GetId()
	if claimedID == "" || len(claimedID) > 256 {
		return nil, &refusal{code: codes.InvalidArgument, reason: "bad_node", msg: "node.id must be set (1-256 characters) in the Envoy bootstrap"}
	}
	ctx := st.ctx
	rec, created, err := s.nodes.bind(ctx, st.token.ID, claimedID, func() (*Node, error) {
		tok, err := s.cfg.Tokens.Admit(ctx, st.token.ID)
		if err != nil {
			return nil, err
		}
		id, err := newNodeID()
		if err != nil {
			return nil, err
		}
		now := s.now().UTC()
		return &Node{ID: id, Service: tok.Service, Env: tok.Env, TokenID: tok.ID, ClaimedID: claimedID,
			Status: NodeActive, FirstSeen: now, LastSeen: now}, nil
	})
	if err != nil {
		return nil, err
	}
	if rec.Status == NodeRevoked {
		return nil, &refusal{code: codes.PermissionDenied, reason: "node_revoked", msg: fmt.Sprintf("node %s has been revoked", rec.ID)}
	}
	if created {
		s.cfg.Metrics.nodesAdmitted.Inc()
		s.log.Info("node admitted", "node_id", rec.ID, "service", rec.Service, "env", rec.Env, "token_id", rec.TokenID, "peer", st.peer)
	}
	ln := s.liveNodeFor(rec)
	if err := s.ensureCertificate(ctx, ln); err != nil {
		return nil, &refusal{code: codes.Unavailable, reason: "", msg: fmt.Sprintf("no certificate for node %s yet: %v", rec.ID, err)}
	}
	return ln, nil
}

// liveNodeFor returns the in-memory node for rec, creating it.
func (s *Server) liveNodeFor(rec *Node) *liveNode {
	s.mu.Lock()
	defer s.mu.Unlock()
	ln := s.live[rec.ID]
	if ln == nil {
		ln = &liveNode{rec: *rec, identity: issuer.Identity{
			TrustDomain: s.cfg.TrustDomain, Env: rec.Env, Service: rec.Service, NodeID: rec.ID,
		}}
		s.live[rec.ID] = ln
		s.cache.set(rec.ID, xdsres.SecretType, map[string]*resource{SecretRootCA: s.rootCA.Load().res})
	}
	return ln
}

// reuseFraction is how much of its life a certificate must have left to be
// served again to a reconnecting sidecar instead of a fresh one.
const reuseFraction = 0.2

// ensureCertificate issues a certificate for the node unless it holds one
// with more than reuseFraction of its life left.
func (s *Server) ensureCertificate(ctx context.Context, ln *liveNode) error {
	ln.mu.Lock()
	defer ln.mu.Unlock()
	if c := ln.cert; c != nil && c.Leaf.NotAfter.Sub(s.now()) > time.Duration(float64(c.TTL)*reuseFraction) {
		return nil
	}
	return s.issueLocked(ctx, ln)
}

// issueLocked generates a key, has the issuer sign it and publishes the new
// secrets to the node's streams. ln.mu is held: it guards only this node.
func (s *Server) issueLocked(ctx context.Context, ln *liveNode) error {
	start := time.Now()
	cert, keyPEM, err := s.mint(ctx, ln.identity)
	s.cfg.Metrics.issueLatency.Observe(time.Since(start).Seconds())
	if err != nil {
		s.cfg.Metrics.certsIssued.WithLabelValues("failure").Inc()
		s.log.Error("certificate issuance failed", "node_id", ln.identity.NodeID, "service", ln.identity.Service, "env", ln.identity.Env, "error", err)
		return err
	}
	s.cfg.Metrics.certsIssued.WithLabelValues("success").Inc()
	spiffeID := ln.identity.SPIFFEID()
	def, err := newResource(SecretDefault, tlsSecret(SecretDefault, cert.ChainPEM, keyPEM))
	if err != nil {
		return err
	}
	alias, err := newResource(spiffeID, tlsSecret(spiffeID, cert.ChainPEM, keyPEM))
	if err != nil {
		return err
	}
	ln.cert = cert
	s.cache.set(ln.identity.NodeID, xdsres.SecretType, map[string]*resource{
		SecretDefault: def, spiffeID: alias, SecretRootCA: s.rootCA.Load().res,
	})
	serial := serialHex(cert.Leaf)
	if _, err := s.nodes.update(ctx, ln.identity.NodeID, func(n *Node) error {
		n.IssuedSerial, n.IssuedNotAfter = serial, cert.Leaf.NotAfter.UTC()
		n.LastSeen = s.now().UTC()
		return nil
	}); err != nil {
		s.log.Warn("could not record issued certificate", "node_id", ln.identity.NodeID, "error", err)
	}
	s.log.Info("certificate issued", "node_id", ln.identity.NodeID, "spiffe_id", spiffeID, "serial", serial,
		"not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339), "duration", time.Since(start))
	return nil
}

// mint creates a P-256 key and a CSR for id and has the issuer sign it.
func (s *Server) mint(ctx context.Context, id issuer.Identity) (*issuer.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	uri, err := url.Parse(id.SPIFFEID())
	if err != nil {
		return nil, nil, fmt.Errorf("SPIFFE ID %q: %w", id.SPIFFEID(), err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: id.NodeID, OrganizationalUnit: []string{id.Service}, Organization: []string{id.Env}},
		URIs:    []*url.URL{uri},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create CSR: %w", err)
	}
	cert, err := s.cfg.Issuer.Issue(ctx, issuer.Request{Identity: id, CSR: csr, TTL: s.cfg.CertTTL})
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode key: %w", err)
	}
	return cert, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func tlsSecret(name string, chainPEM, keyPEM []byte) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: chainPEM}},
			PrivateKey:       &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: keyPEM}},
		}},
	}
}

func serialHex(c *x509.Certificate) string { return fmt.Sprintf("%x", c.SerialNumber) }

// NodeList returns every node in the registry, oldest first.
func (s *Server) NodeList(ctx context.Context) ([]Node, error) { return s.nodes.list(ctx) }

// Ready reports whether the server can serve: it has a trust bundle.
// (Renewal health joins it with the rotation scheduler.)
func (s *Server) Ready(context.Context) error {
	if b := s.rootCA.Load(); b == nil || len(b.roots) == 0 {
		return errors.New("no trust bundle loaded")
	}
	return nil
}
