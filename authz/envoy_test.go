package authz

// Checks against the real Envoy: that it accepts what Compile produces, and
// that the RE2 program size estimate agrees with it. They need an Envoy
// binary: $SDS_ENVOY_BIN, else the repository's .tools/bin/envoy (make
// tools). Without one they are skipped, or fail under SDS_REQUIRE_E2E=1.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp/syntax"
	"strconv"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

func envoyBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("SDS_ENVOY_BIN")
	if bin == "" {
		bin = filepath.Join("..", ".tools", "bin", "envoy")
	}
	if info, err := os.Stat(bin); err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
		if os.Getenv("SDS_REQUIRE_E2E") == "1" {
			t.Fatalf("no Envoy binary at %s (set SDS_ENVOY_BIN or run make tools)", bin)
		}
		t.Skipf("no Envoy binary at %s (set SDS_ENVOY_BIN or run make tools)", bin)
	}
	return bin
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// rbacFilter is the RBAC filter with its config inline.
func rbacFilter(t *testing.T, cfg *rbacv3.RBAC) *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: FilterName, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, cfg)}}
}

// ecdsFilter is the RBAC filter as the server's sidecars get it: from ECDS
// over ADS, with def in force until the first push.
func ecdsFilter(t *testing.T, def *rbacv3.RBAC) *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: FilterName, ConfigType: &hcmv3.HttpFilter_ConfigDiscovery{
		ConfigDiscovery: &corev3.ExtensionConfigSource{
			ConfigSource: &corev3.ConfigSource{
				ResourceApiVersion:    corev3.ApiVersion_V3,
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
			},
			DefaultConfig:                    mustAny(t, def),
			ApplyDefaultConfigWithoutWarming: false,
			TypeUrls:                         []string{TypeURL},
		},
	}}
}

// renderBootstrap returns a static Envoy bootstrap with one listener per
// filter, each an HTTP connection manager running that filter then the
// router, and an ADS cluster for the ECDS filters.
func renderBootstrap(t *testing.T, runtime map[string]any, filters ...*hcmv3.HttpFilter) []byte {
	t.Helper()
	router := &hcmv3.HttpFilter{Name: "envoy.filters.http.router",
		ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &routerv3.Router{})}}
	addr := func(port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	b := &bootstrapv3.Bootstrap{
		Node: &corev3.Node{Id: "authz-test", Cluster: "authz-test"},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{AdsConfig: &corev3.ApiConfigSource{
			ApiType:             corev3.ApiConfigSource_GRPC,
			TransportApiVersion: corev3.ApiVersion_V3,
			GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
				EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: "xds"}}}},
		}},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{Clusters: []*clusterv3.Cluster{{
			Name:                 "xds",
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
			LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: "xds", Endpoints: []*endpointv3.LocalityLbEndpoints{{
				LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{
					Endpoint: &endpointv3.Endpoint{Address: addr(18443)}}}},
			}}},
			TypedExtensionProtocolOptions: map[string]*anypb.Any{
				"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(t, &httpv3.HttpProtocolOptions{
					UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
						ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
					}},
				}),
			},
		}}},
	}
	for i, f := range filters {
		hcm := &hcmv3.HttpConnectionManager{
			StatPrefix: fmt.Sprintf("in%d", i),
			RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
				VirtualHosts: []*routev3.VirtualHost{{Name: "all", Domains: []string{"*"}, Routes: []*routev3.Route{{
					Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
					Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 200}},
				}}}},
			}},
			HttpFilters: []*hcmv3.HttpFilter{f, router},
		}
		b.StaticResources.Listeners = append(b.StaticResources.Listeners, &listenerv3.Listener{
			Name:    fmt.Sprintf("l%d", i),
			Address: addr(uint32(20000 + i)),
			FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
				Name:       "envoy.filters.network.http_connection_manager",
				ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, hcm)},
			}}}},
		})
	}
	if runtime != nil {
		layer, err := structpb.NewStruct(runtime)
		if err != nil {
			t.Fatal(err)
		}
		b.LayeredRuntime = &bootstrapv3.LayeredRuntime{Layers: []*bootstrapv3.RuntimeLayer{{
			Name: "static", LayerSpecifier: &bootstrapv3.RuntimeLayer_StaticLayer{StaticLayer: layer},
		}}}
	}
	if err := b.ValidateAll(); err != nil {
		t.Fatalf("test bootstrap: %v", err)
	}
	js, err := protojson.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// envoyValidate runs envoy --mode validate on a bootstrap and returns its
// log (messages only) and whether it accepted the configuration.
func envoyValidate(t *testing.T, bin string, bootstrap []byte) (string, bool) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "bootstrap.json")
	if err := os.WriteFile(file, bootstrap, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--mode", "validate", "-c", file,
		"--disable-hot-restart", "--log-level", "warn", "--log-format", "%v").CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("run envoy: %v\n%s", err, out)
	}
	return string(out), err == nil
}

func TestEnvoyAcceptsCompiledRBAC(t *testing.T) {
	bin := envoyBinary(t)
	acl := ACL{
		entry("GET", "/user", "web", "fulfillment", "payments"),
		entry("*", "/admin/.*", "staging/web"),
		entry("POST", "/orders", "*"),
		entry("DELETE", `/orders/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`, "web"),
		entry("PUT", `(?i)/files/[^/]+\.(?:png|jpe?g|gif)`, "web"),
		entry("PATCH", `/(users|groups)/(?P<id>[0-9]+)(?:/[a-z_-]+)*`, "web"),
	}
	for _, m := range methods {
		acl = append(acl, entry(m, "/m/"+strings.ToLower(m), "web"))
	}
	compiled, err := Compile(acl, usersProd)
	if err != nil {
		t.Fatal(err)
	}
	empty, err := Compile(ACL{}, usersProd)
	if err != nil {
		t.Fatal(err)
	}
	allow, err := AllowAll("mesh.local")
	if err != nil {
		t.Fatal(err)
	}
	bootstrap := renderBootstrap(t, nil,
		rbacFilter(t, compiled), rbacFilter(t, empty), rbacFilter(t, DenyAll()), rbacFilter(t, allow),
		ecdsFilter(t, DenyAll()), ecdsFilter(t, compiled))
	if out, ok := envoyValidate(t, bin, bootstrap); !ok {
		t.Fatalf("Envoy refused the compiled RBAC configs:\n%s", out)
	}
}

// The regex-size limit, both ways, at Envoy's default limit: what Validate
// accepts Envoy accepts; between the budget and Envoy's limit Validate is
// stricter than Envoy; above the limit both refuse, and Envoy reports the
// same size.
func TestEnvoyRegexSizeLimit(t *testing.T) {
	bin := envoyBinary(t)
	// Nested alternations, where a tree as Go's parser builds it would be
	// about 15% smaller than RE2's.
	nested := strings.Repeat("(?:/users|/(?:users|groups|orgs))/[0-9]+", 3)
	for _, tc := range []struct {
		name string
		re   string
		size int
	}{
		{"budget", "/items/[a-z]{79}", 90},
		{"budget, nested", nested + "/items/[0-9]+/[a-z]{4}", 90},
		{"above budget", "/items/[a-z]{80}", 91},
		{"Envoy's limit", "/items/[a-z]{89}", 100},
		{"Envoy's limit, nested", nested + "(?:/users|/(?:users|groups|orgs))/[0-9]+", 100},
		{"above Envoy's limit", "/items/[a-z]{90}", 101},
		{"above Envoy's limit, nested", nested + "(?:/users|/(?:users|groups|orgs))/[0-9]+x", 101},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := programSize(t, tc.re); got != tc.size {
				t.Fatalf("re2ProgramSize(%q) = %d, want %d", tc.re, got, tc.size)
			}
			reason := checkResource(tc.re)
			if accepted := reason == ""; accepted != (tc.size <= RegexProgramBudget) {
				t.Errorf("checkResource(%q) = %q", tc.re, reason)
			}
			cfg := &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{
				Action: rbacconfigv3.RBAC_ALLOW,
				Policies: map[string]*rbacconfigv3.Policy{"entry-001": {
					Permissions: []*rbacconfigv3.Permission{permission(Permission{Method: "GET", Resource: tc.re})},
					Principals:  []*rbacconfigv3.Principal{callerPrincipal(usersProd, "web")},
				}},
			}}
			out, ok := envoyValidate(t, bin, renderBootstrap(t, nil, rbacFilter(t, cfg)))
			if ok != (tc.size <= EnvoyRegexProgramLimit) {
				t.Fatalf("Envoy accepted=%v for program size %d:\n%s", ok, tc.size, out)
			}
			if want := fmt.Sprintf("RE2 program size of %d > max program size of %d", tc.size, EnvoyRegexProgramLimit); !ok && !strings.Contains(out, want) {
				t.Errorf("Envoy output lacks %q:\n%s", want, out)
			}
		})
	}
}

// TestEnvoyRegexCalibration compares the size estimate with Envoy's on a
// generated corpus of path-like and random regexes, in one Envoy run: with
// re2.max_program_size.warn_level at 0, Envoy logs the size of every regex.
func TestEnvoyRegexCalibration(t *testing.T) {
	bin := envoyBinary(t)
	corpus := regexCorpus(1000)
	policies := map[string]*rbacconfigv3.Policy{}
	for i, re := range corpus {
		policies[fmt.Sprintf("p%05d", i)] = &rbacconfigv3.Policy{
			Permissions: []*rbacconfigv3.Permission{permission(Permission{Method: "*", Resource: re})},
			Principals:  []*rbacconfigv3.Principal{{Identifier: &rbacconfigv3.Principal_Any{Any: true}}},
		}
	}
	cfg := &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{Action: rbacconfigv3.RBAC_ALLOW, Policies: policies}}
	runtime := map[string]any{"re2.max_program_size.warn_level": 0, "re2.max_program_size.error_level": 1 << 30}
	out, ok := envoyValidate(t, bin, renderBootstrap(t, runtime, rbacFilter(t, cfg)))
	if !ok {
		t.Fatalf("Envoy refused the corpus:\n%.2000s", out)
	}
	sizes := map[string]int{}
	const pre, mid = "regex '", "' RE2 program size of "
	for _, line := range strings.Split(out, "\n") {
		j := strings.LastIndex(line, mid)
		if !strings.HasPrefix(line, pre) || j < 0 {
			continue
		}
		if n, err := strconv.Atoi(strings.Fields(line[j+len(mid):])[0]); err == nil {
			sizes[line[len(pre):j]] = n
		}
	}
	mismatches, exact := 0, 0
	for _, re := range corpus {
		want, found := sizes[re]
		if !found {
			t.Fatalf("Envoy logged no size for %q; log format changed?\n%.2000s", re, out)
		}
		got := programSize(t, re)
		if got == want {
			exact++
			continue
		}
		if mismatches++; mismatches <= 20 {
			t.Errorf("re2ProgramSize(%q) = %d, Envoy says %d", re, got, want)
		}
		if want > EnvoyRegexProgramLimit && got <= RegexProgramBudget {
			t.Errorf("Validate would let %q (Envoy size %d) through", re, want)
		}
	}
	t.Logf("%d of %d regexes sized exactly", exact, len(corpus))
}

// regexCorpus generates n distinct ASCII regexes that regexp/syntax
// accepts: path-like ones, and random compositions that exercise the
// parser (alternations with duplicates, flags, named groups, \Q..\E,
// repeats, anchors).
func regexCorpus(n int) []string {
	r := rand.New(rand.NewPCG(1, 2))
	segs := []string{"/users", "/api", "/v[12]", "/[0-9]+", "/[^/]+", "/[a-z0-9-]+", "(?:/[a-z0-9_-]+)*",
		"(?:/.*)?", "/[0-9a-f]{8}", "/(?:users|groups|orgs)", "/(users|groups)", `\.json`, "/orders/[0-9]{1,10}",
		"/[A-Za-z0-9._~-]+", "/healthz", "/items/[^/]{1,64}", "(?i)/admin", "/static/.+", "(?:/|$)",
		`/files/[^/]+\.(?:png|jpe?g|gif)`, "/(?:[a-z]+/)?x", "/[[:alnum:]]+", `/\w+`, `/\d{2,4}`, "/(?P<id>[0-9]+)"}
	atoms := []string{"a", "b", "ab", "/", "/api", "x", "A", "k", "s", "[0-9]", "[a-z]", "[^/]", ".", `\d`, `\w`,
		`\s`, `\D`, `[[:alpha:]]`, `[[:^digit:]]`, `\.`, `\x41`, `\101`, `\Q*+\E`, "[]a]", `[\]\-]`, "[a-c-]", "{",
		"(?i:k)", "(?i)s", "(?s:.)", "(?m:^)", "^", "$", `\A`, `\z`, `\b`, `\B`, "", "(?:)", "[Aa]", "[.]", "[ab]",
		"(?U)a*", "(?P<n>a)", `[^\x00-\x7f]`, `[^\n]`, "(?i)[^a-z]"}
	ops := []string{"*", "+", "?", "{2}", "{1,3}", "{0,2}", "{3,}", "*?", "+?", "??", "{2,4}?", "{0}", "{1}"}
	var gen func(depth int) string
	gen = func(depth int) string {
		if depth == 0 || r.IntN(3) == 0 {
			return atoms[r.IntN(len(atoms))]
		}
		switch r.IntN(7) {
		case 0, 1:
			var b strings.Builder
			for range 2 + r.IntN(3) {
				b.WriteString(gen(depth - 1))
			}
			return b.String()
		case 2, 3:
			parts := make([]string, 2+r.IntN(4))
			for i := range parts {
				if i > 0 && r.IntN(4) == 0 {
					parts[i] = parts[r.IntN(i)]
				} else {
					parts[i] = gen(depth - 1)
				}
			}
			open := []string{"(?:", "(", "(?i:", "(?s:"}[r.IntN(4)]
			return open + strings.Join(parts, "|") + ")"
		case 4:
			return "(?:" + gen(depth-1) + ")" + ops[r.IntN(len(ops))]
		case 5:
			return "^" + gen(depth-1) + "$"
		default:
			return gen(depth-1) + "|" + gen(depth-1)
		}
	}
	seen := map[string]bool{}
	var out []string
	for len(out) < n {
		var re string
		if len(out)%2 == 0 {
			var b strings.Builder
			for range 1 + r.IntN(6) {
				if r.IntN(5) == 0 {
					b.WriteString("(?:" + segs[r.IntN(len(segs))] + "|" + segs[r.IntN(len(segs))] + ")")
				} else {
					b.WriteString(segs[r.IntN(len(segs))])
				}
			}
			re = b.String()
		} else {
			re = gen(4)
		}
		if re == "" || seen[re] {
			continue
		}
		if _, err := syntax.Parse(re, syntax.Perl); err != nil {
			continue
		}
		seen[re] = true
		out = append(out, re)
	}
	return out
}

// The size estimate follows RE2's Latin-1 mode, which Envoy 1.40 uses unless
// the runtime flag envoy.reloadable_features.re2_use_latin1_mode is turned
// off (UTF-8 mode makes [^/] or . cost 12 instructions instead of 6). If an
// Envoy upgrade changes the default, this fails: recalibrate.
func TestEnvoyRegexEncodingIsLatin1(t *testing.T) {
	bin := envoyBinary(t)
	cfg := &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{
		Action: rbacconfigv3.RBAC_ALLOW,
		Policies: map[string]*rbacconfigv3.Policy{"p": {
			Permissions: []*rbacconfigv3.Permission{permission(Permission{Method: "*", Resource: `\x{100}`})},
			Principals:  []*rbacconfigv3.Principal{{Identifier: &rbacconfigv3.Principal_Any{Any: true}}},
		}},
	}}
	out, ok := envoyValidate(t, bin, renderBootstrap(t, nil, rbacFilter(t, cfg)))
	if ok || !strings.Contains(out, `invalid escape sequence: \x{100`) {
		t.Fatalf("Envoy accepted \\x{100}: its regexes are not in Latin-1 mode, recalibrate re2size.go:\n%s", out)
	}
}
