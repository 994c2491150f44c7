package bootstrap

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"
)

func TestParseUpstream(t *testing.T) {
	cases := []struct {
		in, env string
		want    Upstream
		err     string // "" = success
	}{
		{in: "api=api@10.0.0.2:15000,9001", env: "prod", want: Upstream{"api", "prod", "api", "10.0.0.2", 15000, 9001}},
		{in: "db=staging/postgres@db.internal:15000,9002", env: "prod", want: Upstream{"db", "staging", "postgres", "db.internal", 15000, 9002}},
		{in: "db=staging/postgres@db.internal:15000,9002", env: "", want: Upstream{"db", "staging", "postgres", "db.internal", 15000, 9002}},
		{in: "v6=svc@[::1]:8443,1", env: "prod", want: Upstream{"v6", "prod", "svc", "::1", 8443, 1}},
		{in: "max=svc@h:65535,65535", env: "prod", want: Upstream{"max", "prod", "svc", "h", 65535, 65535}},
		{in: "", env: "prod", err: "no '='"},
		{in: "api@10.0.0.2:15000,9001", env: "prod", err: "no '='"},
		{in: "=api@10.0.0.2:15000,9001", env: "prod", err: "invalid upstream name"},
		{in: "API=api@10.0.0.2:15000,9001", env: "prod", err: "invalid upstream name"},
		{in: "api=api", env: "prod", err: "no '@'"},
		{in: "api=@10.0.0.2:15000,9001", env: "prod", err: "invalid service"},
		{in: "api=prod/@10.0.0.2:15000,9001", env: "prod", err: "invalid service"},
		{in: "api=a/b/c@10.0.0.2:15000,9001", env: "prod", err: "invalid service"},
		{in: "api=/api@10.0.0.2:15000,9001", env: "prod", err: "invalid environment"},
		{in: "api=api@10.0.0.2:15000,9001", env: "", err: "no environment"},
		{in: "api=api@10.0.0.2:15000,9001", env: "Prod", err: "invalid default environment"},
		{in: "api=api@10.0.0.2:15000", env: "prod", err: "no ',LOCAL_PORT'"},
		{in: "api=api@10.0.0.2,9001", env: "prod", err: "bad HOST:PORT"},
		{in: "api=api@::1:15000,9001", env: "prod", err: "bad HOST:PORT"},
		{in: "api=api@:15000,9001", env: "prod", err: "empty host"},
		{in: "api=api@bad_host!:15000,9001", env: "prod", err: "neither an IP address nor a valid DNS name"},
		{in: "api=api@10.0.0.2:0,9001", env: "prod", err: "port 0 is outside 1-65535"},
		{in: "api=api@10.0.0.2:65536,9001", env: "prod", err: "port 65536 is outside"},
		{in: "api=api@10.0.0.2:http,9001", env: "prod", err: `port "http" is not a number`},
		{in: "api=api@10.0.0.2:15000,", env: "prod", err: `local port "" is not a number`},
		{in: "api=api@10.0.0.2:15000,70000", env: "prod", err: "local port 70000 is outside"},
		{in: "api=api@10.0.0.2:15000,9001,9002", env: "prod", err: `port "15000,9001" is not a number`},
	}
	for _, c := range cases {
		t.Run(c.in, func(t *testing.T) {
			got, err := ParseUpstream(c.in, c.env)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("ParseUpstream = %+v, %v; want error saying %q", got, err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != c.want {
				t.Fatalf("ParseUpstream = %+v, want %+v", got, c.want)
			}
			back, err := ParseUpstream(got.String(), "")
			if err != nil || back != got {
				t.Fatalf("String() %q does not parse back: %+v, %v", got.String(), back, err)
			}
		})
	}
}

type envoyFixture struct {
	opts EnvoyOptions
	pki  *testPKI
	tok  Token
}

func newEnvoyFixture(t *testing.T) *envoyFixture {
	t.Helper()
	p := newPKI(t, "mesh", "spiffe://mesh.local/sds-server")
	tok := mustToken(t, p.root)
	return &envoyFixture{pki: p, tok: tok, opts: EnvoyOptions{
		NodeID:      "web-1",
		Cluster:     "web",
		Server:      "127.0.0.1:8443",
		Token:       tok.String(),
		RootPEM:     p.rootPEM,
		TrustDomain: "mesh.local",
		Env:         "prod",
		ListenAddr:  "0.0.0.0:15000",
		ServicePort: 8080,
		Upstreams: []Upstream{
			{Name: "api", Service: "api", Host: "10.0.0.2", Port: 15000, LocalPort: 9001},
			{Name: "db", Env: "staging", Service: "postgres", Host: "db.internal", Port: 15000, LocalPort: 9002},
		},
		AdminAddr: "127.0.0.1:9901",
	}}
}

// parseBootstrap reads RenderEnvoy's YAML back the way Envoy does:
// YAML -> JSON -> proto.
func parseBootstrap(t *testing.T, out []byte) (*bootstrapv3.Bootstrap, any) {
	t.Helper()
	j, err := yaml.YAMLToJSON(out)
	if err != nil {
		t.Fatalf("output is not YAML: %v", err)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(j, &b); err != nil {
		t.Fatalf("output is not a Bootstrap: %v", err)
	}
	if err := b.ValidateAll(); err != nil {
		t.Fatalf("parsed bootstrap is invalid: %v", err)
	}
	var generic any
	if err := json.Unmarshal(j, &generic); err != nil {
		t.Fatal(err)
	}
	return &b, generic
}

func unpack[T proto.Message](t *testing.T, a *anypb.Any, m T) T {
	t.Helper()
	if a == nil {
		t.Fatalf("missing typed config for %T", m)
	}
	if err := a.UnmarshalTo(m); err != nil {
		t.Fatalf("typed config %s: %v", a.GetTypeUrl(), err)
	}
	return m
}

func findCluster(t *testing.T, b *bootstrapv3.Bootstrap, name string) *clusterv3.Cluster {
	t.Helper()
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == name {
			return c
		}
	}
	t.Fatalf("no cluster %q", name)
	return nil
}

func findListener(t *testing.T, b *bootstrapv3.Bootstrap, name string) *listenerv3.Listener {
	t.Helper()
	for _, l := range b.GetStaticResources().GetListeners() {
		if l.GetName() == name {
			return l
		}
	}
	t.Fatalf("no listener %q", name)
	return nil
}

func endpointOf(c *clusterv3.Cluster) *corev3.SocketAddress {
	return c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
}

func sanMatchers(v *tlsv3.CertificateValidationContext) []string {
	var out []string
	for _, m := range v.GetMatchTypedSubjectAltNames() {
		s := m.GetSanType().String() + " "
		if e := m.GetMatcher().GetExact(); e != "" {
			s += "exact " + e
		} else {
			s += "prefix " + m.GetMatcher().GetPrefix()
		}
		out = append(out, s)
	}
	return out
}

// collect returns every value under key in a generic JSON tree.
func collect(v any, key string, out *[]any) {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if k == key {
				*out = append(*out, x)
			} else {
				collect(x, key, out)
			}
		}
	case []any:
		for _, x := range v {
			collect(x, key, out)
		}
	}
}

func TestRenderEnvoy(t *testing.T) {
	f := newEnvoyFixture(t)
	out, err := RenderEnvoy(f.opts)
	if err != nil {
		t.Fatal(err)
	}
	b, generic := parseBootstrap(t, out)
	bearer := "Bearer " + f.tok.String()

	if b.GetNode().GetId() != "web-1" || b.GetNode().GetCluster() != "web" {
		t.Errorf("node = %v", b.GetNode())
	}
	if got := b.GetAdmin().GetAddress().GetSocketAddress(); got.GetAddress() != "127.0.0.1" || got.GetPortValue() != 9901 {
		t.Errorf("admin address = %v", got)
	}

	t.Run("xds cluster", func(t *testing.T) {
		clusters := b.GetStaticResources().GetClusters()
		if clusters[0].GetName() != XDSClusterName {
			t.Fatalf("first cluster is %q, want %q", clusters[0].GetName(), XDSClusterName)
		}
		c := clusters[0]
		if c.GetType() != clusterv3.Cluster_STATIC {
			t.Errorf("type %v for an IP server, want STATIC", c.GetType())
		}
		if a := endpointOf(c); a.GetAddress() != "127.0.0.1" || a.GetPortValue() != 8443 {
			t.Errorf("endpoint %v", a)
		}
		if c.GetConnectTimeout().AsDuration() != 5*time.Second {
			t.Errorf("connect_timeout %v", c.GetConnectTimeout().AsDuration())
		}
		po := unpack(t, c.GetTypedExtensionProtocolOptions()[httpProtocolOptionsKey], &httpv3.HttpProtocolOptions{})
		if po.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
			t.Error("xds cluster does not speak HTTP/2")
		}
		if c.GetTransportSocket().GetName() != "envoy.transport_sockets.tls" {
			t.Fatalf("transport socket %q", c.GetTransportSocket().GetName())
		}
		tc := unpack(t, c.GetTransportSocket().GetTypedConfig(), &tlsv3.UpstreamTlsContext{})
		if tc.GetSni() != "" {
			t.Errorf("SNI %q sent for an IP literal", tc.GetSni())
		}
		ctc := tc.GetCommonTlsContext()
		if !reflect.DeepEqual(ctc.GetAlpnProtocols(), []string{"h2"}) {
			t.Errorf("alpn %v", ctc.GetAlpnProtocols())
		}
		if ctc.GetTlsParams().GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_2 {
			t.Errorf("tls params %v", ctc.GetTlsParams())
		}
		vc := ctc.GetValidationContext()
		if !bytes.Equal(vc.GetTrustedCa().GetInlineBytes(), f.pki.rootPEM) {
			t.Error("trusted_ca is not the root PEM")
		}
		if got := sanMatchers(vc); !reflect.DeepEqual(got, []string{"URI exact spiffe://mesh.local/sds-server"}) {
			t.Errorf("server SAN matchers %v", got)
		}
	})

	t.Run("ads", func(t *testing.T) {
		ads := b.GetDynamicResources().GetAdsConfig()
		if ads.GetApiType() != corev3.ApiConfigSource_GRPC || ads.GetTransportApiVersion() != corev3.ApiVersion_V3 || !ads.GetSetNodeOnFirstMessageOnly() {
			t.Errorf("ads_config %v", ads)
		}
		gs := ads.GetGrpcServices()
		if len(gs) != 1 || gs[0].GetEnvoyGrpc().GetClusterName() != XDSClusterName {
			t.Fatalf("grpc_services %v", gs)
		}
		md := gs[0].GetInitialMetadata()
		if len(md) != 1 || md[0].GetKey() != "authorization" || md[0].GetValue() != bearer {
			t.Errorf("initial_metadata does not carry the bearer token")
		}
		if b.GetDynamicResources().GetLdsConfig() != nil || b.GetDynamicResources().GetCdsConfig() != nil {
			t.Error("bootstrap subscribes to LDS/CDS")
		}
	})

	t.Run("sds configs identical", func(t *testing.T) {
		var srcs []any
		collect(generic, "sds_config", &srcs)
		if want := 2 + 2*len(f.opts.Upstreams); len(srcs) != want {
			t.Fatalf("%d sds_configs, want %d", len(srcs), want)
		}
		first, _ := json.Marshal(srcs[0])
		for _, s := range srcs[1:] {
			if j, _ := json.Marshal(s); !bytes.Equal(j, first) {
				t.Fatalf("sds_configs differ:\n%s\n%s", first, j)
			}
		}
		// Same bytes in the YAML text too, whatever their indentation.
		blocks := yamlBlocks(string(out), "sds_config:")
		if len(blocks) != len(srcs) {
			t.Fatalf("%d sds_config blocks in the text, want %d", len(blocks), len(srcs))
		}
		for _, blk := range blocks[1:] {
			if blk != blocks[0] {
				t.Fatalf("sds_config blocks differ:\n%s\n%s", blocks[0], blk)
			}
		}
		// Standalone SDS on the xDS cluster with the token: SDS over ADS
		// crashes Envoy 1.40 in static clusters (envoy#15517).
		var src corev3.ConfigSource
		if err := protojson.Unmarshal(first, &src); err != nil {
			t.Fatal(err)
		}
		if src.GetAds() != nil {
			t.Fatal("sds_config uses ADS, which crashes Envoy 1.40 in static clusters")
		}
		if !proto.Equal(src.GetApiConfigSource(), b.GetDynamicResources().GetAdsConfig()) || src.GetResourceApiVersion() != corev3.ApiVersion_V3 {
			t.Fatalf("sds_config %s is not the authenticated gRPC source of the xds cluster", first)
		}
	})

	t.Run("inbound", func(t *testing.T) {
		l := findListener(t, b, InboundListenerName)
		if a := l.GetAddress().GetSocketAddress(); a.GetAddress() != "0.0.0.0" || a.GetPortValue() != 15000 {
			t.Errorf("inbound address %v", a)
		}
		fc := l.GetFilterChains()[0]
		dtc := unpack(t, fc.GetTransportSocket().GetTypedConfig(), &tlsv3.DownstreamTlsContext{})
		if !dtc.GetRequireClientCertificate().GetValue() {
			t.Error("inbound does not require a client certificate")
		}
		ctc := dtc.GetCommonTlsContext()
		if ctc.GetTlsParams().GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_2 {
			t.Errorf("tls params %v", ctc.GetTlsParams())
		}
		if s := ctc.GetTlsCertificateSdsSecretConfigs(); len(s) != 1 || s[0].GetName() != SecretDefault {
			t.Errorf("certificate secrets %v", s)
		}
		cvc := ctc.GetCombinedValidationContext()
		if cvc.GetValidationContextSdsSecretConfig().GetName() != SecretRootCA {
			t.Errorf("validation secret %v", cvc.GetValidationContextSdsSecretConfig())
		}
		if got := sanMatchers(cvc.GetDefaultValidationContext()); !reflect.DeepEqual(got, []string{"URI prefix spiffe://mesh.local/"}) {
			t.Errorf("inbound SAN matchers %v", got)
		}
		h := unpack(t, fc.GetFilters()[0].GetTypedConfig(), &hcmv3.HttpConnectionManager{})
		if h.GetStatPrefix() != "inbound" || h.GetCodecType() != hcmv3.HttpConnectionManager_AUTO ||
			!h.GetNormalizePath().GetValue() || !h.GetMergeSlashes() ||
			h.GetPathWithEscapedSlashesAction() != hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT ||
			h.GetForwardClientCertDetails() != hcmv3.HttpConnectionManager_SANITIZE_SET ||
			!h.GetSetCurrentClientCertDetails().GetUri() || !h.GetSetCurrentClientCertDetails().GetCert() {
			t.Errorf("inbound HCM %v", h)
		}
		filters := h.GetHttpFilters()
		if filters[len(filters)-1].GetName() != "envoy.filters.http.router" {
			t.Errorf("router is not the last HTTP filter")
		}
		if got := h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0].GetRoute().GetCluster(); got != LocalAppClusterName {
			t.Errorf("inbound routes to %q", got)
		}
		app := findCluster(t, b, LocalAppClusterName)
		if a := endpointOf(app); app.GetType() != clusterv3.Cluster_STATIC || a.GetAddress() != "127.0.0.1" || a.GetPortValue() != 8080 || app.GetConnectTimeout().AsDuration() != time.Second {
			t.Errorf("local_app cluster %v", app)
		}
	})

	t.Run("upstreams", func(t *testing.T) {
		cases := []struct {
			name, service, san, host string
			typ                      clusterv3.Cluster_DiscoveryType
			local                    uint32
		}{
			{"api", "api", "spiffe://mesh.local/ns/prod/sa/api", "10.0.0.2", clusterv3.Cluster_STATIC, 9001},
			{"db", "postgres", "spiffe://mesh.local/ns/staging/sa/postgres", "db.internal", clusterv3.Cluster_STRICT_DNS, 9002},
		}
		for _, u := range cases {
			l := findListener(t, b, "outbound_"+u.name)
			if a := l.GetAddress().GetSocketAddress(); a.GetAddress() != "127.0.0.1" || a.GetPortValue() != u.local {
				t.Errorf("%s listener address %v", u.name, a)
			}
			h := unpack(t, l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig(), &hcmv3.HttpConnectionManager{})
			if got := h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0].GetRoute().GetCluster(); got != "out_"+u.name {
				t.Errorf("%s listener routes to %q", u.name, got)
			}
			c := findCluster(t, b, "out_"+u.name)
			if c.GetType() != u.typ || endpointOf(c).GetAddress() != u.host || endpointOf(c).GetPortValue() != 15000 {
				t.Errorf("%s cluster type %v endpoint %v", u.name, c.GetType(), endpointOf(c))
			}
			if c.GetConnectTimeout().AsDuration() != 2*time.Second {
				t.Errorf("%s connect_timeout %v", u.name, c.GetConnectTimeout().AsDuration())
			}
			po := unpack(t, c.GetTypedExtensionProtocolOptions()[httpProtocolOptionsKey], &httpv3.HttpProtocolOptions{})
			if po.GetCommonHttpProtocolOptions().GetMaxConnectionDuration().AsDuration() != DefaultMaxConnectionDuration {
				t.Errorf("%s max_connection_duration %v", u.name, po.GetCommonHttpProtocolOptions().GetMaxConnectionDuration())
			}
			if d := po.GetUseDownstreamProtocolConfig(); d.GetHttpProtocolOptions() == nil || d.GetHttp2ProtocolOptions() == nil {
				t.Errorf("%s upstream does not follow the downstream protocol (HTTP/1.1 and HTTP/2)", u.name)
			}
			tc := unpack(t, c.GetTransportSocket().GetTypedConfig(), &tlsv3.UpstreamTlsContext{})
			if tc.GetSni() != u.service {
				t.Errorf("%s SNI %q", u.name, tc.GetSni())
			}
			ctc := tc.GetCommonTlsContext()
			if s := ctc.GetTlsCertificateSdsSecretConfigs(); len(s) != 1 || s[0].GetName() != SecretDefault {
				t.Errorf("%s certificate secrets %v", u.name, s)
			}
			cvc := ctc.GetCombinedValidationContext()
			if cvc.GetValidationContextSdsSecretConfig().GetName() != SecretRootCA {
				t.Errorf("%s validation secret %v", u.name, cvc.GetValidationContextSdsSecretConfig())
			}
			if got := sanMatchers(cvc.GetDefaultValidationContext()); !reflect.DeepEqual(got, []string{"URI exact " + u.san}) {
				t.Errorf("%s SAN matchers %v", u.name, got)
			}
		}
	})

	t.Run("deterministic", func(t *testing.T) {
		again, err := RenderEnvoy(f.opts)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatal("two renderings of the same options differ")
		}
	})
}

// yamlBlocks returns, for each line ending in marker, the block of deeper
// indented lines after it, dedented.
func yamlBlocks(text, marker string) []string {
	lines := strings.Split(text, "\n")
	var out []string
	for i, l := range lines {
		trimmed := strings.TrimLeft(l, " -")
		if trimmed != marker {
			continue
		}
		indent := len(l) - len(trimmed)
		var blk []string
		for _, m := range lines[i+1:] {
			if len(m)-len(strings.TrimLeft(m, " ")) <= indent {
				break
			}
			blk = append(blk, m[indent:])
		}
		out = append(out, strings.Join(blk, "\n"))
	}
	return out
}

func TestRenderEnvoyVariants(t *testing.T) {
	t.Run("DNS server, no admin, custom duration", func(t *testing.T) {
		f := newEnvoyFixture(t)
		f.opts.Server = "sds.mesh.internal:8443"
		f.opts.AdminAddr = ""
		f.opts.MaxConnectionDuration = 90 * time.Second
		out, err := RenderEnvoy(f.opts)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := parseBootstrap(t, out)
		c := b.GetStaticResources().GetClusters()[0]
		if c.GetName() != XDSClusterName || c.GetType() != clusterv3.Cluster_STRICT_DNS {
			t.Errorf("xds cluster %q type %v, want STRICT_DNS first", c.GetName(), c.GetType())
		}
		if tc := unpack(t, c.GetTransportSocket().GetTypedConfig(), &tlsv3.UpstreamTlsContext{}); tc.GetSni() != "sds.mesh.internal" {
			t.Errorf("SNI %q", tc.GetSni())
		}
		if b.GetAdmin() != nil {
			t.Error("admin configured without AdminAddr")
		}
		po := unpack(t, findCluster(t, b, "out_api").GetTypedExtensionProtocolOptions()[httpProtocolOptionsKey], &httpv3.HttpProtocolOptions{})
		if po.GetCommonHttpProtocolOptions().GetMaxConnectionDuration().AsDuration() != 90*time.Second {
			t.Errorf("max_connection_duration %v", po.GetCommonHttpProtocolOptions().GetMaxConnectionDuration())
		}
		for _, typ := range []string{"EDS", "eds_cluster_config"} {
			if bytes.Contains(out, []byte(typ)) {
				t.Errorf("output mentions %s", typ)
			}
		}
	})
	t.Run("admin on a Unix socket", func(t *testing.T) {
		f := newEnvoyFixture(t)
		f.opts.AdminAddr, f.opts.AdminSocket = "", "/run/envoy/web-1.admin.sock"
		out, err := RenderEnvoy(f.opts)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := parseBootstrap(t, out)
		pipe := b.GetAdmin().GetAddress().GetPipe()
		if pipe.GetPath() != "/run/envoy/web-1.admin.sock" || pipe.GetMode() != 0o600 {
			t.Errorf("admin pipe = %v, want /run/envoy/web-1.admin.sock mode 0600", pipe)
		}
		if b.GetAdmin().GetAddress().GetSocketAddress() != nil {
			t.Errorf("admin has a TCP address too: %v", b.GetAdmin().GetAddress())
		}
	})
	for _, c := range []struct {
		name, addr string
		insecure   bool
		wantIP     string
		wantPort   uint32
	}{
		{"admin on localhost", "localhost:9901", false, "127.0.0.1", 9901},
		{"admin on IPv6 loopback", "[::1]:9901", false, "::1", 9901},
		{"admin on 127.0.0.2", "127.0.0.2:9901", false, "127.0.0.2", 9901},
		{"insecure admin allowed", "0.0.0.0:9901", true, "0.0.0.0", 9901},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newEnvoyFixture(t)
			f.opts.AdminAddr, f.opts.AllowInsecureAdmin = c.addr, c.insecure
			out, err := RenderEnvoy(f.opts)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := parseBootstrap(t, out)
			if got := b.GetAdmin().GetAddress().GetSocketAddress(); got.GetAddress() != c.wantIP || got.GetPortValue() != c.wantPort {
				t.Errorf("admin address = %v, want %s:%d", got, c.wantIP, c.wantPort)
			}
		})
	}
	t.Run("no upstreams", func(t *testing.T) {
		f := newEnvoyFixture(t)
		f.opts.Upstreams = nil
		out, err := RenderEnvoy(f.opts)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := parseBootstrap(t, out)
		if n := len(b.GetStaticResources().GetListeners()); n != 1 {
			t.Errorf("%d listeners", n)
		}
	})
	t.Run("header redacts", func(t *testing.T) {
		f := newEnvoyFixture(t)
		out, err := RenderEnvoy(f.opts)
		if err != nil {
			t.Fatal(err)
		}
		header := strings.SplitN(string(out), "\nadmin:", 2)[0]
		if !strings.HasPrefix(header, "#") || strings.Contains(header, f.tok.Secret) {
			t.Errorf("header %q", header)
		}
	})
}

func TestRenderEnvoyInvalid(t *testing.T) {
	other := newPKI(t, "other", "")
	cases := []struct {
		name string
		mod  func(*EnvoyOptions)
		want string
	}{
		{"no node id", func(o *EnvoyOptions) { o.NodeID = "" }, "node ID is empty"},
		{"node id with space", func(o *EnvoyOptions) { o.NodeID = "a b" }, "white space"},
		{"no cluster", func(o *EnvoyOptions) { o.Cluster = "" }, "node cluster is empty"},
		{"server without port", func(o *EnvoyOptions) { o.Server = "127.0.0.1" }, "server address"},
		{"server port 0", func(o *EnvoyOptions) { o.Server = "127.0.0.1:0" }, "port 0 is outside"},
		{"server bad host", func(o *EnvoyOptions) { o.Server = "a b:8443" }, "neither an IP address nor a valid DNS name"},
		{"malformed token", func(o *EnvoyOptions) { o.Token = o.Token[:len(o.Token)-1] }, "secret has 30 characters"},
		{"empty token", func(o *EnvoyOptions) { o.Token = "" }, "bootstrap token is empty"},
		{"token of another root", func(o *EnvoyOptions) { o.RootPEM = other.rootPEM }, "matches no certificate"},
		{"no PEM", func(o *EnvoyOptions) { o.RootPEM = nil }, "holds no certificate"},
		{"garbage PEM", func(o *EnvoyOptions) { o.RootPEM = append(o.RootPEM, "junk"...) }, "trailing data"},
		{"key PEM", func(o *EnvoyOptions) {
			o.RootPEM = append(o.RootPEM, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"...)
		}, `"PRIVATE KEY" block`},
		{"bad certificate", func(o *EnvoyOptions) {
			o.RootPEM = []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
		}, "certificate 1"},
		{"bad trust domain", func(o *EnvoyOptions) { o.TrustDomain = "Mesh Local" }, "invalid trust domain"},
		{"bad env", func(o *EnvoyOptions) { o.Env = "PROD" }, "invalid environment"},
		{"listen on a name", func(o *EnvoyOptions) { o.ListenAddr = "localhost:15000" }, "must be an IP address"},
		{"listen port 70000", func(o *EnvoyOptions) { o.ListenAddr = "0.0.0.0:70000" }, "outside 1-65535"},
		{"service port 0", func(o *EnvoyOptions) { o.ServicePort = 0 }, "service port 0"},
		{"negative duration", func(o *EnvoyOptions) { o.MaxConnectionDuration = -time.Second }, "negative"},
		{"negative connection limit", func(o *EnvoyOptions) { o.MaxDownstreamConnections = -1 }, "max downstream connections -1 is negative"},
		{"relative access log", func(o *EnvoyOptions) { o.AccessLog = "access.log" }, `access log path "access.log" is not absolute`},
		{"access log with a newline", func(o *EnvoyOptions) { o.AccessLog = "/var/log/a\nb.log" }, "NUL or newline"},
		{"admin on a name", func(o *EnvoyOptions) { o.AdminAddr = "admin.internal:9901" }, "must be an IP address"},
		{"admin on all addresses", func(o *EnvoyOptions) { o.AdminAddr = "0.0.0.0:9901" }, "0.0.0.0:9901: not a loopback address"},
		{"admin on all IPv6 addresses", func(o *EnvoyOptions) { o.AdminAddr = "[::]:9901" }, "not a loopback address"},
		{"admin on a LAN address", func(o *EnvoyOptions) { o.AdminAddr = "10.0.0.1:9901" }, "/config_dump"},
		{"admin on localhost and inbound", func(o *EnvoyOptions) { o.AdminAddr = "localhost:15000" }, "same address"},
		{"admin socket and address", func(o *EnvoyOptions) { o.AdminSocket = "/run/envoy/admin.sock" }, "choose one"},
		{"relative admin socket", func(o *EnvoyOptions) { o.AdminAddr, o.AdminSocket = "", "admin.sock" }, "not absolute"},
		{"abstract admin socket", func(o *EnvoyOptions) { o.AdminAddr, o.AdminSocket = "", "@envoy-admin" }, "not absolute"},
		{"long admin socket", func(o *EnvoyOptions) { o.AdminAddr, o.AdminSocket = "", "/"+strings.Repeat("d", 100)+"/admin.sock" }, "longer than the 104"},
		{"admin socket with a newline", func(o *EnvoyOptions) { o.AdminAddr, o.AdminSocket = "", "/run/a\nb.sock" }, "control characters"},
		{"admin on inbound", func(o *EnvoyOptions) { o.AdminAddr = "127.0.0.1:15000" }, "same address"},
		{"upstream on inbound", func(o *EnvoyOptions) { o.Upstreams[0].LocalPort = 15000 }, "same address"},
		{"two upstreams one port", func(o *EnvoyOptions) { o.Upstreams[1].LocalPort = 9001 }, "same address"},
		{"upstream on the app", func(o *EnvoyOptions) { o.Upstreams[0].LocalPort = 8080 }, "the local app"},
		{"inbound on the app", func(o *EnvoyOptions) { o.ListenAddr = "127.0.0.1:8080" }, "the local app"},
		{"upstream on the server", func(o *EnvoyOptions) { o.Upstreams[0].LocalPort = 8443 }, "sds-server"},
		{"duplicate upstream", func(o *EnvoyOptions) { o.Upstreams[1].Name = "api" }, `upstream name "api" is used twice`},
		{"upstream without env", func(o *EnvoyOptions) { o.Env = ""; o.Upstreams[0].Env = "" }, "no environment"},
		{"upstream bad service", func(o *EnvoyOptions) { o.Upstreams[0].Service = "A" }, "invalid service"},
		{"upstream bad name", func(o *EnvoyOptions) { o.Upstreams[0].Name = "a b" }, "invalid upstream name"},
		{"upstream port 0", func(o *EnvoyOptions) { o.Upstreams[0].Port = 0 }, "port 0"},
		{"upstream bad host", func(o *EnvoyOptions) { o.Upstreams[0].Host = "" }, "empty host"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newEnvoyFixture(t)
			c.mod(&f.opts)
			out, err := RenderEnvoy(f.opts)
			if err == nil {
				t.Fatalf("RenderEnvoy succeeded:\n%s", out)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
			if strings.Contains(err.Error(), f.tok.Secret) || strings.Contains(err.Error(), f.tok.Secret[:12]) {
				t.Errorf("error %q leaks the token secret", err)
			}
		})
	}
}

// envoyBinary finds the Envoy to validate with: $SDS_ENVOY_BIN, else
// .tools/bin/envoy at the repository root. It skips the test when there is
// none, unless SDS_REQUIRE_E2E=1.
func envoyBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("SDS_ENVOY_BIN"); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("SDS_ENVOY_BIN: %v", err)
		}
		return p
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, ".tools", "bin", "envoy")
			if _, err := os.Stat(p); err == nil {
				return p
			}
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	if os.Getenv("SDS_REQUIRE_E2E") == "1" {
		t.Fatal("envoy not found (set SDS_ENVOY_BIN or install .tools/bin/envoy) and SDS_REQUIRE_E2E=1")
	}
	t.Skip("envoy not found: set SDS_ENVOY_BIN or install .tools/bin/envoy")
	return ""
}

func TestEnvoyValidatesBootstrap(t *testing.T) {
	bin := envoyBinary(t)
	cases := []struct {
		name string
		mod  func(*EnvoyOptions)
	}{
		{"two upstreams, DNS server, admin", func(o *EnvoyOptions) { o.Server = "sds.mesh.internal:8443" }},
		{"admin on a Unix socket", func(o *EnvoyOptions) { o.AdminAddr, o.AdminSocket = "", "/run/envoy/admin.sock" }},
		{"access log, connection limit", func(o *EnvoyOptions) {
			o.AccessLog, o.MaxDownstreamConnections = "/dev/null", 100
		}},
		// Names YAML 1.1 reads as booleans must stay strings.
		{"IP server, tricky names, no admin", func(o *EnvoyOptions) {
			o.NodeID, o.Cluster, o.AdminAddr = "n", "on", ""
			o.Upstreams[0].Service = "y"
			o.Upstreams[1].Name = "no"
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newEnvoyFixture(t)
			c.mod(&f.opts)
			out, err := RenderEnvoy(f.opts)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(t.TempDir(), "envoy.yaml")
			if err := os.WriteFile(path, out, 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, "--mode", "validate", "-c", path, "-l", "warn")
			got, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if errors.As(err, &exit) || err != nil {
				t.Fatalf("envoy --mode validate: %v\n%s\nconfig:\n%s", err, got, out)
			}
			if !strings.Contains(string(got), "OK") {
				t.Fatalf("envoy did not say OK:\n%s", got)
			}
		})
	}
}
