package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// envoyLogProblemRE matches an Envoy log line (startEnvoy's --log-format
// "[time][level][logger] message") at warning level or worse.
var envoyLogProblemRE = regexp.MustCompile(`(?m)^\[[^\]]+\]\[(warning|error|critical)\]\[.*$`)

// checkNoEnvoyWarnings fails the test for every warning, error or critical
// line in an Envoy log.
func checkNoEnvoyWarnings(t *testing.T, name, when, log string) {
	t.Helper()
	for _, l := range envoyLogProblemRE.FindAllString(log, -1) {
		t.Errorf("envoy %s logged, %s: %s", name, when, l)
	}
}

// accessLogLines returns the lines of an Envoy access log that contain all
// of words.
func accessLogLines(path string, words ...string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range lines(string(b)) {
		if countMatching(l, words...) == 1 {
			out = append(out, l)
		}
	}
	return out, nil
}

// TestEnvoyStartsWithoutWarnings starts two real sidecars (web -> api) from
// generated bootstraps, with --access-log, against a running server whose
// ACL lets web GET /ok on api and nothing else. Neither Envoy may log a
// warning (or worse) at info level from its start through LIVE and the
// first requests (certificates, trust bundle and both ECDS filters
// delivered); and a request the ACL denies leaves a line in both access
// logs: the callee's with the 403, the RBAC decision and the caller's
// SPIFFE ID, the caller's with the 403 and the callee's SPIFFE ID.
func TestEnvoyStartsWithoutWarnings(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	policyDir := filepath.Join(t.TempDir(), "policies")
	writeFile(t, filepath.Join(policyDir, "default", "api.json"),
		`[{"permission": {"method": "GET", "resource": "/ok"}, "allow": ["web"]}]`)
	srv := startServer(t, bin, "--policy-dir", policyDir, "--default-policy", "deny")

	logs := t.TempDir()
	apiLog, webLog := filepath.Join(logs, "api.access.log"), filepath.Join(logs, "web.access.log")
	api := startSidecarWith(t, srv, envoyBin, sidecarOpts{service: "api", nodeID: "api-1", extra: []string{"--access-log", apiLog}})
	apiLive := api.envoy.out.String()
	checkNoEnvoyWarnings(t, "api-1", "up to LIVE", apiLive)
	web := startSidecarWith(t, srv, envoyBin, sidecarOpts{
		service: "web", nodeID: "web-1", routes: []route{{name: "api", dest: api}},
		extra: []string{"--access-log", webLog},
	})
	webLive := web.envoy.out.String()
	checkNoEnvoyWarnings(t, "web-1", "up to LIVE", webLive)

	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	eventually(t, 20*time.Second, "GET /ok from web to api allowed", func() error {
		code, body, err := call(fresh, web, "api", "GET", "/ok")
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d: %q", code, body)
		}
		return err
	})
	code, body, err := call(fresh, web, "api", "GET", "/denied")
	if err != nil || code != 403 {
		t.Fatalf("GET /denied from web to api: status %d, %v (body %q), want 403", code, err, body)
	}

	webID, apiID := issuer.SPIFFEID("mesh.local", "default", "web"), issuer.SPIFFEID("mesh.local", "default", "api")
	for _, c := range []struct {
		log   string
		words []string
	}{
		// The callee: the RBAC filter's decision and who called.
		{apiLog, []string{`] inbound "GET /denied `, "\" 403 ", "details=rbac_access_denied_matched_policy[none]", "peer=" + webID + " "}},
		{apiLog, []string{`] inbound "GET /ok `, "\" 200 ", "details=via_upstream", "peer=" + webID + " "}},
		// The caller: the 403 came from the peer it verified.
		{webLog, []string{`] outbound_api "GET /denied `, "\" 403 ", "peer=" + apiID + " "}},
	} {
		// Envoy flushes access logs every second.
		eventually(t, 10*time.Second, fmt.Sprintf("%s: a line with %q", filepath.Base(c.log), c.words), func() error {
			got, err := accessLogLines(c.log, c.words...)
			if err == nil && len(got) == 0 {
				b, _ := os.ReadFile(c.log)
				err = fmt.Errorf("no such line in:\n%s", b)
			}
			return err
		})
	}
	if got, _ := accessLogLines(apiLog, `"GET /denied `, "200"); len(got) != 0 {
		t.Errorf("api access log records the denied request as allowed: %q", got)
	}

	checkNoEnvoyWarnings(t, "api-1", "after LIVE, through the first requests", strings.TrimPrefix(api.envoy.out.String(), apiLive))
	checkNoEnvoyWarnings(t, "web-1", "after LIVE, through the first requests", strings.TrimPrefix(web.envoy.out.String(), webLive))
	for _, f := range []string{apiLog, webLog} {
		b, _ := os.ReadFile(f)
		t.Logf("%s:\n%s", filepath.Base(f), b)
	}
	if !strings.Contains(apiLive, "][info][") {
		t.Fatalf("envoy api-1 log has no [info] line: the log format the warning check relies on changed:\n%s", tail(api.envoy.out.String(), 20))
	}
}
