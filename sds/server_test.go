package sds

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/store"
)

const (
	testTrustDomain = "mesh.local"
	// recvTimeout bounds every receive that is expected to succeed.
	recvTimeout = 5 * time.Second
	// streamLife bounds the whole life of every client stream.
	streamLife = 15 * time.Second
)

// testClock is a controllable clock: real time plus an offset the test moves.
type testClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.off += d
}

// logBuffer is a bytes.Buffer safe for the server's concurrent log writes.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// bundleIssuer is the built-in CA with extra roots a test can add to its
// trust bundle, as a CA rotation would.
type bundleIssuer struct {
	*local.CA
	mu    sync.Mutex
	extra []*x509.Certificate
}

func (b *bundleIssuer) Roots(ctx context.Context) ([]*x509.Certificate, error) {
	roots, err := b.CA.Roots(ctx)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return append(roots, b.extra...), nil
}

func (b *bundleIssuer) addRoot(c *x509.Certificate) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.extra = append(b.extra, c)
}

// testEnv is one server on a real TLS loopback listener and a client
// connection to it.
type testEnv struct {
	ca      *local.CA
	issuer  *bundleIssuer
	kv      store.Store
	reg     *bootstrap.Registry
	clock   *testClock
	prom    *prometheus.Registry
	metrics *Metrics
	logs    *logBuffer
	srv     *Server
	conn    *grpc.ClientConn
	addr    string
	// stop closes the client connection, then stops the server and waits
	// for Serve to return; idempotent, and run at cleanup.
	stop func()
}

// envOptions are the server set-up choices of newTestEnvWith; the zero
// value is newTestEnv's set-up.
type envOptions struct {
	store store.Store // nil: a new Memory store
	caDir string      // empty: a new directory
	clock *testClock  // nil: a new one
	// wrapIssuer builds the server's issuer around the built-in CA; nil:
	// the bundleIssuer itself.
	wrapIssuer   func(*bundleIssuer) issuer.Issuer
	certTTL      time.Duration // zero: one hour
	crlPeriod    time.Duration // zero: 24 hours
	issueTimeout time.Duration // zero: the server's default
	renewWorkers int           // zero: the server's default
	renewWindow  RenewWindow   // zero: the server's default
	limits       Limits        // zero fields: DefaultLimits
	logInfo      bool          // log at info; false: at debug
}

func logLevel(info bool) slog.Level {
	if info {
		return slog.LevelInfo
	}
	return slog.LevelDebug
}

// newTestEnv is newTestEnvWith with the default options.
func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	return newTestEnvWith(t, envOptions{})
}

// newTestEnvWith starts a server set up as o says; it stops at cleanup, or
// earlier through env.stop.
func newTestEnvWith(t *testing.T, o envOptions) *testEnv {
	t.Helper()
	if o.store == nil {
		o.store = store.NewMemory()
	}
	if o.caDir == "" {
		o.caDir = t.TempDir()
	}
	if o.clock == nil {
		o.clock = &testClock{}
	}
	if o.certTTL == 0 {
		o.certTTL = time.Hour
	}
	if o.crlPeriod == 0 {
		// Tests move the clock by up to an hour: a CRL re-signed meanwhile
		// would push a ROOTCA the test does not expect.
		o.crlPeriod = 24 * time.Hour
	}
	ctx, cancel := context.WithCancel(context.Background())

	// One clock for the CA, the token registry and the server, so that
	// moving it ages tokens and certificates alike.
	ca, err := local.Open(ctx, o.caDir, local.Options{TrustDomain: testTrustDomain, AllowShortTTL: true, Now: o.clock.Now})
	if err != nil {
		cancel()
		t.Fatalf("open CA: %v", err)
	}
	env := &testEnv{ca: ca, issuer: &bundleIssuer{CA: ca}, kv: o.store, clock: o.clock, prom: prometheus.NewRegistry(), logs: &logBuffer{}}
	var iss issuer.Issuer = env.issuer
	if o.wrapIssuer != nil {
		iss = o.wrapIssuer(env.issuer)
	}
	env.reg = bootstrap.NewRegistry(env.kv, env.clock.Now)
	env.metrics = NewMetrics(env.prom)
	env.srv, err = New(ctx, Config{
		TrustDomain:  testTrustDomain,
		CertTTL:      o.certTTL,
		CRLPeriod:    o.crlPeriod,
		IssueTimeout: o.issueTimeout,
		RenewWorkers: o.renewWorkers,
		RenewWindow:  o.renewWindow,
		Issuer:       iss,
		Tokens:       env.reg,
		Store:        env.kv,
		Metrics:      env.metrics,
		Logger:       slog.New(slog.NewTextHandler(env.logs, &slog.HandlerOptions{Level: logLevel(o.logInfo)})),
		Now:          env.clock.Now,
		Limits:       o.limits,
	})
	if err != nil {
		cancel()
		t.Fatalf("sds.New: %v", err)
	}
	servingCert, err := NewServingCert(func() (tls.Certificate, error) {
		return ca.ServerCertificate([]string{"127.0.0.1"}, time.Hour)
	}, nil)
	if err != nil {
		cancel()
		t.Fatalf("serving certificate: %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		t.Fatalf("listen: %v", err)
	}
	env.addr = lis.Addr().String()
	served := make(chan error, 1)
	go func() { served <- env.srv.Serve(ctx, lis, servingCert.TLSConfig()) }()
	var once sync.Once
	env.stop = func() {
		once.Do(func() {
			// The connection first, so the graceful stop does not wait for
			// our streams.
			if env.conn != nil {
				_ = env.conn.Close()
			}
			cancel()
			select {
			case err := <-served:
				if err != nil {
					t.Errorf("Serve: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("Serve did not return after its context ended")
			}
		})
	}
	t.Cleanup(env.stop)

	pool := x509.NewCertPool()
	pool.AddCert(ca.Root())
	creds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	env.conn, err = grpc.NewClient(env.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	return env
}

// token creates a bootstrap token for service in env "default".
func (e *testEnv) token(t *testing.T, service string, ttl time.Duration, uses int) (string, bootstrap.Record) {
	t.Helper()
	if ttl == 0 {
		ttl = 24 * time.Hour
	}
	text, rec, err := e.reg.Create(context.Background(), bootstrap.CreateOptions{
		Service: service, Env: "default", TTL: ttl, MaxUses: uses,
	}, e.ca.Root())
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	return text, rec
}

// nodeFor returns the registry record bound to (token, claimed node.id).
func (e *testEnv) nodeFor(t *testing.T, tokenID, claimed string) Node {
	t.Helper()
	nodes, err := e.srv.NodeList(context.Background())
	if err != nil {
		t.Fatalf("NodeList: %v", err)
	}
	for _, n := range nodes {
		if n.TokenID == tokenID && n.ClaimedID == claimed {
			return n
		}
	}
	t.Fatalf("no node bound to token %s and node.id %q (nodes: %+v)", tokenID, claimed, nodes)
	return Node{}
}

// ---- xDS client side -------------------------------------------------------

// xdsReq is what a test sends, in either protocol. For SotW, names is the
// full list of resource names; for delta, the names to subscribe.
type xdsReq struct {
	node        string // claimed node.id; empty sends no node
	names       []string
	unsubscribe []string // delta only
	version     string   // SotW only
	nonce       string
	nack        string // error_detail message; empty means none
}

// coreNode is the node a request carries: nil when r.node is empty.
func (r xdsReq) coreNode() *core.Node {
	if r.node == "" {
		return nil
	}
	return &core.Node{Id: r.node, Cluster: "test"}
}

// errorDetail is the NACK a request carries: nil when r.nack is empty.
func (r xdsReq) errorDetail() *statuspb.Status {
	if r.nack == "" {
		return nil
	}
	return &statuspb.Status{Code: 3, Message: r.nack}
}

// xdsReply is one response, in either protocol.
type xdsReply struct {
	version string
	nonce   string
	names   []string // resource names in response order
	secrets map[string]*tlsv3.Secret
	removed []string // delta only
}

// errNoReply is returned by recv when nothing arrived in time.
var errNoReply = errors.New("no response in time")

type xdsStream interface {
	send(xdsReq) error
	// recv waits at most d for the next response; it returns errNoReply on
	// timeout and the stream's status error once it has ended.
	recv(d time.Duration) (*xdsReply, error)
	close()
}

// pump receives every message of a stream on its own goroutine so that
// every receive of the test can be bounded by a timeout.
type pump[T any] struct {
	ch  chan T
	err error // set before ch is closed
}

func startPump[T any](ctx context.Context, recv func() (T, error)) *pump[T] {
	p := &pump[T]{ch: make(chan T, 16)}
	go func() {
		defer close(p.ch)
		for {
			m, err := recv()
			if err != nil {
				p.err = err
				return
			}
			select {
			case p.ch <- m:
			case <-ctx.Done():
				p.err = ctx.Err()
				return
			}
		}
	}()
	return p
}

func (p *pump[T]) next(d time.Duration) (T, error) {
	var zero T
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case m, ok := <-p.ch:
		if !ok {
			return zero, p.err
		}
		return m, nil
	case <-timer.C:
		return zero, errNoReply
	}
}

type sotwStream struct {
	s      grpc.BidiStreamingClient[discoverygrpc.DiscoveryRequest, discoverygrpc.DiscoveryResponse]
	p      *pump[*discoverygrpc.DiscoveryResponse]
	cancel context.CancelFunc
}

func (s *sotwStream) send(r xdsReq) error {
	return s.s.Send(&discoverygrpc.DiscoveryRequest{
		TypeUrl:       xdsres.SecretType,
		Node:          r.coreNode(),
		ResourceNames: r.names,
		VersionInfo:   r.version,
		ResponseNonce: r.nonce,
		ErrorDetail:   r.errorDetail(),
	})
}

func (s *sotwStream) recv(d time.Duration) (*xdsReply, error) {
	m, err := s.p.next(d)
	if err != nil {
		return nil, err
	}
	out := &xdsReply{version: m.GetVersionInfo(), nonce: m.GetNonce(), secrets: map[string]*tlsv3.Secret{}}
	for _, a := range m.GetResources() {
		sec, err := unmarshalSecret(a)
		if err != nil {
			return nil, err
		}
		out.names = append(out.names, sec.GetName())
		out.secrets[sec.GetName()] = sec
	}
	if m.GetTypeUrl() != xdsres.SecretType {
		return nil, errors.New("response type " + m.GetTypeUrl() + ", want " + xdsres.SecretType)
	}
	return out, nil
}

func (s *sotwStream) close() { s.cancel() }

type deltaStream struct {
	s      grpc.BidiStreamingClient[discoverygrpc.DeltaDiscoveryRequest, discoverygrpc.DeltaDiscoveryResponse]
	p      *pump[*discoverygrpc.DeltaDiscoveryResponse]
	cancel context.CancelFunc
}

func (s *deltaStream) send(r xdsReq) error {
	return s.s.Send(&discoverygrpc.DeltaDiscoveryRequest{
		TypeUrl:                  xdsres.SecretType,
		Node:                     r.coreNode(),
		ResourceNamesSubscribe:   r.names,
		ResourceNamesUnsubscribe: r.unsubscribe,
		ResponseNonce:            r.nonce,
		ErrorDetail:              r.errorDetail(),
	})
}

func (s *deltaStream) recv(d time.Duration) (*xdsReply, error) {
	m, err := s.p.next(d)
	if err != nil {
		return nil, err
	}
	if m.GetTypeUrl() != xdsres.SecretType {
		return nil, errors.New("response type " + m.GetTypeUrl() + ", want " + xdsres.SecretType)
	}
	out := &xdsReply{version: m.GetSystemVersionInfo(), nonce: m.GetNonce(), secrets: map[string]*tlsv3.Secret{},
		removed: m.GetRemovedResources()}
	for _, r := range m.GetResources() {
		sec, err := unmarshalSecret(r.GetResource())
		if err != nil {
			return nil, err
		}
		if sec.GetName() != r.GetName() {
			return nil, errors.New("delta resource " + r.GetName() + " carries secret " + sec.GetName())
		}
		out.names = append(out.names, r.GetName())
		out.secrets[r.GetName()] = sec
	}
	return out, nil
}

func (s *deltaStream) close() { s.cancel() }

func unmarshalSecret(a *anypb.Any) (*tlsv3.Secret, error) {
	if a.GetTypeUrl() != xdsres.SecretType {
		return nil, errors.New("resource of type " + a.GetTypeUrl())
	}
	var sec tlsv3.Secret
	if err := a.UnmarshalTo(&sec); err != nil {
		return nil, err
	}
	return &sec, nil
}

// variant is one way of asking for secrets: SDS or ADS, SotW or delta.
type variant struct {
	name  string
	delta bool
	open  func(ctx context.Context, conn *grpc.ClientConn) (xdsStream, error)
}

var (
	sdsSotw = variant{name: "sds-sotw", open: func(ctx context.Context, conn *grpc.ClientConn) (xdsStream, error) {
		s, err := secretservice.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
		if err != nil {
			return nil, err
		}
		return &sotwStream{s: s, p: startPump(ctx, s.Recv)}, nil
	}}
	adsSotw = variant{name: "ads-sotw", open: func(ctx context.Context, conn *grpc.ClientConn) (xdsStream, error) {
		s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err != nil {
			return nil, err
		}
		return &sotwStream{s: s, p: startPump(ctx, s.Recv)}, nil
	}}
	sdsDelta = variant{name: "sds-delta", delta: true, open: func(ctx context.Context, conn *grpc.ClientConn) (xdsStream, error) {
		s, err := secretservice.NewSecretDiscoveryServiceClient(conn).DeltaSecrets(ctx)
		if err != nil {
			return nil, err
		}
		return &deltaStream{s: s, p: startPump(ctx, s.Recv)}, nil
	}}
	adsDelta = variant{name: "ads-delta", delta: true, open: func(ctx context.Context, conn *grpc.ClientConn) (xdsStream, error) {
		s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
		if err != nil {
			return nil, err
		}
		return &deltaStream{s: s, p: startPump(ctx, s.Recv)}, nil
	}}
	allVariants = []variant{sdsSotw, adsSotw, sdsDelta, adsDelta}
)

// open opens a stream of kind v; auth is the whole authorization metadata
// value, or empty to send none.
func (e *testEnv) open(t *testing.T, v variant, auth string) xdsStream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), streamLife)
	t.Cleanup(cancel)
	if auth != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", auth)
	}
	s, err := v.open(ctx, e.conn)
	if err != nil {
		cancel()
		t.Fatalf("open %s stream: %v", v.name, err)
	}
	switch s := s.(type) {
	case *sotwStream:
		s.cancel = cancel
	case *deltaStream:
		s.cancel = cancel
	}
	return s
}

func bearer(token string) string { return "Bearer " + token }

// send sends r, tolerating io.EOF: the server may already have ended the
// stream, and the reason is then read by recv.
func send(t *testing.T, s xdsStream, r xdsReq) {
	t.Helper()
	if err := s.send(r); err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("send: %v", err)
	}
}

// mustRecv waits for a response and fails the test if none comes.
func mustRecv(t *testing.T, s xdsStream) *xdsReply {
	t.Helper()
	r, err := s.recv(recvTimeout)
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	return r
}

// fetch opens a stream with token, sends one request and returns the first
// response and the still open stream.
func (e *testEnv) fetch(t *testing.T, v variant, token, node string, names ...string) (*xdsReply, xdsStream) {
	t.Helper()
	s := e.open(t, v, bearer(token))
	send(t, s, xdsReq{node: node, names: names})
	return mustRecv(t, s), s
}

// ---- certificate helpers -----------------------------------------------------

func spiffeID(service string) string { return issuer.SPIFFEID(testTrustDomain, "default", service) }

// leafOf decodes a tls_certificate secret: the parsed chain (leaf first) and
// the PEM private key.
func leafOf(t *testing.T, sec *tlsv3.Secret) ([]*x509.Certificate, any) {
	t.Helper()
	tc := sec.GetTlsCertificate()
	if tc == nil {
		t.Fatalf("secret %q has no tls_certificate", sec.GetName())
	}
	var chain []*x509.Certificate
	rest := tc.GetCertificateChain().GetInlineBytes()
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatalf("secret %q: parse certificate: %v", sec.GetName(), err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		t.Fatalf("secret %q: empty certificate chain", sec.GetName())
	}
	kb, _ := pem.Decode(tc.GetPrivateKey().GetInlineBytes())
	if kb == nil {
		t.Fatalf("secret %q: no PEM private key", sec.GetName())
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		t.Fatalf("secret %q: parse private key: %v", sec.GetName(), err)
	}
	return chain, key
}

// leaf returns the leaf of a tls_certificate secret.
func leaf(t *testing.T, sec *tlsv3.Secret) *x509.Certificate {
	t.Helper()
	chain, _ := leafOf(t, sec)
	return chain[0]
}

func sortedCopy(s []string) []string {
	out := append([]string(nil), s...)
	sort.Strings(out)
	return out
}

func sameNames(got, want []string) bool {
	g, w := sortedCopy(got), sortedCopy(want)
	if len(g) != len(w) {
		return false
	}
	for i := range g {
		if g[i] != w[i] {
			return false
		}
	}
	return true
}

// eventually polls cond until it holds or d passes.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// countLines counts the log lines containing every one of words.
func countLines(logs string, words ...string) int {
	n := 0
	for _, line := range strings.Split(logs, "\n") {
		all := line != ""
		for _, w := range words {
			if !strings.Contains(line, w) {
				all = false
				break
			}
		}
		if all {
			n++
		}
	}
	return n
}

// metricValue returns the value of the one counter or gauge c collects, as
// prometheus/testutil.ToFloat64 does. (testutil itself needs a module,
// github.com/kylelemons/godebug, that go.mod does not require.)
func metricValue(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 8)
	go func() { c.Collect(ch); close(ch) }()
	var ms []prometheus.Metric
	for m := range ch {
		ms = append(ms, m)
	}
	if len(ms) != 1 {
		t.Fatalf("collected %d metrics, want exactly 1", len(ms))
	}
	var pb dto.Metric
	if err := ms[0].Write(&pb); err != nil {
		t.Fatalf("read metric: %v", err)
	}
	switch {
	case pb.Counter != nil:
		return pb.Counter.GetValue()
	case pb.Gauge != nil:
		return pb.Gauge.GetValue()
	}
	t.Fatalf("metric is neither a counter nor a gauge: %v", &pb)
	return 0
}
