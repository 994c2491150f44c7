package sds

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/bootstrap"
)

// ServiceKey names a destination service: its policy is chosen by the
// stream's own identity, never by what the sidecar asks for.
type ServiceKey struct{ Env, Service string }

func (k ServiceKey) String() string { return k.Env + "/" + k.Service }

// policySet is the encoded RBAC filter of every service with a policy, and
// the one served to services without.
type policySet struct {
	byKey map[ServiceKey]*resource
	def   *resource
}

func (p *policySet) forKey(k ServiceKey) *resource {
	if r, ok := p.byKey[k]; ok {
		return r
	}
	return p.def
}

// extensionResource encodes an RBAC filter config as the ECDS resource
// named name, after checking it with the proto's own validation.
func extensionResource(name string, rbac *rbacv3.RBAC) (*resource, error) {
	if rbac == nil {
		// Encoded as-is it would be an RBAC filter without rules, which
		// Envoy reads as "enforce nothing".
		return nil, fmt.Errorf("RBAC filter %q: no config", name)
	}
	if err := rbac.ValidateAll(); err != nil {
		return nil, fmt.Errorf("RBAC filter %q: %w", name, err)
	}
	a, err := anypb.New(rbac)
	if err != nil {
		return nil, fmt.Errorf("RBAC filter %q: %w", name, err)
	}
	return newResource(name, &core.TypedExtensionConfig{Name: name, TypedConfig: a})
}

// SetPolicies replaces every service's ACL filter (def for services without
// one) and pushes each changed filter to the connected sidecars of that
// service over ECDS. A config that fails validation changes nothing.
func (s *Server) SetPolicies(byKey map[ServiceKey]*rbacv3.RBAC, def *rbacv3.RBAC) error {
	next := &policySet{byKey: make(map[ServiceKey]*resource, len(byKey))}
	var err error
	if next.def, err = extensionResource(bootstrap.RBACFilterName, def); err != nil {
		return err
	}
	for k, r := range byKey {
		if next.byKey[k], err = extensionResource(bootstrap.RBACFilterName, r); err != nil {
			return fmt.Errorf("policy of %s: %w", k, err)
		}
	}
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	old := s.policies.Swap(next)
	s.mu.Lock()
	nodes := make([]*liveNode, 0, len(s.live))
	for _, ln := range s.live {
		nodes = append(nodes, ln)
	}
	s.mu.Unlock()
	for _, ln := range nodes {
		k := ServiceKey{Env: ln.rec.Env, Service: ln.rec.Service}
		r := next.forKey(k)
		if old != nil && old.forKey(k).version == r.version {
			continue
		}
		s.cache.set(ln.rec.ID, xdsres.ExtensionConfigType, map[string]*resource{bootstrap.RBACFilterName: r})
	}
	return nil
}

// revokedDenyList is the RBAC DENY filter refusing every request made with a
// revoked certificate, matched by its SHA-256 in the x-forwarded-client-cert
// header the inbound listener sets (and sanitises: a client cannot forge
// it). TLS does not re-validate open connections when the CRL changes; this
// filter applies to the very next request on them.
func revokedDenyList(hashes []string) (*resource, error) {
	sort.Strings(hashes)
	rules := &rbacconfigv3.RBAC{Action: rbacconfigv3.RBAC_DENY}
	if len(hashes) > 0 {
		ids := make([]*rbacconfigv3.Principal, 0, len(hashes))
		for _, h := range hashes {
			ids = append(ids, &rbacconfigv3.Principal{Identifier: &rbacconfigv3.Principal_Header{Header: &routev3.HeaderMatcher{
				Name: "x-forwarded-client-cert",
				HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
					MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "Hash=" + h},
				}},
			}}})
		}
		rules.Policies = map[string]*rbacconfigv3.Policy{"revoked-certificates": {
			Permissions: []*rbacconfigv3.Permission{{Rule: &rbacconfigv3.Permission_Any{Any: true}}},
			Principals:  []*rbacconfigv3.Principal{{Identifier: &rbacconfigv3.Principal_OrIds{OrIds: &rbacconfigv3.Principal_Set{Ids: ids}}}},
		}}
	}
	return extensionResource(bootstrap.RevokedFilterName, &rbacv3.RBAC{Rules: rules})
}

// publishRevoked pushes a new revoked-certificates filter to every node if
// it changed. Callers hold pubMu.
func (s *Server) publishRevoked(res *resource) {
	old := s.revokedRes.Swap(res)
	if old != nil && old.version == res.version {
		return
	}
	for _, id := range s.cache.nodeIDs() {
		s.cache.set(id, xdsres.ExtensionConfigType, map[string]*resource{bootstrap.RevokedFilterName: res})
	}
}

// certHash is the hex SHA-256 of a certificate's DER, as Envoy puts it in
// x-forwarded-client-cert's Hash field.
func certHash(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}
