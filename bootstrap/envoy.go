package bootstrap

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"sigs.k8s.io/yaml"

	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"

	"github.com/meshid/sds-server/issuer"
)

// Names used in the generated bootstrap. Other packages (e2e, the xDS
// server) may rely on them.
const (
	// XDSClusterName is the static cluster that reaches sds-server.
	XDSClusterName = "sds-server"
	// InboundListenerName is the mTLS listener in front of the local app.
	InboundListenerName = "inbound"
	// LocalAppClusterName is the cluster of the local app on 127.0.0.1.
	LocalAppClusterName = "local_app"
	// SecretDefault is the SDS name of the sidecar's own certificate.
	SecretDefault = "default"
	// SecretRootCA is the SDS name of the trust bundle (validation context).
	SecretRootCA = "ROOTCA"
	// RevokedFilterName is the first inbound HTTP filter: an RBAC DENY list
	// of revoked nodes' certificates, served over ECDS to every sidecar. It
	// closes the gap the CRL leaves: connections opened before a revocation
	// are not re-validated by TLS, but each request passes this filter.
	RevokedFilterName = "revoked"
	// RBACFilterName is the second inbound HTTP filter: the destination
	// service's ACL compiled to RBAC (ALLOW), served over ECDS.
	RBACFilterName = "rbac"
	// RBACTypeURL is the type of both filters' ECDS resources.
	RBACTypeURL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
	// DefaultMaxConnectionDuration bounds pooled upstream connections, so
	// that a rotated client certificate is used within that time.
	DefaultMaxConnectionDuration = 10 * time.Minute

	outboundListenerPrefix = "outbound_"
	outboundClusterPrefix  = "out_"

	httpProtocolOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
	tlsTransportSocket     = "envoy.transport_sockets.tls"
	hcmFilterName          = "envoy.filters.network.http_connection_manager"
	routerFilterName       = "envoy.filters.http.router"
)

// OutboundListenerName is the name of the local listener of upstream name.
func OutboundListenerName(name string) string { return outboundListenerPrefix + name }

// OutboundClusterName is the name of the cluster of upstream name.
func OutboundClusterName(name string) string { return outboundClusterPrefix + name }

// Upstream is a service the local app calls through the sidecar: the app
// talks plain HTTP to 127.0.0.1:LocalPort, Envoy talks mTLS to Host:Port and
// requires the peer to be Env/Service.
type Upstream struct {
	Name      string // names the listener and cluster (outbound_<name>, out_<name>)
	Env       string // environment of the upstream service
	Service   string // upstream service, checked against the peer's SPIFFE ID
	Host      string // IP or DNS name of the upstream sidecar
	Port      int    // its inbound port
	LocalPort int    // local port the app connects to
}

// String returns the upstream in ParseUpstream's syntax.
func (u Upstream) String() string {
	return fmt.Sprintf("%s=%s/%s@%s,%d", u.Name, u.Env, u.Service, net.JoinHostPort(u.Host, strconv.Itoa(u.Port)), u.LocalPort)
}

const upstreamSyntax = "NAME=[ENV/]SERVICE@HOST:PORT,LOCAL_PORT"

// ParseUpstream parses NAME=SERVICE@HOST:PORT,LOCAL_PORT, where SERVICE may
// be ENV/SERVICE (otherwise the environment is defaultEnv). An IPv6 HOST is
// written in brackets: [::1]:8443.
func ParseUpstream(s, defaultEnv string) (Upstream, error) {
	fail := func(format string, args ...any) (Upstream, error) {
		return Upstream{}, fmt.Errorf("upstream %q: %s (want %s)", s, fmt.Sprintf(format, args...), upstreamSyntax)
	}
	name, rest, ok := strings.Cut(s, "=")
	if !ok {
		return fail("no '=' after the name")
	}
	if err := issuer.ValidateName("upstream name", name); err != nil {
		return fail("%v", err)
	}
	svc, rest, ok := strings.Cut(rest, "@")
	if !ok {
		return fail("no '@' after the service")
	}
	env := defaultEnv
	if e, sv, ok := strings.Cut(svc, "/"); ok {
		env, svc = e, sv
		if err := issuer.ValidateName("environment", env); err != nil {
			return fail("%v", err)
		}
	} else if env == "" {
		return fail("no environment: write ENV/SERVICE or set the default environment")
	} else if err := issuer.ValidateName("default environment", env); err != nil {
		return fail("%v", err)
	}
	if err := issuer.ValidateName("service", svc); err != nil {
		return fail("%v", err)
	}
	i := strings.LastIndex(rest, ",")
	if i < 0 {
		return fail("no ',LOCAL_PORT' after HOST:PORT")
	}
	hostPort, local := rest[:i], rest[i+1:]
	host, portStr, err := net.SplitHostPort(hostPort)
	if err != nil {
		return fail("bad HOST:PORT %q: %v", hostPort, err)
	}
	if err := checkHost(host); err != nil {
		return fail("%v", err)
	}
	port, err := parsePort("port", portStr)
	if err != nil {
		return fail("%v", err)
	}
	localPort, err := parsePort("local port", local)
	if err != nil {
		return fail("%v", err)
	}
	return Upstream{Name: name, Env: env, Service: svc, Host: host, Port: port, LocalPort: localPort}, nil
}

func parsePort(what, s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("%s %q is not a number", what, s)
	}
	if err := checkPort(what, n); err != nil {
		return 0, err
	}
	return n, nil
}

func checkPort(what string, n int) error {
	if n < 1 || n > 65535 {
		return fmt.Errorf("%s %d is outside 1-65535", what, n)
	}
	return nil
}

// checkHost accepts an IP literal or a DNS name.
func checkHost(h string) error {
	if h == "" {
		return errors.New("empty host")
	}
	if net.ParseIP(h) != nil {
		return nil
	}
	if len(h) > 253 {
		return fmt.Errorf("host name %q is longer than 253 characters", h)
	}
	for _, label := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("host %q is neither an IP address nor a valid DNS name", h)
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("host %q is neither an IP address nor a valid DNS name", h)
			}
		}
	}
	return nil
}

// splitAddr splits HOST:PORT, checking the port and the host (an IP literal
// if ipOnly, as Envoy listeners need).
func splitAddr(what, addr string, ipOnly bool) (string, int, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%s %q: want HOST:PORT: %w", what, addr, err)
	}
	if ipOnly && net.ParseIP(host) == nil {
		return "", 0, fmt.Errorf("%s %q: host must be an IP address (Envoy does not resolve names for listeners)", what, addr)
	}
	if err := checkHost(host); err != nil {
		return "", 0, fmt.Errorf("%s %q: %w", what, addr, err)
	}
	port, err := parsePort("port", portStr)
	if err != nil {
		return "", 0, fmt.Errorf("%s %q: %w", what, addr, err)
	}
	return host, port, nil
}

// EnvoyOptions describes the sidecar whose bootstrap RenderEnvoy writes.
type EnvoyOptions struct {
	// NodeID and Cluster become node.id and node.cluster; Envoy refuses SDS
	// without them. The server binds the identity to the token, not to these.
	NodeID, Cluster string
	// Server is the HOST:PORT of sds-server.
	Server string
	// Token is the bootstrap token, sent as "authorization: Bearer <token>".
	Token string
	// RootPEM is the root CA (or bundle) that authenticates sds-server; it
	// must contain the root the token pins (see FetchRoot).
	RootPEM []byte
	// TrustDomain is the mesh's SPIFFE trust domain.
	TrustDomain string
	// Env is the default environment of upstreams that name none.
	Env string
	// ListenAddr is the inbound mTLS listener, IP:PORT.
	ListenAddr string
	// ServicePort is the local app's port on 127.0.0.1.
	ServicePort int
	// Upstreams are the services the app calls through the sidecar.
	Upstreams []Upstream
	// AdminSocket is the absolute path of a Unix socket for Envoy's admin
	// interface, which Envoy creates with mode 0600 (its owner only):
	// the admin interface shows the token (/config_dump) and the node id,
	// which together are this node's identity. Envoy replaces whatever is
	// at that path. At most one of AdminSocket and AdminAddr may be set;
	// with neither, Envoy has no admin interface.
	AdminSocket string
	// AdminAddr is an IP:PORT (or localhost:PORT) for Envoy's admin
	// interface over TCP. It must be a loopback address unless
	// AllowInsecureAdmin is set (see ErrAdminNotLoopback).
	AdminAddr string
	// AllowInsecureAdmin accepts a non-loopback AdminAddr: anyone who
	// reaches it can take the node's identity.
	AllowInsecureAdmin bool
	// MaxConnectionDuration bounds pooled upstream connections;
	// DefaultMaxConnectionDuration if 0.
	MaxConnectionDuration time.Duration
	// MaxDownstreamConnections limits the sidecar's active downstream
	// connections (overload manager); DefaultMaxDownstreamConnections if 0.
	MaxDownstreamConnections int64
	// AccessLog, if set, is the absolute path of a file access log written
	// by every listener: one line per request with its response code,
	// flags, RBAC details, the peer's URI SAN and the path.
	AccessLog string
}

// listenAddr is an address something listens on, for conflict checks.
type listenAddr struct {
	what string
	ip   net.IP
	port int
}

func (a listenAddr) conflicts(b listenAddr) bool {
	return a.port == b.port && (a.ip.Equal(b.ip) || a.ip.IsUnspecified() || b.ip.IsUnspecified())
}

// envoyPlan is EnvoyOptions, validated and normalised.
type envoyPlan struct {
	EnvoyOptions
	token      Token
	rootPEM    []byte
	serverHost string
	serverPort int
	inHost     string
	inPort     int
	adminHost  string
	adminPort  int
}

func checkNodeField(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(s) > 256 {
		return fmt.Errorf("%s is longer than 256 characters", what)
	}
	for _, c := range s {
		if c <= ' ' || c == 0x7f {
			return fmt.Errorf("%s %q contains white space or control characters", what, s)
		}
	}
	return nil
}

// parseRootPEM parses a PEM bundle of certificates, strictly.
func parseRootPEM(b []byte) ([]*x509.Certificate, []byte, error) {
	var certs []*x509.Certificate
	var out bytes.Buffer
	rest := b
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, nil, fmt.Errorf("root CA PEM holds a %q block; want only CERTIFICATE blocks", blk.Type)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("root CA PEM: certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
		_ = pem.Encode(&out, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, nil, errors.New("root CA PEM has trailing data that is not a PEM certificate")
	}
	if len(certs) == 0 {
		return nil, nil, errors.New("root CA PEM holds no certificate")
	}
	return certs, out.Bytes(), nil
}

func (o EnvoyOptions) plan() (*envoyPlan, error) {
	p := &envoyPlan{EnvoyOptions: o}
	if err := checkNodeField("node ID", o.NodeID); err != nil {
		return nil, err
	}
	if err := checkNodeField("node cluster", o.Cluster); err != nil {
		return nil, err
	}
	var err error
	if p.serverHost, p.serverPort, err = splitAddr("server address", o.Server, false); err != nil {
		return nil, err
	}
	if p.token, err = Parse(o.Token); err != nil {
		return nil, err
	}
	roots, rootPEM, err := parseRootPEM(o.RootPEM)
	if err != nil {
		return nil, err
	}
	if _, ok := p.token.PinsRoot(roots); !ok {
		return nil, errors.New("the token's root digest matches no certificate of the root CA PEM: token and root come from different servers")
	}
	p.rootPEM = rootPEM
	if err := issuer.ValidateTrustDomain(o.TrustDomain); err != nil {
		return nil, err
	}
	if o.Env != "" {
		if err := issuer.ValidateName("environment", o.Env); err != nil {
			return nil, err
		}
	}
	if p.inHost, p.inPort, err = splitAddr("listen address", o.ListenAddr, true); err != nil {
		return nil, err
	}
	if err := checkPort("service port", o.ServicePort); err != nil {
		return nil, err
	}
	switch {
	case o.MaxConnectionDuration < 0:
		return nil, fmt.Errorf("max connection duration %s is negative", o.MaxConnectionDuration)
	case o.MaxConnectionDuration == 0:
		p.MaxConnectionDuration = DefaultMaxConnectionDuration
	case o.MaxConnectionDuration < time.Millisecond:
		return nil, fmt.Errorf("max connection duration %s is shorter than 1ms", o.MaxConnectionDuration)
	}
	switch {
	case o.MaxDownstreamConnections < 0:
		return nil, fmt.Errorf("max downstream connections %d is negative", o.MaxDownstreamConnections)
	case o.MaxDownstreamConnections == 0:
		p.MaxDownstreamConnections = DefaultMaxDownstreamConnections
	}
	if o.AccessLog != "" {
		if err := checkAccessLogPath(o.AccessLog); err != nil {
			return nil, err
		}
	}

	loopback := net.IPv4(127, 0, 0, 1)
	listeners := []listenAddr{{"inbound listener " + o.ListenAddr, net.ParseIP(p.inHost), p.inPort}}
	switch {
	case o.AdminAddr != "" && o.AdminSocket != "":
		return nil, errors.New("both an admin address and an admin socket are given; choose one")
	case o.AdminSocket != "":
		if err := CheckAdminSocket(o.AdminSocket); err != nil {
			return nil, err
		}
	case o.AdminAddr != "":
		if p.adminHost, p.adminPort, err = CheckAdminAddr(o.AdminAddr, o.AllowInsecureAdmin); err != nil {
			return nil, err
		}
		listeners = append(listeners, listenAddr{"admin " + o.AdminAddr, net.ParseIP(p.adminHost), p.adminPort})
	}
	p.Upstreams = make([]Upstream, len(o.Upstreams))
	names := map[string]bool{}
	for i, u := range o.Upstreams {
		if u.Env == "" {
			u.Env = o.Env
		}
		if err := checkUpstream(u); err != nil {
			return nil, err
		}
		if names[u.Name] {
			return nil, fmt.Errorf("upstream name %q is used twice", u.Name)
		}
		names[u.Name] = true
		p.Upstreams[i] = u
		listeners = append(listeners, listenAddr{fmt.Sprintf("upstream %s local port", u.Name), loopback, u.LocalPort})
	}
	// Envoy listening where the app or sds-server listens would fail to bind
	// or, worse, shadow them.
	occupied := []listenAddr{{"the local app (service port)", loopback, o.ServicePort}}
	if ip := net.ParseIP(p.serverHost); ip != nil {
		occupied = append(occupied, listenAddr{"sds-server " + o.Server, ip, p.serverPort})
	}
	for i, a := range listeners {
		for _, b := range listeners[i+1:] {
			if a.conflicts(b) {
				return nil, fmt.Errorf("%s and %s use the same address", a.what, b.what)
			}
		}
		for _, b := range occupied {
			if a.conflicts(b) {
				return nil, fmt.Errorf("%s and %s use the same address", a.what, b.what)
			}
		}
	}
	return p, nil
}

func checkUpstream(u Upstream) error {
	if err := issuer.ValidateName("upstream name", u.Name); err != nil {
		return err
	}
	if u.Env == "" {
		return fmt.Errorf("upstream %s: no environment and no default environment", u.Name)
	}
	if err := issuer.ValidateName("environment", u.Env); err != nil {
		return fmt.Errorf("upstream %s: %w", u.Name, err)
	}
	if err := issuer.ValidateName("service", u.Service); err != nil {
		return fmt.Errorf("upstream %s: %w", u.Name, err)
	}
	if err := checkHost(u.Host); err != nil {
		return fmt.Errorf("upstream %s: %w", u.Name, err)
	}
	if err := checkPort("port", u.Port); err != nil {
		return fmt.Errorf("upstream %s: %w", u.Name, err)
	}
	if err := checkPort("local port", u.LocalPort); err != nil {
		return fmt.Errorf("upstream %s: %w", u.Name, err)
	}
	return nil
}

// RenderEnvoy returns the YAML bootstrap of an Envoy 1.40 sidecar: xDS
// streams (ADS, and one SDS stream per secret name) to sds-server
// authenticated by the token, an mTLS inbound listener in front of the local
// app, and one plain-HTTP local listener per upstream, whose certificates
// and trust bundle all come over SDS. The
// config is built from the typed Envoy protos and validated before it is
// marshalled. The output contains the token: write it with mode 0600.
func RenderEnvoy(o EnvoyOptions) ([]byte, error) {
	p, err := o.plan()
	if err != nil {
		return nil, fmt.Errorf("envoy bootstrap: %w", err)
	}
	b, err := p.build()
	if err != nil {
		return nil, fmt.Errorf("envoy bootstrap: %w", err)
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("envoy bootstrap: invalid config: %w", err)
	}
	j, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("envoy bootstrap: marshal: %w", err)
	}
	y, err := yaml.JSONToYAML(j)
	if err != nil {
		return nil, fmt.Errorf("envoy bootstrap: convert to YAML: %w", err)
	}
	header := "# Envoy bootstrap written by `sds-server bootstrap envoy`.\n" +
		"# It holds a bootstrap token (" + Redact(p.token.String()) + "): keep this file private.\n" +
		"# With the node id, the token is this node's identity, key included; Envoy's\n" +
		"# admin interface shows both, so only its owner may reach it.\n"
	return append([]byte(header), y...), nil
}

// validator is what protoc-gen-validate generates for every Envoy message.
type validator interface{ ValidateAll() error }

// pack validates m (Any contents are not reached by the outer ValidateAll)
// and wraps it in an Any.
func pack(m proto.Message) (*anypb.Any, error) {
	if v, ok := m.(validator); ok {
		if err := v.ValidateAll(); err != nil {
			return nil, fmt.Errorf("invalid %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
		}
	}
	a, err := anypb.New(m)
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return a, nil
}

// xdsAPISource is the gRPC API config source on the sds-server cluster,
// authenticated by the token. The ADS stream uses it, and so does every SDS
// secret (see sdsSource).
func (p *envoyPlan) xdsAPISource() *corev3.ApiConfigSource {
	return &corev3.ApiConfigSource{
		ApiType:             corev3.ApiConfigSource_GRPC,
		TransportApiVersion: corev3.ApiVersion_V3,
		GrpcServices: []*corev3.GrpcService{{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: XDSClusterName}},
			InitialMetadata: []*corev3.HeaderValue{{Key: "authorization", Value: "Bearer " + p.token.String()}},
		}},
		SetNodeOnFirstMessageOnly: true,
	}
}

// sdsSource is the config source of every SDS secret in the bootstrap. It
// must be the same, byte for byte, everywhere: Envoy keys SDS providers by
// config source and name, and a differing source creates a second provider
// for the same secret that may never be fed (envoy#47309). With identical
// sources Envoy opens one SDS stream per secret name, shared by every
// listener and cluster.
//
// It is NOT {ads: {}}: Envoy 1.40 crashes (SIGSEGV, in --mode validate and at
// startup alike) when a static cluster's TLS context takes a secret over
// ADS, because static clusters are initialised before the ADS mux exists
// (envoy#15517, envoy#19618). Listeners would cope, but the upstream
// clusters cannot, so every secret uses standalone SDS over gRPC to the
// sds-server cluster, with the same token metadata as the ADS stream.
func (p *envoyPlan) sdsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: p.xdsAPISource()},
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
}

func (p *envoyPlan) sdsSecret(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: p.sdsSource()}
}

func socketAddr(host string, port int) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       host,
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)},
	}}}
}

func uriSAN(m *matcherv3.StringMatcher) []*tlsv3.SubjectAltNameMatcher {
	return []*tlsv3.SubjectAltNameMatcher{{SanType: tlsv3.SubjectAltNameMatcher_URI, Matcher: m}}
}

func exact(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
}

func prefix(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: s}}
}

func tls12() *tlsv3.TlsParameters {
	return &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2}
}

func tlsSocket(ctx proto.Message) (*corev3.TransportSocket, error) {
	a, err := pack(ctx)
	if err != nil {
		return nil, err
	}
	return &corev3.TransportSocket{Name: tlsTransportSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: a}}, nil
}

// sdsTLSContext is the common TLS context of a mesh connection: own
// certificate "default" and trust bundle "ROOTCA" over SDS, and the peer
// SAN check kept here, in default_validation_context, so the shared ROOTCA
// secret never widens it.
func (p *envoyPlan) sdsTLSContext(san *matcherv3.StringMatcher) *tlsv3.CommonTlsContext {
	return &tlsv3.CommonTlsContext{
		TlsParams:                      tls12(),
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{p.sdsSecret(SecretDefault)},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
			CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: uriSAN(san)},
				ValidationContextSdsSecretConfig: p.sdsSecret(SecretRootCA),
			},
		},
	}
}

// cluster returns a single-endpoint cluster: STATIC for an IP literal,
// STRICT_DNS for a name (never EDS: nothing here may depend on xDS).
func cluster(name, host string, port int, connectTimeout time.Duration) *clusterv3.Cluster {
	typ := clusterv3.Cluster_STRICT_DNS
	if net.ParseIP(host) != nil {
		typ = clusterv3.Cluster_STATIC
	}
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(connectTimeout),
		LoadAssignment: &endpointv3.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{
				LbEndpoints: []*endpointv3.LbEndpoint{{
					HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddr(host, port)}},
				}},
			}},
		},
	}
}

func (p *envoyPlan) build() (*bootstrapv3.Bootstrap, error) {
	xds, err := p.xdsCluster()
	if err != nil {
		return nil, err
	}
	inbound, err := p.inboundListener()
	if err != nil {
		return nil, err
	}
	app := cluster(LocalAppClusterName, "127.0.0.1", p.ServicePort, time.Second)
	appOpts, err := pack(followDownstreamProtocol(nil))
	if err != nil {
		return nil, err
	}
	app.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: appOpts}
	clusters := []*clusterv3.Cluster{xds, app}
	listeners := []*listenerv3.Listener{inbound}
	for _, u := range p.Upstreams {
		l, err := p.outboundListener(u)
		if err != nil {
			return nil, err
		}
		c, err := p.outboundCluster(u)
		if err != nil {
			return nil, err
		}
		listeners = append(listeners, l)
		clusters = append(clusters, c)
	}
	overload, err := p.overloadManager()
	if err != nil {
		return nil, err
	}
	b := &bootstrapv3.Bootstrap{
		Node:            &corev3.Node{Id: p.NodeID, Cluster: p.Cluster},
		OverloadManager: overload,
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{
			Listeners: listeners,
			Clusters:  clusters, // the xDS cluster first, before anything that uses it
		},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{
			// ADS carries what the listeners subscribe to (the RBAC
			// filter over ECDS, later); secrets use sdsSource.
			AdsConfig: p.xdsAPISource(),
		},
	}
	switch {
	case p.AdminSocket != "":
		b.Admin = &bootstrapv3.Admin{Address: &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{
			Path: p.AdminSocket,
			Mode: AdminSocketMode,
		}}}}
	case p.AdminAddr != "":
		b.Admin = &bootstrapv3.Admin{Address: socketAddr(p.adminHost, p.adminPort)}
	}
	return b, nil
}

// xdsCluster is the static cluster to sds-server: HTTP/2 (gRPC), TLS with
// ALPN h2 (grpc-go enforces it), trusting only the pinned root and only a
// certificate carrying the server's SPIFFE ID.
func (p *envoyPlan) xdsCluster() (*clusterv3.Cluster, error) {
	c := cluster(XDSClusterName, p.serverHost, p.serverPort, 5*time.Second)
	opts, err := pack(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}},
	})
	if err != nil {
		return nil, err
	}
	c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: opts}
	tlsCtx := &tlsv3.UpstreamTlsContext{
		CommonTlsContext: &tlsv3.CommonTlsContext{
			AlpnProtocols: []string{"h2"},
			TlsParams:     tls12(),
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa:                 &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: p.rootPEM}},
				MatchTypedSubjectAltNames: uriSAN(exact(issuer.ServerSPIFFEID(p.TrustDomain))),
			}},
		},
	}
	// RFC 6066 forbids IP literals in SNI; send it only for names.
	if net.ParseIP(p.serverHost) == nil {
		tlsCtx.Sni = p.serverHost
	}
	if c.TransportSocket, err = tlsSocket(tlsCtx); err != nil {
		return nil, err
	}
	return c, nil
}

// followDownstreamProtocol makes a cluster speak the protocol its request
// came in with: HTTP/1.1 stays HTTP/1.1, HTTP/2 (gRPC, h2c from the app)
// stays HTTP/2 through both sidecars to the callee app.
func followDownstreamProtocol(common *corev3.HttpProtocolOptions) *httpv3.HttpProtocolOptions {
	return &httpv3.HttpProtocolOptions{
		CommonHttpProtocolOptions: common,
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{
			UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{
				HttpProtocolOptions:  &corev3.Http1ProtocolOptions{},
				Http2ProtocolOptions: &corev3.Http2ProtocolOptions{},
			},
		},
	}
}

// inboundHTTPFilters returns the HTTP filter chain of the inbound listener:
// the revoked-nodes DENY list, the service's ACL, then the router. Both RBAC
// filters come from ECDS over ADS, so policy changes apply to the next
// request without draining the listener, and the listener waits for them
// (no warming with defaults): a sidecar never serves under no policy. Their
// defaults, used only if the server never answers, deny everything (ACL)
// and nothing (revocations).
func inboundHTTPFilters() ([]*hcmv3.HttpFilter, error) {
	router, err := routerFilter()
	if err != nil {
		return nil, err
	}
	revoked, err := ecdsRBACFilter(RevokedFilterName, &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{Action: rbacconfigv3.RBAC_DENY}})
	if err != nil {
		return nil, err
	}
	acl, err := ecdsRBACFilter(RBACFilterName, &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{Action: rbacconfigv3.RBAC_ALLOW}})
	if err != nil {
		return nil, err
	}
	return []*hcmv3.HttpFilter{revoked, acl, router}, nil
}

// ecdsRBACFilter is an RBAC HTTP filter whose config comes from ECDS over
// ADS, with def as the default config.
func ecdsRBACFilter(name string, def *rbacv3.RBAC) (*hcmv3.HttpFilter, error) {
	a, err := pack(def)
	if err != nil {
		return nil, err
	}
	return &hcmv3.HttpFilter{Name: name, ConfigType: &hcmv3.HttpFilter_ConfigDiscovery{
		ConfigDiscovery: &corev3.ExtensionConfigSource{
			ConfigSource: &corev3.ConfigSource{
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
				ResourceApiVersion:    corev3.ApiVersion_V3,
			},
			DefaultConfig:                    a,
			ApplyDefaultConfigWithoutWarming: false,
			TypeUrls:                         []string{RBACTypeURL},
		},
	}}, nil
}

func routerFilter() (*hcmv3.HttpFilter, error) {
	a, err := pack(&routerv3.Router{})
	if err != nil {
		return nil, err
	}
	return &hcmv3.HttpFilter{Name: routerFilterName, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: a}}, nil
}

// routeAll is a route table sending every request to cluster.
func routeAll(name, cluster string) *hcmv3.HttpConnectionManager_RouteConfig {
	return &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
		Name: name,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    name,
			Domains: []string{"*"},
			Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}},
			}},
		}},
	}}
}

func hcmFilter(h *hcmv3.HttpConnectionManager) (*listenerv3.Filter, error) {
	a, err := pack(h)
	if err != nil {
		return nil, err
	}
	return &listenerv3.Filter{Name: hcmFilterName, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}, nil
}

// inboundListener terminates mTLS from any mesh identity in front of the
// local app; paths are normalised so RBAC path rules cannot be dodged, and
// the verified client identity is passed to the app in XFCC.
func (p *envoyPlan) inboundListener() (*listenerv3.Listener, error) {
	filters, err := inboundHTTPFilters()
	if err != nil {
		return nil, err
	}
	logs, err := p.accessLogs(InboundListenerName, true)
	if err != nil {
		return nil, err
	}
	hcm, err := hcmFilter(&hcmv3.HttpConnectionManager{
		StatPrefix:                   InboundListenerName,
		AccessLog:                    logs,
		CodecType:                    hcmv3.HttpConnectionManager_AUTO,
		NormalizePath:                wrapperspb.Bool(true),
		MergeSlashes:                 true,
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT,
		ForwardClientCertDetails:     hcmv3.HttpConnectionManager_SANITIZE_SET,
		// Hash lets the revoked-nodes filter match the peer certificate.
		SetCurrentClientCertDetails: &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true, Cert: true},
		RouteSpecifier:              routeAll(InboundListenerName, LocalAppClusterName),
		HttpFilters:                 filters,
	})
	if err != nil {
		return nil, err
	}
	// Offer both protocols: a calling sidecar's connection pool asks for
	// the one its request came in with (gRPC needs HTTP/2 end to end).
	inboundTLS := p.sdsTLSContext(prefix("spiffe://" + p.TrustDomain + "/"))
	inboundTLS.AlpnProtocols = []string{"h2", "http/1.1"}
	ts, err := tlsSocket(&tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		// Every connection gets a full handshake: on a resumed session
		// Envoy neither re-checks the client certificate against the
		// current CRL nor marks it validated, so mtls_authenticated RBAC
		// principals would not match (envoy#42668).
		SessionTicketKeysType:            &tlsv3.DownstreamTlsContext_DisableStatelessSessionResumption{DisableStatelessSessionResumption: true},
		DisableStatefulSessionResumption: true,
		CommonTlsContext:                 p.sdsTLSContext(prefix("spiffe://" + p.TrustDomain + "/")),
	})
	if err != nil {
		return nil, err
	}
	return &listenerv3.Listener{
		Name:    InboundListenerName,
		Address: socketAddr(p.inHost, p.inPort),
		FilterChains: []*listenerv3.FilterChain{{
			Filters:         []*listenerv3.Filter{hcm},
			TransportSocket: ts,
		}},
	}, nil
}

// outboundListener is the plain-HTTP local entry point of upstream u.
func (p *envoyPlan) outboundListener(u Upstream) (*listenerv3.Listener, error) {
	router, err := routerFilter()
	if err != nil {
		return nil, err
	}
	name := OutboundListenerName(u.Name)
	logs, err := p.accessLogs(name, false)
	if err != nil {
		return nil, err
	}
	hcm, err := hcmFilter(&hcmv3.HttpConnectionManager{
		StatPrefix:     name,
		AccessLog:      logs,
		CodecType:      hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: routeAll(name, OutboundClusterName(u.Name)),
		HttpFilters:    []*hcmv3.HttpFilter{router},
	})
	if err != nil {
		return nil, err
	}
	return &listenerv3.Listener{
		Name:         name,
		Address:      socketAddr("127.0.0.1", u.LocalPort),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{hcm}}},
	}, nil
}

// outboundCluster reaches upstream u's sidecar over mTLS, requiring exactly
// u's SPIFFE ID, with HTTP/1.1 and bounded connection lifetime so rotated
// client certificates take effect.
func (p *envoyPlan) outboundCluster(u Upstream) (*clusterv3.Cluster, error) {
	c := cluster(OutboundClusterName(u.Name), u.Host, u.Port, 2*time.Second)
	opts, err := pack(followDownstreamProtocol(&corev3.HttpProtocolOptions{MaxConnectionDuration: durationpb.New(p.MaxConnectionDuration)}))
	if err != nil {
		return nil, err
	}
	c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: opts}
	if c.TransportSocket, err = tlsSocket(&tlsv3.UpstreamTlsContext{
		Sni:              u.Service,
		CommonTlsContext: p.sdsTLSContext(exact(issuer.SPIFFEID(p.TrustDomain, u.Env, u.Service))),
		// Peers refuse resumption (see the inbound listener); don't offer it.
		MaxSessionKeys: wrapperspb.UInt32(0),
	}); err != nil {
		return nil, err
	}
	return c, nil
}
