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

// Two versions of api's ACL: the tightened one has fewer entries, which is
// how the test tells which one is in force.
const (
	looseACL = `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]},
 {"permission": {"method": "POST", "resource": "/users"}, "allow": ["web"]}]`
	tightACL = `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]}]`
)

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// relink points link at target atomically (a new link renamed over it), as
// kubelet swaps a ConfigMap's ..data.
func relink(t *testing.T, target, link string) {
	t.Helper()
	tmp := link + ".new-link"
	symlink(t, target, tmp)
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
}

// overwrite rewrites a file in place (same inode, same size when the
// content has the same length), the edit a stat of the link cannot see.
func overwrite(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestWatchPoliciesSymlinks edits policies through symbolic links: every
// edit of what the links lead to applies, and a link that leads nowhere
// (dangling, looping) keeps the last good policy with an error in the
// report, never silently. Each case starts with api's loose ACL in force,
// reached through the case's links, and ends, after the links are replaced
// by a plain tight file, with that file in force.
func TestWatchPoliciesSymlinks(t *testing.T) {
	tests := []struct {
		name string
		// setup lays out policy_dir (dir) with the loose ACL for
		// default/api, using store for link targets outside it.
		setup func(t *testing.T, dir, store string)
		// edit changes what the links lead to.
		edit func(t *testing.T, dir, store string)
		// wantErr, when set, is the error api's status must show while
		// the loose ACL stays in force; otherwise the tight ACL applies.
		wantErr string
	}{
		{
			name: "symlinked file edited in place",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "api.json", looseACL)
				symlink(t, filepath.Join(store, "api.json"), filepath.Join(dir, "default", "api.json"))
			},
			edit: func(t *testing.T, dir, store string) { overwrite(t, filepath.Join(store, "api.json"), tightACL) },
		},
		{
			name: "symlinked file replaced by rename",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "api.json", looseACL)
				symlink(t, filepath.Join(store, "api.json"), filepath.Join(dir, "default", "api.json"))
			},
			edit: func(t *testing.T, dir, store string) { writePolicy(t, store, "api.json", tightACL) },
		},
		{
			name: "file in a symlinked env directory edited",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "default/api.json", looseACL)
				symlink(t, filepath.Join(store, "default"), filepath.Join(dir, "default"))
			},
			edit: func(t *testing.T, dir, store string) {
				overwrite(t, filepath.Join(store, "default", "api.json"), tightACL)
			},
		},
		{
			name: "link retargeted",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "loose.json", looseACL)
				writePolicy(t, store, "tight.json", tightACL)
				symlink(t, filepath.Join(store, "loose.json"), filepath.Join(dir, "default", "api.json"))
			},
			edit: func(t *testing.T, dir, store string) {
				relink(t, filepath.Join(store, "tight.json"), filepath.Join(dir, "default", "api.json"))
			},
		},
		{
			// kubelet's layout: <dir>/..data -> ..<timestamp>, and
			// <dir>/default -> ..data/default; an update writes a new
			// timestamped directory, swaps ..data and removes the old one.
			name: "Kubernetes ConfigMap ..data swap",
			setup: func(t *testing.T, dir, _ string) {
				writePolicy(t, dir, "..2026_01_01_00_00_00.1/default/api.json", looseACL)
				symlink(t, "..2026_01_01_00_00_00.1", filepath.Join(dir, "..data"))
				symlink(t, "..data/default", filepath.Join(dir, "default"))
			},
			edit: func(t *testing.T, dir, _ string) {
				writePolicy(t, dir, "..2026_01_01_00_00_00.2/default/api.json", tightACL)
				relink(t, "..2026_01_01_00_00_00.2", filepath.Join(dir, "..data"))
				if err := os.RemoveAll(filepath.Join(dir, "..2026_01_01_00_00_00.1")); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			// A ConfigMap mounted as one environment directory:
			// default/..data -> ..<timestamp>, default/api.json ->
			// ..data/api.json.
			name: "Kubernetes ConfigMap as the env directory",
			setup: func(t *testing.T, dir, _ string) {
				writePolicy(t, dir, "default/..2026_01_01_00_00_00.1/api.json", looseACL)
				symlink(t, "..2026_01_01_00_00_00.1", filepath.Join(dir, "default", "..data"))
				symlink(t, "..data/api.json", filepath.Join(dir, "default", "api.json"))
			},
			edit: func(t *testing.T, dir, _ string) {
				writePolicy(t, dir, "default/..2026_01_01_00_00_00.2/api.json", tightACL)
				relink(t, "..2026_01_01_00_00_00.2", filepath.Join(dir, "default", "..data"))
				if err := os.RemoveAll(filepath.Join(dir, "default", "..2026_01_01_00_00_00.1")); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "dangling file link",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "api.json", looseACL)
				symlink(t, filepath.Join(store, "api.json"), filepath.Join(dir, "default", "api.json"))
			},
			edit: func(t *testing.T, dir, store string) {
				if err := os.Remove(filepath.Join(store, "api.json")); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "default/api.json: symbolic link to STORE/api.json: no such file or directory",
		},
		{
			name: "file link loop",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "api.json", looseACL)
				symlink(t, filepath.Join(store, "api.json"), filepath.Join(dir, "default", "api.json"))
			},
			edit: func(t *testing.T, dir, _ string) {
				symlink(t, "api.json", filepath.Join(dir, "default", "loop"))
				relink(t, "loop", filepath.Join(dir, "default", "api.json"))
			},
			wantErr: "default/api.json: symbolic link to loop: too many levels of symbolic links",
		},
		{
			name: "dangling env directory link",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "default/api.json", looseACL)
				symlink(t, filepath.Join(store, "default"), filepath.Join(dir, "default"))
			},
			edit: func(t *testing.T, dir, store string) {
				if err := os.RemoveAll(filepath.Join(store, "default")); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "default/: symbolic link to STORE/default: no such file or directory",
		},
		{
			name: "env directory link loop",
			setup: func(t *testing.T, dir, store string) {
				writePolicy(t, store, "default/api.json", looseACL)
				symlink(t, filepath.Join(store, "default"), filepath.Join(dir, "default"))
			},
			edit: func(t *testing.T, dir, _ string) {
				symlink(t, "default", filepath.Join(dir, ".loop"))
				relink(t, ".loop", filepath.Join(dir, "default"))
			},
			wantErr: "default/: symbolic link to .loop: too many levels of symbolic links",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t)
			dir, store := t.TempDir(), t.TempDir()
			tc.setup(t, dir, store)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if err := env.srv.WatchPolicies(ctx, dir, "deny", 20*time.Millisecond); err != nil {
				t.Fatalf("WatchPolicies: %v", err)
			}
			tok, rec := env.token(t, "api", time.Hour, 0)
			env.fetch(t, sdsSotw, tok, "api-1", SecretDefault)
			api := env.nodeFor(t, rec.ID, "api-1").ID
			apiStatus := func() PolicyStatus {
				for _, s := range env.srv.policyWatch.Load().report().Services {
					if s.Env == "default" && s.Service == "api" {
						return s
					}
				}
				return PolicyStatus{}
			}
			served := func() int { return len(servedACL(t, env, api).GetPolicies()) }
			if st, n := apiStatus(), served(); !st.Active || st.Entries != 2 || st.Error != "" || n != 2 {
				t.Fatalf("before the edit: status %+v, %d policies served; want the loose ACL's 2", st, n)
			}
			waitFor := func(what string, cond func() bool) {
				t.Helper()
				deadline := time.Now().Add(3 * time.Second)
				for !cond() {
					if time.Now().After(deadline) {
						t.Fatalf("%s: not within 3 s (status %+v, %d policies served)", what, apiStatus(), served())
					}
					time.Sleep(10 * time.Millisecond)
				}
			}

			tc.edit(t, dir, store)
			if tc.wantErr == "" {
				waitFor("the tight ACL in force", func() bool {
					st := apiStatus()
					return st.Active && st.Entries == 1 && st.Error == "" && served() == 1
				})
			} else {
				want := strings.ReplaceAll(tc.wantErr, "STORE", store)
				waitFor("the error reported", func() bool { return apiStatus().Error == want })
				if st, n := apiStatus(), served(); !st.Active || st.Entries != 2 || n != 2 {
					t.Errorf("after the error: status %+v, %d policies served; want the last good (loose) ACL's 2", st, n)
				}
				if logs := env.logs.String(); !strings.Contains(logs, "invalid policy file") {
					t.Errorf("the error was not logged:\n%s", logs)
				}
			}

			// A plain file in place of the links applies, error cleared.
			if err := os.RemoveAll(filepath.Join(dir, "default")); err != nil {
				t.Fatal(err)
			}
			writePolicy(t, dir, "default/api.json", tightACL)
			waitFor("a plain tight file in force", func() bool {
				st := apiStatus()
				return st.Active && st.Entries == 1 && st.Error == "" && served() == 1
			})
		})
	}
}

// TestWatchPoliciesDirUnreadable: when policy_dir itself cannot be read (here
// a link to it left dangling), every policy stays in force, the reason is
// logged once and reported until it passes.
func TestWatchPoliciesDirUnreadable(t *testing.T) {
	env := newTestEnv(t)
	store := t.TempDir()
	writePolicy(t, store, "real/default/api.json", looseACL)
	dir := filepath.Join(t.TempDir(), "policies")
	symlink(t, filepath.Join(store, "real"), dir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := env.srv.WatchPolicies(ctx, dir, "deny", 20*time.Millisecond); err != nil {
		t.Fatalf("WatchPolicies: %v", err)
	}
	report := func() PolicyReport { return env.srv.policyWatch.Load().report() }
	waitFor := func(what string, cond func(PolicyReport) bool) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Second)
		for !cond(report()) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 3 s (report %+v)", what, report())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err := os.Rename(filepath.Join(store, "real"), filepath.Join(store, "moved")); err != nil {
		t.Fatal(err)
	}
	waitFor("the unreadable policy_dir reported", func(r PolicyReport) bool {
		return strings.Contains(r.Error, "no such file or directory")
	})
	for range 3 { // more polls, each failing, besides the ticker's
		if err := env.srv.policyWatch.Load().scan(false); err != nil {
			t.Fatalf("scan: %v", err)
		}
	}
	r := report()
	if len(r.Services) != 1 || !r.Services[0].Active || r.Services[0].Entries != 2 {
		t.Errorf("with policy_dir unreadable: %+v, want api's policy still in force", r.Services)
	}
	if n := strings.Count(env.logs.String(), "policy_dir unreadable"); n != 1 {
		t.Errorf("%d log lines for the unreadable policy_dir over several polls, want 1", n)
	}
	if err := os.Rename(filepath.Join(store, "moved"), filepath.Join(store, "real")); err != nil {
		t.Fatal(err)
	}
	waitFor("the error cleared", func(r PolicyReport) bool { return r.Error == "" })
}
