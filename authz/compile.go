package authz

import (
	"fmt"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	mtlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/rbac/principals/mtls_authenticated/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/issuer"
)

const (
	// FilterName is the name of the RBAC HTTP filter in generated Envoy
	// configs, and so the name of its ECDS resource (TypedExtensionConfig).
	FilterName = "rbac"

	// TypeURL is the type URL of the filter config, for the HCM's
	// config_discovery.type_urls and for ECDS requests.
	TypeURL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"

	// MTLSPrincipal is the name of the Envoy extension that matches the
	// SANs of a validated client certificate.
	MTLSPrincipal = "envoy.rbac.principals.mtls_authenticated"
)

// Identity names the destination service an ACL protects.
type Identity struct {
	TrustDomain string
	Env         string
	Service     string
}

// Validate checks the trust domain and names.
func (d Identity) Validate() error {
	if err := issuer.ValidateTrustDomain(d.TrustDomain); err != nil {
		return err
	}
	if err := issuer.ValidateName("environment", d.Env); err != nil {
		return err
	}
	return issuer.ValidateName("service", d.Service)
}

// String returns env/service.
func (d Identity) String() string { return d.Env + "/" + d.Service }

// Compile turns the ACL of dest into the config of Envoy's RBAC HTTP filter
// (envoy.extensions.filters.http.rbac.v3.RBAC), ready for TypedExtensionConfig.
//
// The rules have action ALLOW and one policy per entry, named "entry-<N>"
// (N from 1, zero-padded so that the lexical order Envoy evaluates them in
// is the file order). A policy's permission is the entry's method (a
// ":method" header match, left out for "*") and its resource (a url_path
// safe_regex, which Envoy matches against the whole path without the query
// string); its principals are the allowed callers, each matched on the URI
// SAN of the caller's validated client certificate through the
// mtls_authenticated principal: "web" is spiffe://<td>/ns/<dest env>/sa/web,
// "staging/web" is spiffe://<td>/ns/staging/sa/web, and "*" is any SAN
// starting with spiffe://<td>/ns/, i.e. any workload of the mesh (and not
// the SDS server, whose ID lies outside /ns/).
//
// An empty ACL compiles to rules without policies, which deny every
// request (the same as DenyAll). Compile validates the ACL first, so it
// never produces a config Envoy would refuse.
func Compile(acl ACL, dest Identity) (*rbacv3.RBAC, error) {
	if err := dest.Validate(); err != nil {
		return nil, fmt.Errorf("compile ACL of %s: %w", dest, err)
	}
	if err := acl.Validate(dest.String(), dest.Env); err != nil {
		return nil, fmt.Errorf("compile ACL of %s: %w", dest, err)
	}
	policies := make(map[string]*rbacconfigv3.Policy, len(acl))
	for i, e := range acl {
		principals := make([]*rbacconfigv3.Principal, 0, len(e.Allow))
		for _, c := range e.Allow {
			principals = append(principals, callerPrincipal(dest, c))
		}
		policies[PolicyName(i, len(acl))] = &rbacconfigv3.Policy{
			Permissions: []*rbacconfigv3.Permission{permission(e.Permission)},
			Principals:  principals,
		}
	}
	return finish(&rbacconfigv3.RBAC{Action: rbacconfigv3.RBAC_ALLOW, Policies: policies})
}

// PolicyName returns the name of the policy of entry i (from 0) of an ACL
// of n entries: "entry-<i+1>", zero-padded to at least three digits and to
// the width of n, so that names sort in entry order.
func PolicyName(i, n int) string {
	width := max(3, len(strconv.Itoa(n)))
	return fmt.Sprintf("entry-%0*d", width, i+1)
}

// DenyAll returns the RBAC config that denies every request: rules with
// action ALLOW and no policy. It is the safe default_config of the filter's
// config_discovery, in force until a service's ACL arrives.
func DenyAll() *rbacv3.RBAC {
	return &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{Action: rbacconfigv3.RBAC_ALLOW}}
}

// AllowAll returns the RBAC config that allows any request from any
// workload of the trust domain, for a default policy of "allow". It still
// requires a mesh identity: the caller must present a client certificate
// that validates and carries a spiffe://<trustDomain>/ns/ URI SAN.
func AllowAll(trustDomain string) (*rbacv3.RBAC, error) {
	if err := issuer.ValidateTrustDomain(trustDomain); err != nil {
		return nil, fmt.Errorf("allow-all RBAC: %w", err)
	}
	return finish(&rbacconfigv3.RBAC{
		Action: rbacconfigv3.RBAC_ALLOW,
		Policies: map[string]*rbacconfigv3.Policy{
			"allow-all": {
				Permissions: []*rbacconfigv3.Permission{{Rule: &rbacconfigv3.Permission_Any{Any: true}}},
				Principals:  []*rbacconfigv3.Principal{sanPrincipal(prefixMatcher(meshPrefix(trustDomain)))},
			},
		},
	})
}

// TypedExtensionConfig wraps an RBAC filter config as the ECDS resource
// named name (by convention FilterName, which must equal the name of the
// filter in the listener's HCM).
func TypedExtensionConfig(name string, rbac *rbacv3.RBAC) (*corev3.TypedExtensionConfig, error) {
	if name == "" {
		return nil, fmt.Errorf("RBAC extension config: empty name")
	}
	if rbac == nil {
		return nil, fmt.Errorf("RBAC extension config %q: nil config", name)
	}
	a, err := anypb.New(rbac)
	if err != nil {
		return nil, fmt.Errorf("RBAC extension config %q: %w", name, err)
	}
	tec := &corev3.TypedExtensionConfig{Name: name, TypedConfig: a}
	if err := tec.ValidateAll(); err != nil {
		return nil, fmt.Errorf("RBAC extension config %q: %w", name, err)
	}
	return tec, nil
}

func finish(rules *rbacconfigv3.RBAC) (*rbacv3.RBAC, error) {
	r := &rbacv3.RBAC{Rules: rules}
	if err := r.ValidateAll(); err != nil {
		return nil, fmt.Errorf("generated RBAC config is invalid: %w", err)
	}
	return r, nil
}

func permission(p Permission) *rbacconfigv3.Permission {
	var rules []*rbacconfigv3.Permission
	if p.Method != AnyMethod {
		rules = append(rules, &rbacconfigv3.Permission{Rule: &rbacconfigv3.Permission_Header{
			Header: &routev3.HeaderMatcher{
				Name: ":method",
				HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{
					StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: p.Method}},
				},
			},
		}})
	}
	rules = append(rules, &rbacconfigv3.Permission{Rule: &rbacconfigv3.Permission_UrlPath{
		UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{
			Path: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{
				SafeRegex: &matcherv3.RegexMatcher{Regex: p.Resource},
			}},
		}},
	}})
	return &rbacconfigv3.Permission{Rule: &rbacconfigv3.Permission_AndRules{
		AndRules: &rbacconfigv3.Permission_Set{Rules: rules},
	}}
}

// meshPrefix is the prefix of every workload SPIFFE ID of a trust domain,
// spiffe://<td>/ns/ (see issuer.SPIFFEID).
func meshPrefix(trustDomain string) string {
	return "spiffe://" + trustDomain + "/ns/"
}

// callerPrincipal matches the caller named by an allow item of dest's ACL.
func callerPrincipal(dest Identity, caller string) *rbacconfigv3.Principal {
	if caller == AnyCaller {
		return sanPrincipal(prefixMatcher(meshPrefix(dest.TrustDomain)))
	}
	env, svc, ok := strings.Cut(caller, "/")
	if !ok {
		env, svc = dest.Env, caller
	}
	id := issuer.SPIFFEID(dest.TrustDomain, env, svc)
	return sanPrincipal(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}})
}

func prefixMatcher(p string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: p}}
}

// sanPrincipal matches a validated client certificate with a URI SAN
// matching m. anypb.New cannot fail for a generated message, so the error is
// dropped on purpose; finish's ValidateAll catches an empty Any.
func sanPrincipal(m *matcherv3.StringMatcher) *rbacconfigv3.Principal {
	cfg, _ := anypb.New(&mtlsv3.Config{
		SanMatcher: &tlsv3.SubjectAltNameMatcher{SanType: tlsv3.SubjectAltNameMatcher_URI, Matcher: m},
	})
	return &rbacconfigv3.Principal{Identifier: &rbacconfigv3.Principal_Custom{
		Custom: &corev3.TypedExtensionConfig{Name: MTLSPrincipal, TypedConfig: cfg},
	}}
}
