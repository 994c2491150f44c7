package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Files holding PromQL for operators, relative to this package.
const (
	dashboardPath = "../deploy/grafana/sds-server.json"
	rulesPath     = "../deploy/prometheus/sds-server.rules.yml"
	rulesTestPath = "../deploy/prometheus/sds-server.rules.test.yml"
)

// TestMetricsExposition scrapes a running server with two real sidecars
// connected: promtool check metrics finds nothing to say about the
// exposition, the new gauges have their series, and every sds_ metric the
// dashboard and the alert rules name is in the scrape.
func TestMetricsExposition(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	promtool := tool(t, "SDS_PROMTOOL_BIN", ".tools/bin/promtool")
	srv := startServer(t, bin)
	startMesh(t, srv, envoyBin)

	var body string
	eventually(t, 30*time.Second, "two nodes connected and their soonest certificate expiry exported", func() error {
		b, err := httpGet("http://" + srv.metrics + "/metrics")
		if err != nil {
			return err
		}
		body = b
		if !strings.Contains(body, "\nsds_connected_nodes 2\n") {
			return fmt.Errorf("sds_connected_nodes is not 2 yet")
		}
		if !strings.Contains(body, "\nsds_workload_certificate_soonest_expiry_timestamp_seconds ") {
			return fmt.Errorf("no soonest workload expiry yet")
		}
		return nil
	})

	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	for _, re := range []string{
		`(?m)^sds_build_info\{goversion="go[^"]+",revision="[^"]+",version="[^"]+"\} 1$`,
		`(?m)^sds_ready 1$`,
		`(?m)^sds_ca_certificate_expiry_timestamp_seconds\{cert="root",sha256="[0-9a-f]{64}"\} \S+$`,
		`(?m)^sds_ca_certificate_expiry_timestamp_seconds\{cert="intermediate",sha256="[0-9a-f]{64}"\} \S+$`,
		`(?m)^sds_crl_next_update_timestamp_seconds \S+$`,
		`(?m)^sds_authentication_failures_total\{reason="revoked"\} 0$`,
		`(?m)^sds_connected_streams\{protocol="delta",xds_type="sds"\} 0$`,
	} {
		if !regexp.MustCompile(re).MatchString(body) {
			t.Errorf("/metrics has no line matching %s", re)
		}
	}

	exported := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^(sds_[a-z0-9_]+)[{ ]`).FindAllStringSubmatch(body, -1) {
		exported[m[1]] = true
	}
	for _, path := range []string{dashboardPath, rulesPath} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		names := regexp.MustCompile(`\bsds_[a-z0-9_]+\b`).FindAllString(string(b), -1)
		if len(names) == 0 {
			t.Errorf("%s names no sds_ metric", path)
		}
		for _, n := range names {
			if !exported[n] {
				t.Errorf("%s uses %s, which the running server does not export", path, n)
			}
		}
	}
}

// TestAlertRules runs promtool check rules and promtool test rules on the
// shipped rules: every alert has a fixture that fires it and one that does
// not (deploy/prometheus/sds-server.rules.test.yml).
func TestAlertRules(t *testing.T) {
	promtool := tool(t, "SDS_PROMTOOL_BIN", ".tools/bin/promtool")
	for _, args := range [][]string{{"check", "rules", rulesPath}, {"test", "rules", rulesTestPath}} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// Every alert of the rules file is tested.
	rules, err := os.ReadFile(rulesPath)
	if err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile(rulesTestPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^\s+- alert: (\S+)$`).FindAllStringSubmatch(string(rules), -1) {
		if n := strings.Count(string(tests), "alertname: "+m[1]+"\n"); n < 2 {
			t.Errorf("alert %s has %d evaluations in %s, want one that fires and one that does not", m[1], n, rulesTestPath)
		}
	}
}
