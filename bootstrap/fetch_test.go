package bootstrap

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
)

// tlsServer serves cert on 127.0.0.1 and records the ALPN protocols
// clients offer.
type tlsServer struct {
	addr   string
	mu     sync.Mutex
	offers [][]string
}

func startTLSServer(t *testing.T, cert tls.Certificate) *tlsServer {
	t.Helper()
	s := &tlsServer{}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"h2"},
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			s.mu.Lock()
			s.offers = append(s.offers, hello.SupportedProtos)
			s.mu.Unlock()
			return nil, nil
		},
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	s.addr = ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				_ = c.(*tls.Conn).Handshake()
				_ = c.Close()
			}()
		}
	}()
	return s
}

func TestFetchRoot(t *testing.T) {
	p := newPKI(t, "mesh", "spiffe://mesh.local/sds-server")
	srv := startTLSServer(t, p.tlsCert())
	tok := mustToken(t, p.root)

	root, rootPEM, err := FetchRoot(context.Background(), srv.addr, tok)
	if err != nil {
		t.Fatal(err)
	}
	if !root.Equal(p.root) {
		t.Fatal("FetchRoot returned another certificate than the pinned root")
	}
	blk, rest := pem.Decode(rootPEM)
	if blk == nil || blk.Type != "CERTIFICATE" || string(blk.Bytes) != string(p.root.Raw) || len(rest) != 0 {
		t.Fatal("root PEM is not the root certificate")
	}
	srv.mu.Lock()
	offered := slices.Contains(srv.offers[0], "h2")
	srv.mu.Unlock()
	if !offered {
		t.Fatal("FetchRoot did not offer ALPN h2 (grpc-go servers refuse such handshakes)")
	}
	// The result feeds RenderEnvoy directly.
	f := newEnvoyFixture(t)
	f.opts.Token, f.opts.RootPEM = tok.String(), rootPEM
	if _, err := RenderEnvoy(f.opts); err != nil {
		t.Fatalf("RenderEnvoy with the fetched root: %v", err)
	}
}

func TestFetchRootRefuses(t *testing.T) {
	p := newPKI(t, "mesh", "spiffe://mesh.local/sds-server")
	other := newPKI(t, "other", "spiffe://mesh.local/sds-server")
	workload := newPKI(t, "wl", "spiffe://mesh.local/ns/prod/sa/web")

	good := startTLSServer(t, p.tlsCert())
	// A leaf from another CA presented with p's intermediate and root.
	foreign := startTLSServer(t, tls.Certificate{
		Certificate: [][]byte{other.leaf.Raw, p.inter.Raw, p.root.Raw},
		PrivateKey:  other.leafKey,
	})
	notServer := startTLSServer(t, workload.tlsCert())

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()

	cases := []struct {
		name string
		ctx  context.Context
		addr string
		tok  Token
		want string
	}{
		{"token of another root", context.Background(), good.addr, mustToken(t, other.root), "does not match the token's digest"},
		{"leaf not signed by the pinned root", context.Background(), foreign.addr, mustToken(t, p.root), "does not chain to the pinned root"},
		{"not an sds-server certificate", context.Background(), notServer.addr, mustToken(t, workload.root), "not an sds-server certificate"},
		{"token pins the leaf", context.Background(), good.addr, Token{Digest: RootDigest(p.leaf), Secret: mustToken(t, p.root).Secret}, "not a CA certificate"},
		{"token without digest", context.Background(), good.addr, Token{}, "no valid root digest"},
		{"cancelled", cancelled, good.addr, mustToken(t, p.root), "canceled"},
		{"bad address", context.Background(), "127.0.0.1", mustToken(t, p.root), "want HOST:PORT"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			root, pemBytes, err := FetchRoot(c.ctx, c.addr, c.tok)
			if err == nil {
				t.Fatalf("FetchRoot accepted %v", root.Subject)
			}
			if root != nil || pemBytes != nil {
				t.Error("FetchRoot returned a root with an error")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
			if c.ctx == cancelled && !errors.Is(err, context.Canceled) {
				t.Errorf("error %v does not wrap context.Canceled", err)
			}
			if c.tok.Secret != "" && strings.Contains(err.Error(), c.tok.Secret) {
				t.Fatalf("error %q leaks the token secret", err)
			}
		})
	}

	t.Run("mismatch lists digests", func(t *testing.T) {
		_, _, err := FetchRoot(context.Background(), good.addr, mustToken(t, other.root))
		for _, want := range []string{good.addr, RootDigest(p.root), RootDigest(p.leaf), "refusing it"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q lacks %q", err, want)
			}
		}
	})

	t.Run("connection refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		_ = ln.Close()
		_, _, err = FetchRoot(context.Background(), addr, mustToken(t, p.root))
		var op *net.OpError
		if !errors.As(err, &op) {
			t.Fatalf("error %v does not wrap the dial error", err)
		}
	})
}

// TestFetchServerTrustDomain checks that FetchServer reports the trust
// domain of the server certificate it verified, whatever it is.
func TestFetchServerTrustDomain(t *testing.T) {
	for _, td := range []string{"mesh.local", "example.org"} {
		t.Run(td, func(t *testing.T) {
			p := newPKI(t, "mesh", "spiffe://"+td+"/sds-server")
			srv := startTLSServer(t, p.tlsCert())
			s, err := FetchServer(context.Background(), srv.addr, mustToken(t, p.root))
			if err != nil {
				t.Fatal(err)
			}
			if s.TrustDomain != td {
				t.Errorf("TrustDomain = %q, want %q", s.TrustDomain, td)
			}
			if !s.Root.Equal(p.root) || !strings.Contains(string(s.RootPEM), "BEGIN CERTIFICATE") {
				t.Error("FetchServer did not return the pinned root and its PEM")
			}
		})
	}
}

func TestServerTrustDomain(t *testing.T) {
	uris := func(ss ...string) *x509.Certificate {
		c := &x509.Certificate{}
		for _, s := range ss {
			u, err := url.Parse(s)
			if err != nil {
				t.Fatal(err)
			}
			c.URIs = append(c.URIs, u)
		}
		return c
	}
	tests := []struct {
		name    string
		leaf    *x509.Certificate
		want    string
		wantErr string
	}{
		{"one server ID", uris("spiffe://example.org/sds-server"), "example.org", ""},
		{"workload ID beside it", uris("spiffe://example.org/ns/prod/sa/web", "spiffe://example.org/sds-server"), "example.org", ""},
		{"no URI", uris(), "", "not an sds-server certificate"},
		{"workload only", uris("spiffe://example.org/ns/prod/sa/web"), "", "not an sds-server certificate"},
		{"https, not spiffe", uris("https://example.org/sds-server"), "", "not an sds-server certificate"},
		{"two trust domains", uris("spiffe://a.org/sds-server", "spiffe://b.org/sds-server"), "", "2 sds-server trust domains (a.org, b.org)"},
		{"port in the host", uris("spiffe://example.org:8443/sds-server"), "", "invalid trust domain"},
		{"upper case", uris("spiffe://Example.org/sds-server"), "", "invalid trust domain"},
		{"user info", uris("spiffe://u@example.org/sds-server"), "", "not an sds-server certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := serverTrustDomain(tt.leaf)
			if tt.wantErr == "" {
				if err != nil || got != tt.want {
					t.Fatalf("serverTrustDomain = %q, %v; want %q", got, err, tt.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || got != "" {
				t.Fatalf("serverTrustDomain = %q, %v; want an error saying %q", got, err, tt.wantErr)
			}
		})
	}
}
