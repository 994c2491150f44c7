package sds

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/meshid/sds-server/bootstrap"
)

// servedACL returns the ACL filter the cache holds for a node.
func servedACL(t *testing.T, env *testEnv, nodeID string) *rbacconfigv3.RBAC {
	t.Helper()
	r := env.srv.cache.get(nodeID, xdsres.ExtensionConfigType, bootstrap.RBACFilterName)
	if r == nil {
		t.Fatalf("node %s has no %q filter", nodeID, bootstrap.RBACFilterName)
	}
	var tec core.TypedExtensionConfig
	if err := r.any.UnmarshalTo(&tec); err != nil {
		t.Fatal(err)
	}
	var rbac rbacv3.RBAC
	if err := tec.GetTypedConfig().UnmarshalTo(&rbac); err != nil {
		t.Fatal(err)
	}
	return rbac.GetRules()
}

func writePolicy(t *testing.T, dir, rel, content string) {
	t.Helper()
	p := filepath.Join(dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p+".tmp", []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(p+".tmp", p); err != nil {
		t.Fatal(err)
	}
}

// TestWatchPolicies follows a policy directory through a valid ACL, an
// invalid edit (the last good policy stays and is reported), and removal
// (the default applies), on a server built without an explicit default.
func TestWatchPolicies(t *testing.T) {
	env := newTestEnv(t)
	dir := t.TempDir()
	writePolicy(t, dir, "default/api.json", `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]}]`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := env.srv.WatchPolicies(ctx, dir, "deny", 20*time.Millisecond); err != nil {
		t.Fatalf("WatchPolicies: %v", err)
	}

	apiTok, apiRec := env.token(t, "api", time.Hour, 0)
	webTok, webRec := env.token(t, "web", time.Hour, 0)
	env.fetch(t, sdsSotw, apiTok, "api-1", SecretDefault)
	env.fetch(t, sdsSotw, webTok, "web-1", SecretDefault)
	api := env.nodeFor(t, apiRec.ID, "api-1").ID
	web := env.nodeFor(t, webRec.ID, "web-1").ID

	if got := servedACL(t, env, api); got.GetAction() != rbacconfigv3.RBAC_ALLOW || len(got.GetPolicies()) != 1 {
		t.Fatalf("api's filter: %v, want its one-entry ACL", got)
	}
	// Deny-all is rules present with no policy: absent rules would enforce
	// nothing at all.
	if got := servedACL(t, env, web); got == nil || len(got.GetPolicies()) != 0 || got.GetAction() != rbacconfigv3.RBAC_ALLOW {
		t.Fatalf("web (no policy file) gets %v, want deny-all", got)
	}

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 3 s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// An invalid edit keeps the last good policy and is reported once.
	writePolicy(t, dir, "default/api.json", `[{"permission": {"method": "GETT", "resource": "/users"}, "allow": ["web"]}]`)
	waitFor("the invalid file reported", func() bool {
		for _, s := range env.srv.policyWatch.Load().report().Services {
			if s.Service == "api" && strings.Contains(s.Error, "entry 1") && s.Active {
				return true
			}
		}
		return false
	})
	if got := servedACL(t, env, api); len(got.GetPolicies()) != 1 {
		t.Fatalf("after an invalid edit api's filter is %v, want the last good one", got)
	}
	if n := metricValue(t, env.metrics.policyErrors); n != 1 {
		t.Errorf("sds_policy_errors_total = %v, want 1", n)
	}
	if logs := env.logs.String(); strings.Count(logs, "invalid policy file") != 1 || !strings.Contains(logs, "api.json") {
		t.Errorf("want one log line naming the invalid file:\n%s", logs)
	}

	// Removing the file puts the service back on the default policy.
	if err := os.Remove(filepath.Join(dir, "default", "api.json")); err != nil {
		t.Fatal(err)
	}
	waitFor("api back on deny-all", func() bool {
		r := servedACL(t, env, api)
		return r != nil && len(r.GetPolicies()) == 0
	})
}
