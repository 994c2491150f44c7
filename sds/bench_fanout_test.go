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
	"math/big"
	"net"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/store"
)

// streamsPerConn is how many streams the benchmark opens per client
// connection: the server allows 1024 concurrent streams on one.
const streamsPerConn = 1000

// benchStreamCount is N, 10,000 unless SDS_BENCH_STREAMS says otherwise.
func benchStreamCount(b *testing.B) int {
	n := 10000
	if v := os.Getenv("SDS_BENCH_STREAMS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 {
			b.Fatalf("SDS_BENCH_STREAMS=%q: want a positive integer", v)
		}
	}
	return n
}

// fastIssuer signs workload certificates directly with a pre-made P-256
// root, taking only the CSR's public key (no signature check, no policy):
// the fan-out benchmark measures pushes, not the CA. Its trust bundle is
// switched by the benchmark.
type fastIssuer struct {
	root   *x509.Certificate
	key    *ecdsa.PrivateKey
	serial atomic.Int64
	roots  atomic.Pointer[[]*x509.Certificate]
}

func newFastIssuer(cn string) (*fastIssuer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	f := &fastIssuer{root: root, key: key}
	f.setRoots(root)
	f.serial.Store(1)
	return f, nil
}

func (f *fastIssuer) setRoots(roots ...*x509.Certificate) { f.roots.Store(&roots) }

func (f *fastIssuer) Roots(context.Context) ([]*x509.Certificate, error) { return *f.roots.Load(), nil }

func (f *fastIssuer) Issue(ctx context.Context, req issuer.Request) (*issuer.Certificate, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	pub := req.PublicKey
	if pub == nil {
		csr, err := x509.ParseCertificateRequest(req.CSR)
		if err != nil {
			return nil, err
		}
		pub = csr.PublicKey
	}
	uri, err := url.Parse(req.Identity.SPIFFEID())
	if err != nil {
		return nil, err
	}
	now := time.Now().Truncate(time.Second)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(f.serial.Add(1)),
		Subject:      pkix.Name{CommonName: req.Identity.NodeID},
		URIs:         []*url.URL{uri},
		NotBefore:    now.Add(-issuer.Backdate), NotAfter: now.Add(req.TTL),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, f.root, pub, f.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &issuer.Certificate{Leaf: leaf, ChainPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		IssuedAt: now, TTL: req.TTL}, nil
}

// fanoutClients are N client SotW SDS streams subscribed to ROOTCA, each
// ACKing every response and recording when its last one arrived.
type fanoutClients struct {
	cancel   context.CancelFunc
	last     []atomic.Int64 // UnixNano of each stream's last response
	count    []atomic.Int64 // responses per stream
	total    atomic.Int64   // responses over all streams
	notify   chan struct{}  // poked (without blocking) on every response
	failed   atomic.Int64   // streams that ended with an error
	firstErr atomic.Pointer[error]
	wg       sync.WaitGroup // receive goroutines
}

// openFanoutClients opens n streams round-robin over conns, each sending
// one request for ROOTCA with node.id bench-<i> and authorization auth,
// and waits (at most until deadline) for every first response.
func openFanoutClients(b *testing.B, conns []*grpc.ClientConn, n int, auth string, deadline time.Time) *fanoutClients {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	if auth != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", auth)
	}
	fc := &fanoutClients{cancel: cancel, last: make([]atomic.Int64, n), count: make([]atomic.Int64, n), notify: make(chan struct{}, 1)}
	names := []string{SecretRootCA}
	var next atomic.Int64
	var openers sync.WaitGroup
	for range 32 {
		openers.Add(1)
		go func() {
			defer openers.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				st, err := secretservice.NewSecretDiscoveryServiceClient(conns[i%len(conns)]).StreamSecrets(ctx)
				if err == nil {
					err = st.Send(&discoverygrpc.DiscoveryRequest{Node: &core.Node{Id: fmt.Sprintf("bench-%d", i)},
						TypeUrl: xdsres.SecretType, ResourceNames: names})
				}
				if err != nil {
					fc.fail(err)
					continue
				}
				fc.wg.Add(1)
				go fc.receive(i, st, names)
			}
		}()
	}
	openers.Wait()
	fc.waitTotal(b, int64(n), deadline, "first responses")
	return fc
}

func (fc *fanoutClients) fail(err error) {
	fc.failed.Add(1)
	fc.firstErr.CompareAndSwap(nil, &err)
	select {
	case fc.notify <- struct{}{}:
	default:
	}
}

func (fc *fanoutClients) receive(i int, st grpc.BidiStreamingClient[discoverygrpc.DiscoveryRequest, discoverygrpc.DiscoveryResponse], names []string) {
	defer fc.wg.Done()
	for {
		resp, err := st.Recv()
		if err != nil {
			if status.Code(err) != codes.Canceled && !errors.Is(err, context.Canceled) {
				fc.fail(err)
			}
			return
		}
		fc.last[i].Store(time.Now().UnixNano())
		if err := st.Send(&discoverygrpc.DiscoveryRequest{TypeUrl: xdsres.SecretType, ResourceNames: names,
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
			fc.fail(err)
			return
		}
		fc.count[i].Add(1)
		fc.total.Add(1)
		select {
		case fc.notify <- struct{}{}:
		default:
		}
	}
}

// waitTotal waits until the streams received want responses in all, or
// fails the benchmark at deadline or at the first stream error.
func (fc *fanoutClients) waitTotal(b *testing.B, want int64, deadline time.Time, what string) {
	b.Helper()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for fc.total.Load() < want {
		if e := fc.firstErr.Load(); e != nil {
			b.Fatalf("%s: %d streams failed, first: %v", what, fc.failed.Load(), *e)
		}
		select {
		case <-fc.notify:
		case <-timer.C:
			b.Fatalf("%s: %d of %d responses by the deadline", what, fc.total.Load(), want)
		}
	}
}

// close ends every stream and waits (bounded) for the receivers.
func (fc *fanoutClients) close(b *testing.B) {
	fc.cancel()
	done := make(chan struct{})
	go func() { fc.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Errorf("client streams did not end within 30 s")
	}
}

// parkedWatches is the number of watches waiting in the server's cache: one
// per stream once its ACK has been processed.
func parkedWatches(c *resourceCache) int {
	c.mu.RLock()
	nodes := make([]*nodeResources, 0, len(c.nodes))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	c.mu.RUnlock()
	total := 0
	for _, n := range nodes {
		n.mu.Lock()
		total += len(n.watches)
		n.mu.Unlock()
	}
	return total
}

func waitParked(b *testing.B, srv *Server, n int, deadline time.Time) {
	b.Helper()
	for parkedWatches(srv.cache) < n {
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d watches parked by the deadline", parkedWatches(srv.cache), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// memNow returns heap and stack in use after a full collection.
func memNow() (heap, stack int64) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse), int64(m.StackInuse)
}

// benchTLS returns a serving certificate for 127.0.0.1 and the client
// credentials trusting it.
func benchTLS(ctx context.Context, b *testing.B) (*tls.Config, credentials.TransportCredentials) {
	b.Helper()
	ca, err := local.Open(ctx, b.TempDir(), local.Options{TrustDomain: testTrustDomain})
	if err != nil {
		b.Fatal(err)
	}
	sc, err := NewServingCert(func() (tls.Certificate, error) { return ca.ServerCertificate([]string{"127.0.0.1"}, time.Hour) }, nil)
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Root())
	return sc.TLSConfig(), credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
}

func dialConns(b *testing.B, addr string, creds credentials.TransportCredentials, n int) []*grpc.ClientConn {
	b.Helper()
	conns := make([]*grpc.ClientConn, (n+streamsPerConn-1)/streamsPerConn)
	for i := range conns {
		c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
		if err != nil {
			b.Fatal(err)
		}
		conns[i] = c
	}
	return conns
}

func closeConns(conns []*grpc.ClientConn) {
	for _, c := range conns {
		_ = c.Close()
	}
}

// bareSDS answers the first request of a stream with one fixed ROOTCA and
// then only reads: the least any SDS server must hold per idle stream.
type bareSDS struct {
	secretservice.UnimplementedSecretDiscoveryServiceServer
	res *anypb.Any
}

func (s bareSDS) StreamSecrets(st grpc.BidiStreamingServer[discoverygrpc.DiscoveryRequest, discoverygrpc.DiscoveryResponse]) error {
	if _, err := st.Recv(); err != nil {
		return err
	}
	if err := st.Send(&discoverygrpc.DiscoveryResponse{VersionInfo: "1", Nonce: "1", TypeUrl: xdsres.SecretType,
		Resources: []*anypb.Any{s.res}}); err != nil {
		return err
	}
	for {
		if _, err := st.Recv(); err != nil {
			return nil
		}
	}
}

// bareHeapPerStream opens n streams over the same client code against a
// bare gRPC SDS server and returns the heap and stack they add per stream:
// the client's share plus a minimal server's.
func bareHeapPerStream(b *testing.B, n int, res *anypb.Any, deadline time.Time) (heap, stack float64) {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tlsConf, creds := benchTLS(ctx, b)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsConf)), grpc.MaxConcurrentStreams(1024))
	secretservice.RegisterSecretDiscoveryServiceServer(g, bareSDS{res: res})
	served := make(chan struct{})
	go func() { _ = g.Serve(lis); close(served) }()
	conns := dialConns(b, lis.Addr().String(), creds, n)
	h0, s0 := memNow()
	fc := openFanoutClients(b, conns, n, "", deadline)
	h1, s1 := memNow()
	fc.close(b)
	closeConns(conns)
	g.Stop()
	<-served
	return float64(h1-h0) / float64(n), float64(s1-s0) / float64(n)
}

// BenchmarkPushFanout: N SotW SDS streams (SDS_BENCH_STREAMS, default
// 10,000), each a distinct node subscribed to ROOTCA, over ceil(N/1000)
// loopback TLS connections, all open and ACKed. One iteration is one
// trust-bundle change (a second root added or removed) and RefreshRoots;
// it ends when every stream has received the new ROOTCA. Reported:
//
//   - p50-ms, p99-ms: per stream, from the RefreshRoots call to the arrival
//     of its new ROOTCA, over all iterations;
//   - heap-KiB/stream, stack-KiB/stream: HeapInuse and StackInuse added
//     by the N idle streams, client and server together (one process);
//     each stream is a node, so this includes the node's state (record,
//     certificate, encoded secrets);
//   - bare-heap-KiB/stream, bare-stack-KiB/stream: the same client
//     against a bare gRPC SDS server that holds nothing: the client's
//     share plus the least a server must hold. heap − bare-heap is what
//     sds-server holds per node and stream beyond a bare gRPC stream.
//
// Streams are set up once per call (outside the timer); run with
// -benchtime 1x (or Nx) to avoid repeating the setup at each b.N.
func BenchmarkPushFanout(b *testing.B) {
	n := benchStreamCount(b)
	deadline := time.Now().Add(3 * time.Minute) // for each setup phase
	iss, err := newFastIssuer("bench root")
	if err != nil {
		b.Fatal(err)
	}
	other, err := newFastIssuer("bench second root")
	if err != nil {
		b.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kv := store.NewMemory()
	reg := bootstrap.NewRegistry(kv, time.Now)
	srv, err := New(ctx, Config{
		TrustDomain: testTrustDomain, CertTTL: time.Hour, Issuer: iss, Tokens: reg, Store: kv,
		Metrics: NewMetrics(prometheus.NewRegistry()), Logger: discardLogger(),
		RootsRefresh: time.Hour, // only the benchmark changes the bundle
	})
	if err != nil {
		b.Fatal(err)
	}
	token, _, err := reg.Create(ctx, bootstrap.CreateOptions{Service: "bench", Env: "default", TTL: time.Hour}, iss.root)
	if err != nil {
		b.Fatal(err)
	}

	bareHeap, bareStack := bareHeapPerStream(b, n, srv.rootCA.Load().res.any, time.Now().Add(3*time.Minute))

	tlsConf, creds := benchTLS(ctx, b)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, lis, tlsConf) }()
	conns := dialConns(b, lis.Addr().String(), creds, n)
	defer func() {
		closeConns(conns)
		cancel()
		select {
		case err := <-served:
			if err != nil {
				b.Errorf("Serve: %v", err)
			}
		case <-time.After(30 * time.Second):
			b.Errorf("Serve did not return within 30 s of its context ending")
		}
	}()

	h0, st0 := memNow()
	setup := time.Now()
	fc := openFanoutClients(b, conns, n, "Bearer "+token, deadline)
	defer fc.close(b)
	waitParked(b, srv, n, deadline)
	setupTime := time.Since(setup)
	h1, st1 := memNow()

	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			iss.setRoots(iss.root, other.root)
		} else {
			iss.setRoots(iss.root)
		}
		want := fc.total.Load() + int64(n)
		t0 := time.Now()
		if err := srv.RefreshRoots(ctx); err != nil {
			b.Fatal(err)
		}
		fc.waitTotal(b, want, time.Now().Add(time.Minute), fmt.Sprintf("bundle change %d", i))
		b.StopTimer()
		for s := range n {
			if c := fc.count[s].Load(); c != int64(i+2) {
				b.Fatalf("stream %d received %d responses after %d bundle changes, want %d", s, c, i+1, i+2)
			}
			lat = append(lat, time.Duration(fc.last[s].Load()-t0.UnixNano()))
		}
		waitParked(b, srv, n, time.Now().Add(time.Minute)) // every ACK processed
		b.StartTimer()
	}
	b.StopTimer()

	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p int) float64 {
		return float64(lat[min(len(lat)-1, len(lat)*p/100)]) / float64(time.Millisecond)
	}
	b.ReportMetric(pct(50), "p50-ms")
	b.ReportMetric(pct(99), "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1])/float64(time.Millisecond), "max-ms")
	b.ReportMetric(float64(h1-h0)/1024/float64(n), "heap-KiB/stream")
	b.ReportMetric(float64(st1-st0)/1024/float64(n), "stack-KiB/stream")
	b.ReportMetric(bareHeap/1024, "bare-heap-KiB/stream")
	b.ReportMetric(bareStack/1024, "bare-stack-KiB/stream")
	b.ReportMetric(setupTime.Seconds(), "setup-s")
	b.ReportMetric(float64(n), "streams")
}
