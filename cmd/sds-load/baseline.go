package main

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
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/bootstrap"
)

const baselineUsage = `Usage: sds-load baseline [flags]

A bare gRPC TLS server that does, per sidecar stream, only the work no SDS
server can avoid: the TLS handshake, one P-256 key, one signature by a test
CA, one response with the default and ROOTCA secrets. Run sds-load against it
on the same machine to know what the machine can do: the server's figures
divided by the baseline's do not depend on the machine. SIGHUP re-signs the
test CA and pushes the new ROOTCA to every stream (sds-load -push-cmd
'kill -HUP PID'). It serves ADS and SDS, SotW and Delta; not ECDS.

Flags:
`

type baselineConfig struct {
	listen, caOut, addrOut string
}

func parseBaseline(args []string, stderr io.Writer) (*baselineConfig, error) {
	c := &baselineConfig{}
	fs := flag.NewFlagSet("baseline", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, baselineUsage); fs.PrintDefaults() }
	fs.StringVar(&c.listen, "listen", "127.0.0.1:0", "listen address (loopback by default; port 0 picks one)")
	fs.StringVar(&c.caOut, "ca-out", "", "write the test CA (PEM) here, for sds-load -ca-file (required)")
	fs.StringVar(&c.addrOut, "addr-out", "", "also write the address listened on to this file once listening")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q (flags only)", fs.Arg(0))
	}
	if c.caOut == "" {
		return nil, errors.New("-ca-out is required")
	}
	return c, nil
}

// testCA is the baseline's signing CA; its certificate is re-signed on push.
type testCA struct {
	key  *ecdsa.PrivateKey
	mu   sync.Mutex
	cert *x509.Certificate
	pem  []byte
	push chan struct{} // closed and replaced on each push
}

func newTestCA() (*testCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	ca := &testCA{key: key, push: make(chan struct{})}
	return ca, ca.resign()
}

// resign makes a new self-signed CA certificate with the same key (so
// certificates signed before still chain) and wakes every stream.
func (ca *testCA) resign() error {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: "sds-load baseline CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &ca.key.PublicKey, ca.key)
	if err != nil {
		return err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return err
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	ca.cert, ca.pem = cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	close(ca.push)
	ca.push = make(chan struct{})
	return nil
}

func (ca *testCA) current() (*x509.Certificate, []byte, <-chan struct{}) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	return ca.cert, ca.pem, ca.push
}

// sign issues a certificate for pub, signed by the CA.
func (ca *testCA) sign(tmpl *x509.Certificate, pub any) ([]byte, error) {
	cert, _, _ := ca.current()
	return x509.CreateCertificate(rand.Reader, tmpl, cert, pub, ca.key)
}

// serverCert is the baseline's TLS certificate for localhost and loopback.
func (ca *testCA) serverCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	der, err := ca.sign(&x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, &key.PublicKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// leaf does a sidecar's irreducible work: one P-256 key, one signature, the
// key and chain in PEM.
func (ca *testCA) leaf(nodeID string) (chainPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	uri := &url.URL{Scheme: "spiffe", Host: "mesh.local", Path: "/ns/load/sa/" + nodeID}
	der, err := ca.sign(&x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: nodeID}, URIs: []*url.URL{uri},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}, &key.PublicKey)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}

func inline(b []byte) *core.DataSource {
	return &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: b}}
}

// secrets returns the resources named in names, minting the leaf only if
// `default` is among them.
func (ca *testCA) secrets(nodeID string, names []string) (map[string]*anypb.Any, error) {
	out := map[string]*anypb.Any{}
	for _, name := range names {
		var s *tlsv3.Secret
		switch name {
		case bootstrap.SecretDefault:
			chain, key, err := ca.leaf(nodeID)
			if err != nil {
				return nil, err
			}
			s = &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: inline(chain), PrivateKey: inline(key)}}}
		case bootstrap.SecretRootCA:
			s = rootSecret(ca)
		default:
			continue
		}
		a, err := anypb.New(s)
		if err != nil {
			return nil, err
		}
		out[name] = a
	}
	return out, nil
}

func rootSecret(ca *testCA) *tlsv3.Secret {
	_, p, _ := ca.current()
	return &tlsv3.Secret{Name: bootstrap.SecretRootCA, Type: &tlsv3.Secret_ValidationContext{
		ValidationContext: &tlsv3.CertificateValidationContext{TrustedCa: inline(p)}}}
}

// baselineServer serves ADS and SDS for secrets only.
type baselineServer struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	secretv3.UnimplementedSecretDiscoveryServiceServer
	ca *testCA
}

type sotwServerStream interface {
	Send(*discovery.DiscoveryResponse) error
	Recv() (*discovery.DiscoveryRequest, error)
	Context() context.Context
}

type deltaServerStream interface {
	Send(*discovery.DeltaDiscoveryResponse) error
	Recv() (*discovery.DeltaDiscoveryRequest, error)
	Context() context.Context
}

func (b *baselineServer) StreamAggregatedResources(s discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	return b.sotw(s)
}
func (b *baselineServer) DeltaAggregatedResources(s discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	return b.delta(s)
}
func (b *baselineServer) StreamSecrets(s secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	return b.sotw(s)
}
func (b *baselineServer) DeltaSecrets(s secretv3.SecretDiscoveryService_DeltaSecretsServer) error {
	return b.delta(s)
}

// recvLoop feeds a stream's requests to a channel until it fails.
func recvLoop[T any](recv func() (T, error)) (<-chan T, <-chan error) {
	reqs, errc := make(chan T), make(chan error, 1)
	go func() {
		for {
			r, err := recv()
			if err != nil {
				errc <- err
				return
			}
			reqs <- r
		}
	}()
	return reqs, errc
}

func (b *baselineServer) sotw(s sotwServerStream) error {
	reqs, errc := recvLoop(s.Recv)
	var nodeID string
	var names []string
	nonce := 0
	send := func(res map[string]*anypb.Any) error {
		nonce++
		resp := &discovery.DiscoveryResponse{TypeUrl: xdsres.SecretType, VersionInfo: fmt.Sprint(nonce), Nonce: fmt.Sprint(nonce)}
		for _, n := range names {
			if a, ok := res[n]; ok {
				resp.Resources = append(resp.Resources, a)
			}
		}
		return s.Send(resp)
	}
	var pushed <-chan struct{}
	var sent map[string]*anypb.Any
	for {
		select {
		case req := <-reqs:
			if req.GetNode().GetId() != "" {
				nodeID = req.GetNode().GetId()
			}
			if req.GetResponseNonce() != "" || req.GetTypeUrl() != xdsres.SecretType {
				continue // an ACK, or a type the baseline does not serve
			}
			names = req.GetResourceNames()
			_, _, pushed = b.ca.current()
			res, err := b.ca.secrets(nodeID, names)
			if err != nil {
				return err
			}
			sent = res
			if err := send(res); err != nil {
				return err
			}
		case <-pushed:
			_, _, pushed = b.ca.current()
			if _, ok := sent[bootstrap.SecretRootCA]; !ok {
				continue
			}
			a, err := anypb.New(rootSecret(b.ca))
			if err != nil {
				return err
			}
			sent[bootstrap.SecretRootCA] = a
			if err := send(sent); err != nil {
				return err
			}
		case err := <-errc:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

func (b *baselineServer) delta(s deltaServerStream) error {
	reqs, errc := recvLoop(s.Recv)
	var nodeID string
	nonce := 0
	send := func(res map[string]*anypb.Any) error {
		nonce++
		resp := &discovery.DeltaDiscoveryResponse{TypeUrl: xdsres.SecretType, Nonce: fmt.Sprint(nonce)}
		for n, a := range res {
			resp.Resources = append(resp.Resources, &discovery.Resource{Name: n, Version: fmt.Sprint(nonce), Resource: a})
		}
		return s.Send(resp)
	}
	var pushed <-chan struct{}
	rootSubscribed := false
	for {
		select {
		case req := <-reqs:
			if req.GetNode().GetId() != "" {
				nodeID = req.GetNode().GetId()
			}
			if req.GetTypeUrl() != xdsres.SecretType || len(req.GetResourceNamesSubscribe()) == 0 {
				continue
			}
			_, _, pushed = b.ca.current()
			res, err := b.ca.secrets(nodeID, req.GetResourceNamesSubscribe())
			if err != nil {
				return err
			}
			if _, ok := res[bootstrap.SecretRootCA]; ok {
				rootSubscribed = true
			}
			if err := send(res); err != nil {
				return err
			}
		case <-pushed:
			_, _, pushed = b.ca.current()
			if !rootSubscribed {
				continue
			}
			a, err := anypb.New(rootSecret(b.ca))
			if err != nil {
				return err
			}
			if err := send(map[string]*anypb.Any{bootstrap.SecretRootCA: a}); err != nil {
				return err
			}
		case err := <-errc:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// newBaselineServer returns the baseline gRPC server and its test CA.
func newBaselineServer() (*grpc.Server, *testCA, error) {
	ca, err := newTestCA()
	if err != nil {
		return nil, nil, fmt.Errorf("baseline CA: %w", err)
	}
	g, err := newTLSServer(ca)
	if err != nil {
		return nil, nil, err
	}
	srv := &baselineServer{ca: ca}
	discovery.RegisterAggregatedDiscoveryServiceServer(g, srv)
	secretv3.RegisterSecretDiscoveryServiceServer(g, srv)
	return g, ca, nil
}

// newTLSServer returns a gRPC server with a TLS certificate from ca.
func newTLSServer(ca *testCA) (*grpc.Server, error) {
	cert, err := ca.serverCert()
	if err != nil {
		return nil, fmt.Errorf("baseline server certificate: %w", err)
	}
	return grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})),
		grpc.MaxConcurrentStreams(1<<20)), nil
}

// runBaseline serves until ctx ends (SIGINT/SIGTERM in main).
func runBaseline(ctx context.Context, c *baselineConfig, stdout, logw io.Writer) error {
	if limit, err := raiseFileLimit(); err != nil {
		fmt.Fprintf(logw, "warning: %v\n", err)
	} else {
		fmt.Fprintf(logw, "open-file limit %d\n", limit)
	}
	g, ca, err := newBaselineServer()
	if err != nil {
		return err
	}
	_, caPEM, _ := ca.current()
	if err := os.WriteFile(c.caOut, caPEM, 0o644); err != nil {
		return fmt.Errorf("write -ca-out: %w", err)
	}
	lis, err := net.Listen("tcp", c.listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", c.listen, err)
	}
	addr := lis.Addr().String()
	if c.addrOut != "" {
		if err := os.WriteFile(c.addrOut, []byte(addr+"\n"), 0o644); err != nil {
			return fmt.Errorf("write -addr-out: %w", err)
		}
	}
	fmt.Fprintf(stdout, "baseline listening on %s (pid %d); CA in %s; SIGHUP pushes a new ROOTCA\n", addr, os.Getpid(), c.caOut)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				if err := ca.resign(); err != nil {
					fmt.Fprintf(logw, "push: %v\n", err)
				}
			case <-ctx.Done():
				g.Stop()
				return
			}
		}
	}()
	return g.Serve(lis)
}
