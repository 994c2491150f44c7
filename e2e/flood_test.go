package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/bootstrap"
)

// Flood sizes (issue 11): every loop below is bounded by these and by the
// test's deadline.
const (
	floodIdleConns     = 1000
	floodStreamsPerSec = 1000
	floodDuration      = 10 * time.Second
	floodNames         = 100_000
	floodMaxLogBytes   = 1 << 20
)

// floodSource is the loopback address the attacker dials from, so that the
// per-address limit on authentication failures (which it trips) is not the
// real sidecar's (127.0.0.1).
const floodSource = "127.0.0.2"

// TestFlood attacks a running server the way the hardening review did, all
// at once and on loopback: 1,000 TLS connections that open no stream, 1,000
// unauthenticated streams per second for 10 s, and one authenticated request
// naming 100,000 secrets. Meanwhile a real Envoy sidecar must keep getting
// its renewals pushed (20 s certificates renew every 10-16 s), the server's
// log must stay under 1 MB, and its memory growth is reported.
func TestFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("flood e2e takes about 40 s")
	}
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	src := &net.TCPAddr{IP: net.ParseIP(floodSource)}
	if l, err := net.Listen("tcp", floodSource+":0"); err != nil {
		t.Skipf("loopback address %s unusable here: %v", floodSource, err)
	} else {
		l.Close()
	}
	srv := startServer(t, bin, "--cert-ttl", "20s", "--allow-short-ttl")
	sc := startSidecar(t, srv, envoyBin, "api")
	tlsConf := floodTLS(t, srv)
	root := readRoot(t, srv)
	attackerTok := strings.TrimSpace(srv.cli(t, "token", "create", "--service", "attacker"))

	w := &certWatcher{known: map[string]bool{}}
	bg := newBackground(t)
	bg.every(200*time.Millisecond, func() { w.poll(sc.envoy.admin) })
	eventually(t, 10*time.Second, "the sidecar's first certificate in /certs", func() error {
		if len(w.certs()) == 0 {
			return errors.New("none yet")
		}
		return nil
	})
	rss0 := rssKiB(t, srv.pid())
	log0 := len(srv.out.String())
	start := time.Now()

	// 1. Idle TLS connections: handshake done, not one HTTP/2 stream.
	idle := openIdleTLS(t, srv.addr, src, tlsConf, floodIdleConns)
	t.Logf("idle TLS connections: %d of %d completed the handshake", idle.opened, floodIdleConns)

	// 2. One request with 100,000 names on an authenticated stream.
	bigErr := hugeRequest(t, srv.addr, src, tlsConf, attackerTok, floodNames)
	t.Logf("%d-name request: %v", floodNames, bigErr)
	if code := status.Code(bigErr); code != codes.InvalidArgument && code != codes.ResourceExhausted {
		t.Errorf("%d-name request: got %v, want InvalidArgument or ResourceExhausted", floodNames, bigErr)
	}

	// 3. Unauthenticated streams at 1,000/s: well-formed tokens pinning the
	// right root with random secrets, the costliest guess to refuse.
	codesSeen := unauthFlood(t, srv.addr, src, tlsConf, root, floodStreamsPerSec, floodDuration)
	t.Logf("unauthenticated streams refused by code: %v", codesSeen)
	for c, n := range codesSeen {
		if c == codes.OK.String() {
			t.Errorf("%d unauthenticated streams were served", n)
		}
	}

	// The sidecar kept renewing through it all: at least one certificate
	// loaded after the flood began, and it still is served one within a
	// renewal period after.
	eventually(t, 30*time.Second, "a renewal pushed to the sidecar during or after the flood", func() error {
		for _, c := range w.certs() {
			if c.firstSeen.After(start) {
				return nil
			}
		}
		return fmt.Errorf("certificates seen: %d, none since the flood began", len(w.certs()))
	})
	bg.stop()
	rss1 := rssKiB(t, srv.pid())
	logBytes := len(srv.out.String()) - log0
	t.Logf("server log during the flood: %d bytes; RSS %d KiB -> %d KiB (%+d KiB); %d certificates loaded by the sidecar",
		logBytes, rss0, rss1, rss1-rss0, len(w.certs()))
	if logBytes > floodMaxLogBytes {
		t.Errorf("server wrote %d bytes of log during the flood, want at most %d", logBytes, floodMaxLogBytes)
	}
	idle.close()
	if !srv.alive() {
		t.Fatal("sds-server died during the flood")
	}
}

// floodTLS is a client TLS config that trusts the server's root, as an
// attacker who fetched it (it is public) would.
func floodTLS(t *testing.T, srv *server) *tls.Config {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(readRoot(t, srv))
	return &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12}
}

func readRoot(t *testing.T, srv *server) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(srv.dataDir, "ca", "root.crt"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("root.crt: no PEM block")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// rssKiB reads a process's resident set size.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// idleConns are connections held open without a stream.
type idleConns struct {
	conns  []net.Conn
	opened int
}

func (c *idleConns) close() {
	for _, x := range c.conns {
		_ = x.Close()
	}
}

// openIdleTLS opens n TLS connections from src and keeps them open; a
// connection the server refuses (a limit) is not an error.
func openIdleTLS(t *testing.T, addr string, src *net.TCPAddr, conf *tls.Config, n int) *idleConns {
	t.Helper()
	out := &idleConns{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			d := &net.Dialer{LocalAddr: src, Timeout: 5 * time.Second}
			c, err := tls.DialWithDialer(d, "tcp", addr, conf)
			if err != nil {
				return
			}
			mu.Lock()
			out.conns = append(out.conns, c)
			out.opened++
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Cleanup(out.close)
	return out
}

// grpcFrom dials the server from src over TLS.
func grpcFrom(t *testing.T, addr string, src *net.TCPAddr, conf *tls.Config) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(conf)),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			d := &net.Dialer{LocalAddr: src}
			return d.DialContext(ctx, "tcp", a)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// hugeRequest sends one SDS request naming n secrets with a valid token and
// returns how the stream ended.
func hugeRequest(t *testing.T, addr string, src *net.TCPAddr, conf *tls.Config, token string, n int) error {
	t.Helper()
	cc := grpcFrom(t, addr, src, conf)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("name-%06d", i)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: "attacker-1", Cluster: "attacker"},
		TypeUrl: xdsres.SecretType, ResourceNames: names}); err != nil {
		_, rerr := stream.Recv()
		return rerr
	}
	for {
		if _, err := stream.Recv(); err != nil {
			return err
		}
	}
}

// unauthFlood opens perSec streams per second for d, each with a fresh
// random token, and counts how each ended by gRPC code.
func unauthFlood(t *testing.T, addr string, src *net.TCPAddr, conf *tls.Config, root *x509.Certificate, perSec int, d time.Duration) map[string]int {
	t.Helper()
	// A few connections, as an attacker multiplexing streams would.
	ccs := make([]*grpc.ClientConn, 4)
	for i := range ccs {
		ccs[i] = grpcFrom(t, addr, src, conf)
	}
	total := int(d.Seconds()) * perSec
	var mu sync.Mutex
	seen := map[string]int{}
	var wg sync.WaitGroup
	var sent atomic.Int64
	sem := make(chan struct{}, 200)
	tick := time.NewTicker(time.Second / time.Duration(perSec/10))
	defer tick.Stop()
	deadline := time.Now().Add(d + 30*time.Second)
	for i := 0; i < total && time.Now().Before(deadline); {
		<-tick.C
		for j := 0; j < 10 && i < total; j, i = j+1, i+1 {
			select {
			case sem <- struct{}{}:
			default: // the server is slower than the attacker: skip, do not queue
				continue
			}
			tok, err := bootstrap.New(root)
			if err != nil {
				t.Fatal(err)
			}
			cc := ccs[i%len(ccs)]
			wg.Add(1)
			sent.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok.String())
				code := codes.OK
				stream, err := discovery.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(ctx)
				if err == nil {
					// A failed Send (io.EOF) means the server ended the
					// stream: Recv returns its status.
					_ = stream.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: "guess", Cluster: "guess"}, TypeUrl: xdsres.SecretType, ResourceNames: []string{"default"}})
					_, err = stream.Recv()
				}
				if err != nil {
					code = status.Code(err)
				}
				mu.Lock()
				seen[code.String()]++
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	t.Logf("unauthenticated streams: %d opened of %d planned", sent.Load(), total)
	return seen
}
