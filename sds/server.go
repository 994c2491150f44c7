// Package sds is sds-server's xDS server: it authenticates each Envoy stream
// with its bootstrap token, binds it to a node, issues and renews the node's
// workload certificate, and serves it, the trust bundle with the CRL, the
// node's service ACL and the revoked-certificates deny list over SDS, ECDS
// and ADS, in both the state-of-the-world and the delta protocol, on
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
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
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
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/authz"
	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/store"
)

// Secret names a sidecar may ask for (DESIGN.md "Secret names"), the same
// the generated bootstraps use.
const (
	// SecretDefault is the stream's own certificate chain and private key.
	SecretDefault = bootstrap.SecretDefault
	// SecretRootCA is the validation context: every trusted root and the CRL.
	SecretRootCA = bootstrap.SecretRootCA
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
	// RenewWindow is where in a certificate's life it is renewed; zero
	// means DefaultRenewWindow.
	RenewWindow RenewWindow
	// IssueTimeout bounds one issuance (key generation and CA call); zero
	// means 15 s.
	IssueTimeout time.Duration
	// RenewWorkers is how many renewals run at once; zero means 2×CPUs.
	RenewWorkers int
	// RootsRefresh is how often the trust bundle is re-read from the
	// issuer; zero means one minute.
	RootsRefresh time.Duration
	// DefaultPolicy is the RBAC filter of services without a policy; nil
	// means authz.DenyAll.
	DefaultPolicy *rbacv3.RBAC
	// CRLPeriod is how long a signed revocation list is valid; it is
	// re-signed at half of it. Zero means DefaultCRLPeriod.
	CRLPeriod time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Limits bound what clients can make the server hold (limits.go); zero
	// fields take DefaultLimits.
	Limits Limits
}

// Server is the xDS server. Create it with New, expose it with Serve.
type Server struct {
	cfg   Config
	log   *slog.Logger
	now   func() time.Time
	cache *resourceCache
	xds   serverv3.Server
	nodes *nodeRegistry
	sched *scheduler
	draw  *spreader

	rootCA atomic.Pointer[rootBundle]
	// bundles tracks the trust bundle each node ACKed (bundleack.go).
	bundles *bundleAcks
	// rotation drives the built-in CA's root rotation (carotation.go);
	// nil with another CA.
	rotation atomic.Pointer[RotationDriver]
	pubMu    sync.Mutex // serialises pushes of shared resources (ROOTCA, policies, deny list)
	// policies are the encoded ACL filters; revokedRes the deny list.
	policies    atomic.Pointer[policySet]
	policyWatch atomic.Pointer[policyWatcher]
	revokedRes  atomic.Pointer[resource]
	crlMu       sync.Mutex // serialises CRL signing
	// lastRevocationRefresh is when refreshCRL last succeeded (UnixNano);
	// zero after a failure, so that crlLoop retries at its next tick.
	lastRevocationRefresh atomic.Int64
	// revokerCRLFailedAt is when fetching the CRL of an issuer.Revoker last
	// failed (UnixNano), zero once it succeeds: crlLoop retries it sooner.
	revokerCRLFailedAt atomic.Int64
	lim                *limitState // connection, stream and log limits (limits.go)

	mu      sync.Mutex
	streams map[int64]*streamState
	live    map[string]*liveNode
	// revokedTokens are the tokens revoked since the server started
	// (tokenrevoke.go): a node bound after the revocation by a stream
	// authenticated before it gets no certificate.
	revokedTokens map[string]struct{}
}

// rootBundle is the current trust bundle, revocation list and the encoded
// ROOTCA secret carrying both.
type rootBundle struct {
	roots   []*x509.Certificate
	version string // BundleVersion(roots)
	crl     *issuer.CRL
	res     *resource
}

// streamState is what the server knows of one open stream.
type streamState struct {
	ctx      context.Context
	kind     string // ads, sds, ecds
	protocol string // sotw, delta
	peer     string
	token    bootstrap.Record
	// staleRoot is set when the token pins a root no longer trusted: the
	// refusal any admission of a node with it gets.
	staleRoot *bootstrap.AuthError
	node      *liveNode
	xdsNode   *core.Node
	unknown   map[string]bool // names already reported as not served
	pending   []sentCert      // responses carrying a certificate, not yet ACKed
	end       func(error)     // ends the stream with a cause (endStreamWith)
	names     streamNames     // names subscribed (delta), bounded by Limits
}

// liveNode is a node with its in-memory state: current certificate, open
// streams, renewal schedule and what Envoy loaded. Its mutex serialises
// issuance for the node only; no lock shared by several nodes is held across
// a CA call.
type liveNode struct {
	rec      Node
	identity issuer.Identity

	mu      sync.Mutex // serialises issuance
	cur     atomic.Pointer[certState]
	revoked atomic.Bool
	// tokenRevoked is set when the token that admitted the node is
	// revoked: it gets no further certificate (tokenrevoke.go).
	tokenRevoked atomic.Bool

	streams   int       // guarded by Server.mu
	idleSince time.Time // when streams last dropped to 0; guarded by Server.mu
	conns     connSet   // open connections by peer (shared.go); guarded by Server.mu
	seen      lastSeen  // when last heard from (lastseen.go)

	due       time.Time // guarded by scheduler.mu
	heapIndex int       // position in the scheduler's heap, -1 if not scheduled

	// forceRenew makes the next scheduled renewal issue even if the
	// certificate is not due (a root rotation re-issues every one).
	forceRenew atomic.Bool

	hmu      sync.Mutex // guards the renewal health and serving fields
	failures int        // consecutive failed renewals
	lastErr  string
	serving  *certState // the certificate Envoy last ACKed
}

// certState is one issued certificate with the encoded secrets carrying it.
// It is immutable once published.
type certState struct {
	cert    *issuer.Certificate
	serial  string
	renewAt time.Time
	secrets []*resource // default and the SPIFFE alias
	prev    *certState  // the previous generation, to attribute late ACKs
}

// issuedBy returns the certificate generation (current or previous) whose
// secret is a, if any.
func (c *certState) issuedBy(a *anypb.Any) *certState {
	for cs := c; cs != nil; cs = cs.prev {
		for _, r := range cs.secrets {
			if r.any == a {
				return cs
			}
		}
	}
	return nil
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
	if cfg.RenewWindow == (RenewWindow{}) {
		cfg.RenewWindow = DefaultRenewWindow
	}
	if err := cfg.RenewWindow.Validate(); err != nil {
		return nil, err
	}
	if cfg.IssueTimeout <= 0 {
		cfg.IssueTimeout = 15 * time.Second
	}
	if cfg.RenewWorkers <= 0 {
		cfg.RenewWorkers = 2 * runtime.GOMAXPROCS(0)
	}
	if cfg.RootsRefresh <= 0 {
		cfg.RootsRefresh = time.Minute
	}
	if cfg.CRLPeriod <= 0 {
		cfg.CRLPeriod = DefaultCRLPeriod
	}
	if cfg.DefaultPolicy == nil {
		cfg.DefaultPolicy = authz.DenyAll()
	}
	cfg.Limits = cfg.Limits.WithDefaults()
	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger,
		now:     cfg.Now,
		cache:   newResourceCache(),
		nodes:   &nodeRegistry{kv: cfg.Store, now: cfg.Now},
		streams: make(map[int64]*streamState),
		live:    make(map[string]*liveNode),
		draw:    newSpreader(),
		bundles: newBundleAcks(),
	}
	s.lim = newLimitState(s)
	s.sched = newScheduler(cfg.Now, s.renew)
	if err := s.SetPolicies(nil, cfg.DefaultPolicy); err != nil {
		return nil, fmt.Errorf("default policy: %w", err)
	}
	if err := s.RefreshRoots(ctx); err != nil {
		return nil, err
	}
	if err := s.refreshCRL(ctx); err != nil {
		return nil, err
	}
	if err := cfg.Metrics.registerServer(s); err != nil {
		return nil, err
	}
	s.xds = serverv3.NewServer(ctx, s.cache, callbacks{s})
	go s.sched.run(ctx, cfg.RenewWorkers)
	go s.refreshRootsLoop(ctx)
	go s.crlLoop(ctx)
	go s.runLimits(ctx)
	return s, nil
}

// refreshRootsLoop re-reads the trust bundle periodically, so a root added
// or removed in the issuer reaches every sidecar as a new ROOTCA.
func (s *Server) refreshRootsLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.RootsRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			rctx, cancel := context.WithTimeout(ctx, s.cfg.IssueTimeout)
			if err := s.RefreshRoots(rctx); err != nil {
				s.log.Warn("trust bundle refresh failed; keeping the current one", "error", err)
			}
			cancel()
			s.logTrustRollout()
			s.sweepIdle(2 * s.cfg.RootsRefresh)
		}
	}
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
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	var crl *issuer.CRL
	if b := s.rootCA.Load(); b != nil {
		crl = b.crl
	}
	return s.publishRootCA(roots, crl)
}

// publishRootCA builds the ROOTCA secret from the trust bundle and the CRL
// and pushes it to every node if it changed. Callers hold pubMu.
func (s *Server) publishRootCA(roots []*x509.Certificate, crl *issuer.CRL) error {
	var bundle []byte
	for _, r := range roots {
		bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	vc := &tlsv3.CertificateValidationContext{
		TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: bundle}},
	}
	if crl != nil {
		// The list is signed by the CA that issues the leaves; the root
		// and intermediate have none, so only leaves are checked (Envoy
		// otherwise wants a list for every CA in the chain).
		vc.Crl = &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: crl.PEM}}
		vc.OnlyVerifyLeafCertCrl = true
	}
	res, err := newResource(SecretRootCA, &tlsv3.Secret{
		Name: SecretRootCA,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: vc},
	})
	if err != nil {
		return err
	}
	version := BundleVersion(roots)
	s.bundles.published(res, version)
	old := s.rootCA.Swap(&rootBundle{roots: roots, version: version, crl: crl, res: res})
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
	e := endable{s.xds}
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, adsService{e})
	secretservice.RegisterSecretDiscoveryServiceServer(g, sdsService{e})
	extensionservice.RegisterExtensionConfigDiscoveryServiceServer(g, ecdsService{e})
}

// Serve serves xDS over TLS on lis until ctx ends, then stops gracefully
// (streams are cut after a grace period: Envoy reconnects elsewhere).
func (s *Server) Serve(ctx context.Context, lis net.Listener, tlsConf *tls.Config) error {
	g := grpc.NewServer(append([]grpc.ServerOption{
		grpc.Creds(handshakeLogger{credentials.NewTLS(tlsConf), s}),
		// MaxConnectionIdle closes connections with no stream (limits.go).
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, MaxConnectionIdle: s.cfg.Limits.IdleTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(1024),
	}, append(s.grpcLimitOptions(), connMemoryOptions()...)...)...)
	lis = s.limitListener(lis)
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

// authenticate checks the stream's bearer token. A token of this server
// pinning a root no longer in the bundle (created before a root rotation)
// is accepted with stale set to the refusal it gets if it tries to admit a
// node: the sidecars it admitted keep reconnecting (see staleroot.go).
func (s *Server) authenticate(ctx context.Context) (rec bootstrap.Record, stale *bootstrap.AuthError, err error) {
	raw := bearerToken(ctx)
	rec, err = s.cfg.Tokens.Authenticate(ctx, raw, s.Roots())
	if ae, ok := bootstrap.AsAuthError(err); ok && ae.Reason == bootstrap.ReasonWrongRoot {
		return s.authenticateStale(ctx, raw, ae)
	}
	if err != nil {
		return bootstrap.Record{}, nil, err
	}
	return rec, nil, nil
}

// admit binds a stream to its node, admitting a new node if the token has
// not seen this sidecar before, and makes sure the node has a certificate.
func (s *Server) admit(st *streamState, claimed *core.Node) (*liveNode, error) {
	claimedID := claimed.GetId()
	if claimedID == "" || len(claimedID) > 256 {
		return nil, &refusal{code: codes.InvalidArgument, reason: "bad_node", msg: "node.id must be set (1-256 characters) in the Envoy bootstrap"}
	}
	ctx := st.ctx
	rec, created, err := s.nodes.bind(ctx, st.token.ID, claimedID, func(tx store.Txn) (*Node, error) {
		if st.staleRoot != nil {
			return nil, st.staleRoot
		}
		admit := func() (bootstrap.Record, error) { return s.cfg.Tokens.Admit(ctx, st.token.ID) }
		if tx != nil { // the use is written with the node, in one commit
			admit = func() (bootstrap.Record, error) { return s.cfg.Tokens.AdmitIn(tx, st.token.ID) }
		}
		tok, err := admit()
		if err != nil {
			return nil, err
		}
		id, err := newNodeID()
		if err != nil {
			return nil, err
		}
		now := s.now().UTC()
		return &Node{ID: id, Service: tok.Service, Env: tok.Env, TokenID: tok.ID, ClaimedID: claimedID,
			Status: NodeActive, FirstSeen: now, LastSeen: now, AdmittedAt: now}, nil
	}, func(n *Node) (*Node, error) { return s.readmitIfAway(ctx, st, n) })
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
	if ln.tokenRevoked.Load() {
		return nil, tokenRevokedRefusal(rec.TokenID)
	}
	if err := s.ensureCertificate(ctx, ln); err != nil {
		if errors.Is(err, ErrNodeRevoked) { // revoked while being admitted
			return nil, &refusal{code: codes.PermissionDenied, reason: "node_revoked", msg: fmt.Sprintf("node %s has been revoked", rec.ID)}
		}
		if errors.Is(err, ErrTokenRevoked) {
			return nil, tokenRevokedRefusal(rec.TokenID)
		}
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
		ln = &liveNode{rec: *rec, heapIndex: -1, idleSince: s.now(), identity: issuer.Identity{
			TrustDomain: s.cfg.TrustDomain, Env: rec.Env, Service: rec.Service, NodeID: rec.ID,
		}}
		if _, ok := s.revokedTokens[rec.TokenID]; ok {
			ln.tokenRevoked.Store(true)
		}
		s.live[rec.ID] = ln
		s.cache.set(rec.ID, xdsres.SecretType, map[string]*resource{SecretRootCA: s.rootCA.Load().res})
		s.cache.set(rec.ID, xdsres.ExtensionConfigType, map[string]*resource{
			bootstrap.RBACFilterName:    s.policies.Load().forKey(ServiceKey{Env: rec.Env, Service: rec.Service}),
			bootstrap.RevokedFilterName: s.revokedRes.Load(),
		})
	}
	return ln
}

// sweepIdle forgets the in-memory state of nodes that have had no stream for
// longer than grace and whose certificate has expired (nothing left to give
// them again on reconnection), so sidecars that come and go do not grow the
// server's memory without bound. Their records stay in the store.
func (s *Server) sweepIdle(grace time.Duration) int {
	now := s.now()
	var drop []*liveNode
	s.mu.Lock()
	for id, ln := range s.live {
		if ln.streams > 0 || now.Sub(ln.idleSince) < grace {
			continue
		}
		if cs := ln.cur.Load(); cs != nil && cs.cert.Leaf.NotAfter.After(now) {
			continue
		}
		delete(s.live, id)
		drop = append(drop, ln)
	}
	s.mu.Unlock()
	for _, ln := range drop {
		s.sched.unschedule(ln)
		s.cache.removeNode(ln.rec.ID)
		s.bundles.forget(ln.rec.ID)
	}
	if len(drop) > 0 {
		s.log.Info("forgot idle nodes", "nodes", len(drop))
	}
	return len(drop)
}

// reuseFraction is how much of its life a certificate must have left to be
// served again to a reconnecting sidecar instead of a fresh one.
const reuseFraction = 0.2

// ensureCertificate issues a certificate for the node unless it holds one
// with more than reuseFraction of its life left, which a reconnecting
// sidecar gets again; either way the node's renewal is scheduled.
func (s *Server) ensureCertificate(ctx context.Context, ln *liveNode) error {
	ln.mu.Lock()
	defer ln.mu.Unlock()
	if cs := ln.cur.Load(); cs != nil && cs.cert.Leaf.NotAfter.Sub(s.now()) > time.Duration(float64(cs.cert.TTL)*reuseFraction) && !s.outsideBundle(cs) {
		if _, ok := s.sched.scheduled(ln); !ok {
			s.sched.schedule(ln, cs.renewAt)
		}
		return nil
	}
	ictx, cancel := context.WithTimeout(ctx, s.cfg.IssueTimeout)
	defer cancel()
	return s.issueLocked(ictx, ln)
}

// renew is the scheduler's job for a node whose renewal is due. A node with
// no open stream is dropped from the schedule: when it reconnects it gets its
// current certificate if enough of it is left, else a fresh one.
func (s *Server) renew(ctx context.Context, ln *liveNode) {
	s.mu.Lock()
	connected := ln.streams > 0
	s.mu.Unlock()
	if !connected {
		return
	}
	ln.mu.Lock()
	defer ln.mu.Unlock()
	ln.hmu.Lock()
	failing := ln.failures > 0
	ln.hmu.Unlock()
	if cs := ln.cur.Load(); cs != nil && !failing && !ln.forceRenew.Load() && cs.renewAt.After(s.now()) {
		s.sched.schedule(ln, cs.renewAt) // renewed meanwhile (reconnection)
		return
	}
	ln.forceRenew.Store(false)
	ictx, cancel := context.WithTimeout(ctx, s.cfg.IssueTimeout)
	err := s.issueLocked(ictx, ln)
	cancel()
	if err == nil || ctx.Err() != nil || errors.Is(err, ErrNodeRevoked) || errors.Is(err, ErrTokenRevoked) {
		return
	}
	ln.hmu.Lock()
	ln.failures++
	ln.lastErr = err.Error()
	attempt := ln.failures
	ln.hmu.Unlock()
	ttl := s.cfg.CertTTL
	if cs := ln.cur.Load(); cs != nil {
		ttl = cs.cert.TTL
	}
	delay := retryDelay(attempt, retryLimit(ttl))
	s.sched.schedule(ln, s.now().Add(delay))
	var expires time.Time
	if cs := ln.cur.Load(); cs != nil {
		expires = cs.cert.Leaf.NotAfter
	}
	s.log.Warn("certificate renewal failed; keeping the current certificate", "node_id", ln.identity.NodeID,
		"attempt", attempt, "retry_in", delay.Round(time.Millisecond), "expires_at", expires.UTC().Format(time.RFC3339), "error", err)
}

// issueLocked generates a key, has the issuer sign it, publishes the new
// secrets to every open stream of the node and schedules the next renewal.
// ln.mu is held: it guards only this node.
func (s *Server) issueLocked(ctx context.Context, ln *liveNode) error {
	if ln.revoked.Load() {
		return fmt.Errorf("node %s: %w", ln.identity.NodeID, ErrNodeRevoked)
	}
	if ln.tokenRevoked.Load() {
		return fmt.Errorf("node %s: %w", ln.identity.NodeID, ErrTokenRevoked)
	}
	start := time.Now()
	cert, keyPEM, err := s.mint(ctx, ln.identity)
	s.cfg.Metrics.issueLatency.Observe(time.Since(start).Seconds())
	if err == nil {
		err = checkFresh(cert, s.now())
	}
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
	serial := serialHex(cert.Leaf)
	// The secret's version is the certificate serial: readable in Envoy's
	// config dump and what ACKs are matched against.
	def.version, alias.version = serial, serial
	cs := &certState{
		cert: cert, serial: serial, secrets: []*resource{def, alias},
		renewAt: s.cfg.RenewWindow.renewAt(cert.IssuedAt, cert.TTL, s.draw.next()),
	}
	if old := ln.cur.Load(); old != nil {
		cs.prev = &certState{cert: old.cert, serial: old.serial, renewAt: old.renewAt, secrets: old.secrets}
	}
	// Record the certificate before publishing it, refusing if the node was
	// revoked meanwhile (RevokeNode marks the record and reads its
	// certificates in one update): every certificate a node can receive is
	// then either in the record when it is revoked, and so on the CRL, or
	// never published.
	if _, err := s.nodes.update(ctx, ln.identity.NodeID, func(n *Node) error {
		if n.Status == NodeRevoked {
			return ErrNodeRevoked
		}
		now := s.now()
		n.IssuedSerial, n.IssuedNotAfter = serial, cert.Leaf.NotAfter.UTC()
		n.LastSeen = now.UTC()
		kept := n.Certs[:0]
		for _, c := range n.Certs {
			if c.NotAfter.After(now) {
				kept = append(kept, c)
			}
		}
		n.Certs = append(kept, IssuedCert{Serial: serial, NotAfter: cert.Leaf.NotAfter.UTC(), SHA256: certHash(cert.Leaf.Raw)})
		return nil
	}); errors.Is(err, ErrNodeRevoked) {
		ln.revoked.Store(true)
		s.log.Warn("certificate discarded: node revoked during issuance", "node_id", ln.identity.NodeID, "serial", serial)
		return fmt.Errorf("node %s: %w", ln.identity.NodeID, ErrNodeRevoked)
	} else if err != nil {
		s.log.Warn("could not record issued certificate", "node_id", ln.identity.NodeID, "error", err)
	}
	if ln.tokenRevoked.Load() { // the token was revoked during issuance
		s.log.Warn("certificate discarded: token revoked during issuance", "node_id", ln.identity.NodeID, "serial", serial)
		return fmt.Errorf("node %s: %w", ln.identity.NodeID, ErrTokenRevoked)
	}
	ln.cur.Store(cs)
	ln.hmu.Lock()
	ln.failures, ln.lastErr = 0, ""
	ln.hmu.Unlock()
	s.cache.set(ln.identity.NodeID, xdsres.SecretType, map[string]*resource{
		SecretDefault: def, spiffeID: alias, SecretRootCA: s.rootCA.Load().res,
	})
	s.sched.schedule(ln, cs.renewAt)
	s.log.Info("certificate issued", "node_id", ln.identity.NodeID, "spiffe_id", spiffeID, "serial", serial,
		"not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339), "renew_at", cs.renewAt.UTC().Format(time.RFC3339Nano),
		"duration", time.Since(start))
	return nil
}

// checkFresh refuses a certificate that is expired or not yet valid, so a
// misbehaving issuer can never make us push one.
func checkFresh(c *issuer.Certificate, now time.Time) error {
	switch {
	case c == nil || c.Leaf == nil || len(c.ChainPEM) == 0:
		return errors.New("issuer returned an empty certificate")
	case !now.Before(c.Leaf.NotAfter):
		return fmt.Errorf("issuer returned a certificate that expired at %s", c.Leaf.NotAfter.UTC().Format(time.RFC3339))
	case now.Add(issuer.Backdate).Before(c.Leaf.NotBefore):
		return fmt.Errorf("issuer returned a certificate valid only from %s", c.Leaf.NotBefore.UTC().Format(time.RFC3339))
	case c.TTL <= 0:
		return errors.New("issuer returned a certificate without a lifetime")
	}
	return nil
}

// markServing records that Envoy ACKed a response carrying cs.
func (s *Server) markServing(ln *liveNode, cs *certState) {
	ln.hmu.Lock()
	changed := ln.serving != cs
	ln.serving = cs
	ln.hmu.Unlock()
	if !changed {
		return
	}
	s.log.Info("envoy loaded certificate", "node_id", ln.identity.NodeID, "serial", cs.serial)
	if _, err := s.nodes.update(context.Background(), ln.identity.NodeID, func(n *Node) error {
		n.ServingSerial, n.ServingNotAfter = cs.serial, cs.cert.Leaf.NotAfter.UTC()
		return nil
	}); err != nil {
		s.log.Warn("could not record serving certificate", "node_id", ln.identity.NodeID, "error", err)
	}
}

// mint creates a P-256 key and a CSR for id and has the issuer sign it.
func (s *Server) mint(ctx context.Context, id issuer.Identity) (*issuer.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	// The built-in CA certifies the key as is; a remote CA gets a CSR.
	cert, err := s.cfg.Issuer.Issue(ctx, issuer.Request{Identity: id, TTL: s.cfg.CertTTL, PublicKey: &key.PublicKey,
		NewCSR: func() ([]byte, error) {
			uri, err := url.Parse(id.SPIFFEID())
			if err != nil {
				return nil, fmt.Errorf("SPIFFE ID %q: %w", id.SPIFFEID(), err)
			}
			return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
				Subject: pkix.Name{CommonName: id.NodeID, OrganizationalUnit: []string{id.Service}, Organization: []string{id.Env}},
				URIs:    []*url.URL{uri},
			}, key)
		}})
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

// Ready reports whether the server can serve: it has a trust bundle, no
// connected node is within 10 % of its certificate's expiry while its
// renewal keeps failing, and the revocation list is not near its end. The
// error joins every reason (errors.Join), which GET /v1/status lists.
func (s *Server) Ready(context.Context) error {
	if b := s.rootCA.Load(); b == nil || len(b.roots) == 0 {
		return errors.New("no trust bundle loaded")
	}
	var errs []error
	if n := s.nodesAtRisk(); n > 0 {
		errs = append(errs, fmt.Errorf("%d node(s) within 10%% of certificate expiry with renewal failing", n))
	}
	return errors.Join(append(errs, s.crlAtRisk())...)
}

// connectedNodes returns the nodes with at least one open stream.
func (s *Server) connectedNodes() []*liveNode {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*liveNode, 0, len(s.live))
	for _, ln := range s.live {
		if ln.streams > 0 {
			out = append(out, ln)
		}
	}
	return out
}

// nodesAtRisk counts connected nodes within 10 % of expiry whose renewal is
// failing.
func (s *Server) nodesAtRisk() int {
	now, n := s.now(), 0
	for _, ln := range s.connectedNodes() {
		cs := ln.cur.Load()
		ln.hmu.Lock()
		failing := ln.failures > 0
		ln.hmu.Unlock()
		if failing && cs != nil && cs.cert.Leaf.NotAfter.Sub(now) < cs.cert.TTL/10 {
			n++
		}
	}
	return n
}

// nodesServingStale counts connected nodes whose loaded certificate is past
// 90 % of its life: renewed (or not) but Envoy still serves the old one.
func (s *Server) nodesServingStale() int {
	now, n := s.now(), 0
	for _, ln := range s.connectedNodes() {
		ln.hmu.Lock()
		cs := ln.serving
		ln.hmu.Unlock()
		if cs != nil && cs.cert.Leaf.NotAfter.Sub(now) < cs.cert.TTL/10 {
			n++
		}
	}
	return n
}

// nodesRenewalFailing counts connected nodes whose last renewal failed.
func (s *Server) nodesRenewalFailing() int {
	n := 0
	for _, ln := range s.connectedNodes() {
		ln.hmu.Lock()
		if ln.failures > 0 {
			n++
		}
		ln.hmu.Unlock()
	}
	return n
}
