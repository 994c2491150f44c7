package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sidecar is one service's app behind its own real Envoy.
type sidecar struct {
	name  string
	app   *app
	envoy *envoy
	in    int            // inbound mTLS port
	out   map[string]int // local outbound port per upstream name
}

// startSidecar creates a token for service, generates its bootstrap with an
// outbound listener per upstream sidecar, validates it and starts Envoy.
func startSidecar(t *testing.T, srv *server, envoyBin, service string, upstreams ...*sidecar) *sidecar {
	t.Helper()
	routes := make([]route, len(upstreams))
	for i, u := range upstreams {
		routes[i] = route{name: u.name, dest: u}
	}
	return startSidecarWith(t, srv, envoyBin, sidecarOpts{service: service, nodeID: service + "-1", routes: routes})
}

// route is an outbound listener of a sidecar, named name, to dest.
type route struct {
	name string
	dest *sidecar
}

type sidecarOpts struct {
	service, nodeID, token string
	routes                 []route
	extra                  []string // more `bootstrap envoy` flags
	appPort                int      // an app already listening; 0 starts a test app
}

func startSidecarWith(t *testing.T, srv *server, envoyBin string, o sidecarOpts) *sidecar {
	t.Helper()
	sc := &sidecar{name: o.service, in: freePort(t), out: map[string]int{}}
	if o.appPort != 0 {
		sc.app = &app{name: o.service, port: o.appPort}
	} else {
		sc.app = startApp(t, o.service)
	}
	tok := o.token
	if tok == "" {
		tok = strings.TrimSpace(srv.cli(t, "token", "create", "--service", o.service))
	}
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := filepath.Join(t.TempDir(), o.nodeID+".yaml")
	args := []string{"bootstrap", "envoy", "--server", srv.addr, "--token", tok,
		"--service-port", fmt.Sprint(sc.app.port), "--listen", fmt.Sprintf("127.0.0.1:%d", sc.in),
		"--admin", admin, "--node-id", o.nodeID, "-o", cfg}
	for _, r := range o.routes {
		sc.out[r.name] = freePort(t)
		args = append(args, "--upstream", fmt.Sprintf("%s=%s@127.0.0.1:%d,%d", r.name, r.dest.name, r.dest.in, sc.out[r.name]))
	}
	srv.cli(t, append(args, o.extra...)...)
	if out, err := runCmd(envoyBin, "--mode", "validate", "-c", cfg); err != nil {
		t.Fatalf("envoy --mode validate %s: %v\n%s", cfg, err, tail(out, 20))
	}
	sc.envoy = startEnvoy(t, envoyBin, o.nodeID, cfg, admin)
	return sc
}

// call sends method path from caller to its upstream dest and returns the
// status code and body.
func call(c *http.Client, caller *sidecar, dest, method, path string) (int, string, error) {
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", caller.out[dest], path), nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// statValue reads one counter from an Envoy's admin /stats.
func statValue(t *testing.T, admin, name string) int {
	t.Helper()
	body, err := httpGet("http://" + admin + "/stats?filter=^" + regexp.QuoteMeta(name) + "$")
	if err != nil {
		t.Fatalf("stats: %v", err)
	}
	for _, l := range lines(body) {
		if k, v, ok := strings.Cut(l, ": "); ok && k == name {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	t.Fatalf("stat %s not found in %q", name, body)
	return 0
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

const apiACL = `[
  {"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]},
  {"permission": {"method": "*", "resource": "/health"}, "allow": ["*"]}
]`

const dbACL = `[
  {"permission": {"method": "GET", "resource": "/rows/[0-9]+"}, "allow": ["api"]},
  {"permission": {"method": "POST", "resource": "/rows"}, "allow": ["api"]}
]`

// dbACLEdited takes GET away from api and gives it to web only.
const dbACLEdited = `- permission: {method: GET, resource: "/rows/[0-9]+"}
  allow: [web]
`

// TestACL runs three services (web, api, db) with ACLs on api and db, checks
// a matrix of decisions through the sidecars, then edits db's ACL while a
// keep-alive connection from api stays open: the new decisions apply within
// 2 s, on the same connection, with no Envoy restarted; an invalid edit
// changes nothing and is reported.
func TestACL(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	policyDir := filepath.Join(t.TempDir(), "policies")
	writeFile(t, filepath.Join(policyDir, "default", "api.json"), apiACL)
	writeFile(t, filepath.Join(policyDir, "default", "db.json"), dbACL)
	srv := startServer(t, bin, "--policy-dir", policyDir, "--default-policy", "deny")

	db := startSidecar(t, srv, envoyBin, "db")
	api := startSidecar(t, srv, envoyBin, "api", db)
	web := startSidecar(t, srv, envoyBin, "web", api, db)
	pids := map[string]int{"db": db.envoy.pid(), "api": api.envoy.pid(), "web": web.envoy.pid()}
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

	matrix := []struct {
		caller *sidecar
		dest   string
		method string
		path   string
		want   int
	}{
		{web, "api", "GET", "/users", 200},
		{web, "api", "GET", "/users?page=2", 200}, // the query string is not part of the path
		{web, "api", "GET", "/users/1", 403},      // full match: /users does not cover /users/1
		{web, "api", "GET", "/user", 403},         // nor /user
		{web, "api", "POST", "/users", 403},       // method
		{web, "api", "GET", "//users", 200},       // merge_slashes
		{web, "api", "GET", "/x/../users", 200},   // normalize_path
		{web, "api", "DELETE", "/health", 200},    // "*" method, "*" caller
		{web, "db", "GET", "/rows/1", 403},        // web is not allowed into db
		{api, "db", "GET", "/rows/42", 200},       // regex
		{api, "db", "GET", "/rows/abc", 403},      // regex full match
		{api, "db", "POST", "/rows", 200},         // second entry
		{api, "db", "DELETE", "/rows", 403},       // method not listed
		{api, "db", "POST", "/rows/1", 403},       // path of the other entry
		{web, "api", "GET", "/health", 200},       // any mesh identity
		{api, "db", "GET", "/health", 403},        // db has no such entry
	}
	eventually(t, 20*time.Second, "first decision through the mesh", func() error {
		code, _, err := call(fresh, web, "api", "GET", "/users")
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d", code)
		}
		return err
	})
	for _, m := range matrix {
		code, body, err := call(fresh, m.caller, m.dest, m.method, m.path)
		if err != nil {
			t.Errorf("%s -> %s %s %s: %v", m.caller.name, m.dest, m.method, m.path, err)
			continue
		}
		if code != m.want {
			t.Errorf("%s -> %s %s %s: status %d, want %d (body %q)", m.caller.name, m.dest, m.method, m.path, code, m.want, body)
		}
		if code == 403 && !strings.Contains(body, "RBAC: access denied") {
			t.Errorf("%s -> %s %s %s: 403 body %q, want Envoy RBAC's", m.caller.name, m.dest, m.method, m.path, body)
		}
	}

	// A keep-alive connection from api to db, through api's sidecar.
	var reused, conns int
	keep := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Hour}}
	keepCall := func(method, path string) (int, string) {
		t.Helper()
		trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
			if i.Reused {
				reused++
			} else {
				conns++
			}
		}}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), method,
			fmt.Sprintf("http://127.0.0.1:%d%s", api.out["db"], path), nil)
		resp, err := keep.Do(req)
		if err != nil {
			t.Fatalf("keep-alive request: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := keepCall("GET", "/rows/7"); code != 200 {
		t.Fatalf("keep-alive GET before the edit: %d, want 200", code)
	}
	// Connections api's sidecar opened to db: the pooled one must survive.
	apiToDB := statValue(t, api.envoy.admin, "cluster.out_db.upstream_cx_total")

	// A valid edit (YAML this time) reaches the sidecars within 2 s. The
	// YAML file is written before the JSON one goes: meanwhile two files
	// claim db, an error that keeps the last good policy (removing first
	// would put db on the default deny-all for a moment).
	writeFile(t, filepath.Join(policyDir, "default", "db.yaml"), dbACLEdited)
	if err := os.Remove(filepath.Join(policyDir, "default", "db.json")); err != nil {
		t.Fatal(err)
	}
	edited := time.Now()
	var flipped time.Duration
	for time.Since(edited) < 5*time.Second {
		// Both new decisions, so that a deny-all cannot pass for the edit.
		code, body := keepCall("GET", "/rows/7")
		if code == 403 && strings.Contains(body, "RBAC: access denied") {
			if webCode, _, _ := call(fresh, web, "db", "GET", "/rows/1"); webCode == 200 {
				flipped = time.Since(edited)
				break
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("db ACL edit applied after %s", flipped)
	if flipped == 0 || flipped > 2*time.Second {
		t.Fatalf("the edited db ACL did not apply within 2 s (took %s)", flipped)
	}
	if conns != 1 {
		t.Errorf("the keep-alive client opened %d connections, want 1: the connection was closed", conns)
	}
	if got := statValue(t, api.envoy.admin, "cluster.out_db.upstream_cx_total"); got != apiToDB {
		t.Errorf("api's sidecar opened %d new connections to db across the edit, want 0: the pooled connection was closed", got-apiToDB)
	}
	if code, _, _ := call(fresh, web, "db", "GET", "/rows/1"); code != 200 {
		t.Errorf("web -> db GET /rows/1 after the edit: %d, want 200", code)
	}

	// An invalid edit changes nothing and is reported.
	writeFile(t, filepath.Join(policyDir, "default", "db.yaml"), "- permission: {method: GET, resource: \"/rows/(\"}\n  allow: [api]\n")
	time.Sleep(1500 * time.Millisecond)
	if code, _ := keepCall("GET", "/rows/7"); code != 403 {
		t.Errorf("after an invalid edit api -> db GET /rows/7 is %d, want the last good policy's 403", code)
	}
	if code, _, _ := call(fresh, web, "db", "GET", "/rows/1"); code != 200 {
		t.Errorf("after an invalid edit web -> db GET /rows/1 is %d, want the last good policy's 200", code)
	}
	status, statusErr, statusCode := srv.cliResult("acl", "status")
	if !strings.Contains(status, "default/db") || !strings.Contains(status, "stale") || !strings.Contains(status, "db.yaml:entry 1") {
		t.Errorf("acl status does not report the invalid db file:\n%s", status)
	}
	if statusCode != 1 || !strings.Contains(statusErr, "invalid ACL file(s): default/db.yaml") {
		t.Errorf("acl status with an invalid file: exit %d, stderr %q; want 1 naming default/db.yaml", statusCode, statusErr)
	}
	if !strings.Contains(srv.out.String(), "invalid policy file") {
		t.Errorf("no log line for the invalid policy file")
	}
	metrics, err := httpGet("http://" + srv.metrics + "/metrics")
	if err != nil || !regexp.MustCompile(`(?m)^sds_policy_errors_total [1-9]`).MatchString(metrics) {
		t.Errorf("sds_policy_errors_total not counted (err %v)", err)
	}
	for name, e := range map[string]*envoy{"db": db.envoy, "api": api.envoy, "web": web.envoy} {
		if !e.alive() || e.pid() != pids[name] {
			t.Errorf("%s Envoy restarted or died", name)
		}
	}
	t.Logf("keep-alive connection: %d requests reused it", reused)
}
