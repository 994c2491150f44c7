package authz

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	mtlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/rbac/principals/mtls_authenticated/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// request is what the RBAC filter sees of an HTTP request.
type request struct {
	method string
	path   string // as sent, query string included
	peer   string // URI SAN of the validated client certificate; "" for none
}

// evaluate decides a request the way Envoy's RBAC filter does, for the
// subset of RBAC that this package emits: rules with action ALLOW; policies
// whose permissions are any, and_rules, a ":method" header exact match or a
// url_path safe_regex (a full match on the path without its query string);
// principals that are any or the mtls_authenticated principal with an exact
// or prefix URI SAN matcher. Anything else fails the test, so the evaluator
// cannot silently misjudge a config it does not understand.
func evaluate(t *testing.T, cfg *rbacv3.RBAC, req request) bool {
	t.Helper()
	rules := cfg.GetRules()
	if rules == nil {
		t.Fatal("evaluate: config without rules")
	}
	if rules.GetAction() != rbacconfigv3.RBAC_ALLOW {
		t.Fatalf("evaluate: action %v not supported", rules.GetAction())
	}
	names := make([]string, 0, len(rules.GetPolicies()))
	for name := range rules.GetPolicies() {
		names = append(names, name)
	}
	slices.Sort(names) // Envoy's order; it does not change an ALLOW decision
	for _, name := range names {
		p := rules.GetPolicies()[name]
		if p.GetCondition() != nil || p.GetCheckedCondition() != nil || p.GetCelConfig() != nil {
			t.Fatalf("evaluate: policy %s has a condition", name)
		}
		perm := slices.ContainsFunc(p.GetPermissions(), func(pm *rbacconfigv3.Permission) bool { return matchPermission(t, pm, req) })
		prin := slices.ContainsFunc(p.GetPrincipals(), func(pr *rbacconfigv3.Principal) bool { return matchPrincipal(t, pr, req) })
		if perm && prin {
			return true
		}
	}
	return false
}

func matchPermission(t *testing.T, p *rbacconfigv3.Permission, req request) bool {
	t.Helper()
	switch r := p.GetRule().(type) {
	case *rbacconfigv3.Permission_Any:
		return r.Any
	case *rbacconfigv3.Permission_AndRules:
		for _, sub := range r.AndRules.GetRules() {
			if !matchPermission(t, sub, req) {
				return false
			}
		}
		return true
	case *rbacconfigv3.Permission_Header:
		h := r.Header
		if h.GetName() != ":method" || h.GetInvertMatch() || h.GetStringMatch().GetIgnoreCase() {
			t.Fatalf("evaluate: header matcher %v not supported", h)
		}
		exact, ok := h.GetStringMatch().GetMatchPattern().(*matcherv3.StringMatcher_Exact)
		if !ok {
			t.Fatalf("evaluate: header string match %v not supported", h.GetStringMatch())
		}
		return req.method == exact.Exact
	case *rbacconfigv3.Permission_UrlPath:
		sm := r.UrlPath.GetPath()
		rx, ok := sm.GetMatchPattern().(*matcherv3.StringMatcher_SafeRegex)
		if !ok || sm.GetIgnoreCase() {
			t.Fatalf("evaluate: url_path matcher %v not supported", sm)
		}
		path, _, _ := strings.Cut(req.path, "?")
		path, _, _ = strings.Cut(path, "#")
		return regexp.MustCompile(`^(?:` + rx.SafeRegex.GetRegex() + `)$`).MatchString(path)
	}
	t.Fatalf("evaluate: permission %v not supported", p)
	return false
}

func matchPrincipal(t *testing.T, p *rbacconfigv3.Principal, req request) bool {
	t.Helper()
	switch id := p.GetIdentifier().(type) {
	case *rbacconfigv3.Principal_Any:
		return id.Any
	case *rbacconfigv3.Principal_Custom:
		if id.Custom.GetName() != MTLSPrincipal {
			t.Fatalf("evaluate: custom principal %q not supported", id.Custom.GetName())
		}
		var cfg mtlsv3.Config
		if err := id.Custom.GetTypedConfig().UnmarshalTo(&cfg); err != nil {
			t.Fatalf("evaluate: principal config: %v", err)
		}
		san := cfg.GetSanMatcher()
		if san.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || san.GetMatcher().GetIgnoreCase() {
			t.Fatalf("evaluate: SAN matcher %v not supported", san)
		}
		if req.peer == "" {
			return false // no validated client certificate
		}
		switch m := san.GetMatcher().GetMatchPattern().(type) {
		case *matcherv3.StringMatcher_Exact:
			return req.peer == m.Exact
		case *matcherv3.StringMatcher_Prefix:
			return strings.HasPrefix(req.peer, m.Prefix)
		}
		t.Fatalf("evaluate: SAN string matcher %v not supported", san.GetMatcher())
	}
	t.Fatalf("evaluate: principal %v not supported", p)
	return false
}

var usersProd = Identity{TrustDomain: "mesh.local", Env: "prod", Service: "users"}

func spiffe(env, svc string) string { return "spiffe://mesh.local/ns/" + env + "/sa/" + svc }

func TestCompileDecisions(t *testing.T) {
	seed := ACL{entry("GET", "/user", "web", "fulfillment", "payments")}
	rich := ACL{
		entry("GET", "/user/[0-9]+", "web"),
		entry("*", "/admin/.*", "staging/web"),
		entry("POST", "/orders", "*"),
	}
	web, stagingWeb := spiffe("prod", "web"), spiffe("staging", "web")
	for _, tc := range []struct {
		name string
		acl  ACL
		req  request
		want bool
	}{
		{"listed caller", seed, request{"GET", "/user", web}, true},
		{"another listed caller", seed, request{"GET", "/user", spiffe("prod", "payments")}, true},
		{"full match: longer path", seed, request{"GET", "/users", web}, false},
		{"full match: sub-path", seed, request{"GET", "/user/1", web}, false},
		{"full match: prefix", seed, request{"GET", "/use", web}, false},
		{"query string excluded", seed, request{"GET", "/user?id=1", web}, true},
		{"query cannot smuggle a path", seed, request{"GET", "/admin?/user", web}, false},
		{"other method", seed, request{"POST", "/user", web}, false},
		{"method is case-sensitive", seed, request{"get", "/user", web}, false},
		{"caller not listed", seed, request{"GET", "/user", spiffe("prod", "billing")}, false},
		{"same name, other environment", seed, request{"GET", "/user", stagingWeb}, false},
		{"other trust domain", seed, request{"GET", "/user", "spiffe://evil.example/ns/prod/sa/web"}, false},
		{"no client certificate", seed, request{"GET", "/user", ""}, false},
		{"regex with digits", rich, request{"GET", "/user/42", web}, true},
		{"regex with digits and query", rich, request{"GET", "/user/42?x=1", web}, true},
		{"regex needs a digit", rich, request{"GET", "/user/", web}, false},
		{"regex is anchored at the end", rich, request{"GET", "/user/42/x", web}, false},
		{"regex is anchored at the start", rich, request{"GET", "/x/user/42", web}, false},
		{"any method, cross-environment", rich, request{"DELETE", "/admin/users", stagingWeb}, true},
		{"any method, other method", rich, request{"PATCH", "/admin/x", stagingWeb}, true},
		{"cross-environment only", rich, request{"DELETE", "/admin/users", web}, false},
		{"any workload", rich, request{"POST", "/orders", spiffe("dev", "anything")}, true},
		{"any workload, not the SDS server", rich, request{"POST", "/orders", "spiffe://mesh.local/sds-server"}, false},
		{"any workload, other trust domain", rich, request{"POST", "/orders", "spiffe://other.local/ns/prod/sa/web"}, false},
		{"any workload needs a certificate", rich, request{"POST", "/orders", ""}, false},
		{"entries do not mix", rich, request{"POST", "/user/42", web}, false},
		{"empty ACL", ACL{}, request{"GET", "/user", web}, false},
		{"nil ACL", nil, request{"GET", "/", web}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Compile(tc.acl, usersProd)
			if err != nil {
				t.Fatal(err)
			}
			if got := evaluate(t, cfg, tc.req); got != tc.want {
				t.Errorf("%s %s from %q: allowed=%v, want %v", tc.req.method, tc.req.path, tc.req.peer, got, tc.want)
			}
		})
	}
}

func TestDenyAllAndAllowAll(t *testing.T) {
	web := spiffe("prod", "web")
	deny := DenyAll()
	if err := deny.ValidateAll(); err != nil {
		t.Fatal(err)
	}
	for _, req := range []request{{"GET", "/", web}, {"POST", "/x", ""}} {
		if evaluate(t, deny, req) {
			t.Errorf("DenyAll allowed %+v", req)
		}
	}
	empty, err := Compile(ACL{}, usersProd)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(empty, deny) {
		t.Errorf("Compile(empty) = %v, want DenyAll %v", empty, deny)
	}

	allow, err := AllowAll("mesh.local")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		req  request
		want bool
	}{
		{request{"DELETE", "/anything?x", web}, true},
		{request{"GET", "/", spiffe("dev", "x")}, true},
		{request{"GET", "/", ""}, false},
		{request{"GET", "/", "spiffe://other/ns/prod/sa/web"}, false},
		{request{"GET", "/", "spiffe://mesh.local/sds-server"}, false},
	} {
		if got := evaluate(t, allow, tc.req); got != tc.want {
			t.Errorf("AllowAll on %+v = %v, want %v", tc.req, got, tc.want)
		}
	}
	if _, err := AllowAll("Bad Domain"); err == nil {
		t.Error("AllowAll accepted a bad trust domain")
	}
}

func TestCompileShape(t *testing.T) {
	acl := ACL{
		entry("GET", "/a", "web"),
		entry("*", "/b", "web", "staging/api"),
		entry("POST", "/c", "*"),
	}
	cfg, err := Compile(acl, usersProd)
	if err != nil {
		t.Fatal(err)
	}
	want := &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{
		Action: rbacconfigv3.RBAC_ALLOW,
		Policies: map[string]*rbacconfigv3.Policy{
			"entry-001": {
				Permissions: []*rbacconfigv3.Permission{permission(Permission{Method: "GET", Resource: "/a"})},
				Principals:  []*rbacconfigv3.Principal{sanPrincipal(exact(spiffe("prod", "web")))},
			},
			"entry-002": {
				Permissions: []*rbacconfigv3.Permission{permission(Permission{Method: "*", Resource: "/b"})},
				Principals: []*rbacconfigv3.Principal{
					sanPrincipal(exact(spiffe("prod", "web"))),
					sanPrincipal(exact(spiffe("staging", "api"))),
				},
			},
			"entry-003": {
				Permissions: []*rbacconfigv3.Permission{permission(Permission{Method: "POST", Resource: "/c"})},
				Principals:  []*rbacconfigv3.Principal{sanPrincipal(prefixMatcher("spiffe://mesh.local/ns/"))},
			},
		},
	}}
	if !proto.Equal(cfg, want) {
		t.Errorf("Compile =\n%v\nwant\n%v", cfg, want)
	}
	// "*" leaves the method out: the permission is the path alone.
	and := cfg.GetRules().GetPolicies()["entry-002"].GetPermissions()[0].GetAndRules().GetRules()
	if len(and) != 1 || and[0].GetUrlPath() == nil {
		t.Errorf("permission of a \"*\" entry = %v, want the url_path rule alone", and)
	}
	get := cfg.GetRules().GetPolicies()["entry-001"].GetPermissions()[0].GetAndRules().GetRules()
	if len(get) != 2 || get[0].GetHeader().GetName() != ":method" || get[0].GetHeader().GetStringMatch().GetExact() != "GET" ||
		get[1].GetUrlPath().GetPath().GetSafeRegex().GetRegex() != "/a" {
		t.Errorf("permission of a GET entry = %v", get)
	}
}

func exact(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
}

func TestPolicyNamesSortInEntryOrder(t *testing.T) {
	for _, n := range []int{1, 9, 10, 999, 1000, 12345} {
		names := make([]string, n)
		for i := range names {
			names[i] = PolicyName(i, n)
		}
		if !slices.IsSorted(names) {
			t.Errorf("policy names of %d entries do not sort in entry order", n)
		}
		if want := fmt.Sprintf("entry-%0*d", max(3, len(strconv.Itoa(n))), n); names[n-1] != want {
			t.Errorf("last name of %d entries = %q, want %q", n, names[n-1], want)
		}
	}
	if got := PolicyName(0, 3); got != "entry-001" {
		t.Errorf("PolicyName(0, 3) = %q, want entry-001", got)
	}
}

func TestCompileRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		acl  ACL
		dest Identity
		want string
	}{
		{"invalid ACL", ACL{entry("GET", "(", "web")}, usersProd,
			"compile ACL of prod/users: prod/users:entry 1: resource \"(\" is not a valid regular expression: missing closing ): `(`"},
		{"same caller twice", ACL{entry("GET", "/", "web", "prod/web")}, usersProd,
			`compile ACL of prod/users: prod/users:entry 1: allow lists "web" and "prod/web", the same caller in environment "prod"`},
		{"bad trust domain", ACL{}, Identity{TrustDomain: "Mesh", Env: "prod", Service: "users"},
			`compile ACL of prod/users: invalid trust domain "Mesh": use lower-case letters, digits, '.' and '-'`},
		{"bad destination", ACL{}, Identity{TrustDomain: "mesh.local", Env: "prod", Service: ""},
			`compile ACL of prod/: invalid service "": use 1-63 lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Compile(tc.acl, tc.dest)
			if err == nil {
				t.Fatalf("Compile = %v, want error", cfg)
			}
			if err.Error() != tc.want {
				t.Errorf("Compile error\n got: %s\nwant: %s", err, tc.want)
			}
		})
	}
}

func TestTypedExtensionConfig(t *testing.T) {
	cfg, err := Compile(ACL{entry("GET", "/", "web")}, usersProd)
	if err != nil {
		t.Fatal(err)
	}
	tec, err := TypedExtensionConfig(FilterName, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if tec.GetName() != "rbac" || tec.GetTypedConfig().GetTypeUrl() != TypeURL {
		t.Errorf("TypedExtensionConfig = %v", tec)
	}
	var back rbacv3.RBAC
	if err := anypb.UnmarshalTo(tec.GetTypedConfig(), &back, proto.UnmarshalOptions{}); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(&back, cfg) {
		t.Errorf("typed_config round trip = %v, want %v", &back, cfg)
	}
	if _, err := TypedExtensionConfig("", cfg); err == nil {
		t.Error("TypedExtensionConfig accepted an empty name")
	}
	if _, err := TypedExtensionConfig(FilterName, nil); err == nil {
		t.Error("TypedExtensionConfig accepted a nil config")
	}
}
