package sds

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"sigs.k8s.io/yaml"
)

// Files holding PromQL that operators load: they may only name metrics and
// labels the server exports.
const (
	dashboardFile = "../deploy/grafana/sds-server.json"
	rulesFile     = "../deploy/prometheus/sds-server.rules.yml"
)

var (
	metricRE  = regexp.MustCompile(`\bsds_[a-z0-9_]+\b`)
	matcherRE = regexp.MustCompile(`\b(sds_[a-z0-9_]+)\s*\{([^}]*)\}`)
	labelRE   = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	groupRE   = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
)

// targetLabels are added by Prometheus to every scraped series; le is the
// bucket label of histograms.
var targetLabels = map[string]bool{"job": true, "instance": true, "le": true}

// exported gathers the families a server with one connected node exports
// (every one then has a series), by name, with the label names they carry.
func exported(t *testing.T) map[string]map[string]bool {
	t.Helper()
	env := newTestEnv(t)
	env.prom.MustRegister(BuildInfo("test"))
	tok, _ := env.token(t, "web", 0, 0)
	env.fetch(t, sdsSotw, tok, "w1", SecretDefault)
	mfs, err := env.prom.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]map[string]bool{}
	for _, mf := range mfs {
		labels := map[string]bool{}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = true
			}
		}
		out[mf.GetName()] = labels
		if mf.GetType() == dto.MetricType_HISTOGRAM {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				out[mf.GetName()+suffix] = labels
			}
		}
	}
	return out
}

// checkExpr returns what in expr the server does not export: metric names,
// label names in selectors, and grouping labels no referenced metric has.
func checkExpr(expr string, have map[string]map[string]bool) []string {
	var bad []string
	names := metricRE.FindAllString(expr, -1)
	if len(names) == 0 {
		bad = append(bad, "no sds_ metric")
	}
	some := map[string]bool{}
	for _, n := range names {
		ls, ok := have[n]
		if !ok {
			bad = append(bad, "metric "+n)
		}
		for l := range ls {
			some[l] = true
		}
	}
	for _, m := range matcherRE.FindAllStringSubmatch(expr, -1) {
		for _, l := range labelRE.FindAllStringSubmatch(m[2], -1) {
			if !targetLabels[l[1]] && !have[m[1]][l[1]] {
				bad = append(bad, fmt.Sprintf("label %s of %s", l[1], m[1]))
			}
		}
	}
	for _, g := range groupRE.FindAllStringSubmatch(expr, -1) {
		for _, l := range strings.Split(g[1], ",") {
			if l = strings.TrimSpace(l); l != "" && !targetLabels[l] && !some[l] {
				bad = append(bad, "grouping label "+l)
			}
		}
	}
	return bad
}

// dashboardQueries returns every PromQL string of a Grafana dashboard: the
// panels' expr and the template variables' queries.
func dashboardQueries(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var out []string
	var walk func(any, string)
	walk = func(v any, key string) {
		switch v := v.(type) {
		case map[string]any:
			for k, c := range v {
				walk(c, k)
			}
		case []any:
			for _, c := range v {
				walk(c, key)
			}
		case string:
			if key == "expr" || key == "definition" {
				out = append(out, v)
			}
		}
	}
	walk(v, "")
	return out
}

// ruleQueries returns the expr of every rule of a Prometheus rules file.
func ruleQueries(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []struct {
				Alert string `json:"alert"`
				Expr  string `json:"expr"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil { // only expr is read
		t.Fatalf("%s: %v", path, err)
	}
	var out []string
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			out = append(out, r.Expr)
		}
	}
	return out
}

// TestDeployQueriesUseExportedMetrics: the Grafana dashboard and the alert
// rules name only metrics and labels the server exports, so neither can show
// "no data" or never fire because of a renamed or misspelt metric.
func TestDeployQueriesUseExportedMetrics(t *testing.T) {
	have := exported(t)
	for _, f := range []struct {
		path    string
		queries []string
		min     int
	}{
		{dashboardFile, dashboardQueries(t, dashboardFile), 20},
		{rulesFile, ruleQueries(t, rulesFile), 8},
	} {
		if len(f.queries) < f.min {
			t.Errorf("%s: %d queries found, want at least %d: is the file read right?", f.path, len(f.queries), f.min)
		}
		for _, q := range f.queries {
			if bad := checkExpr(q, have); len(bad) > 0 {
				t.Errorf("%s: %q uses what the server does not export: %s", f.path, q, strings.Join(bad, ", "))
			}
		}
	}
}

// TestCheckExpr: the checker catches unknown metrics and labels.
func TestCheckExpr(t *testing.T) {
	have := map[string]map[string]bool{"sds_a_total": {"reason": true}, "sds_b": {}}
	tests := []struct {
		expr string
		bad  int
	}{
		{`sum by (reason) (rate(sds_a_total{job=~"$job"}[5m]))`, 0},
		{`sds_b - time() < 600`, 0},
		{`sds_c_total`, 1},
		{`sds_a_totl + sds_b`, 1},
		{`sds_a_total{result="failure"}`, 1},
		{`sum by (limit) (sds_a_total)`, 1},
		{`time()`, 1},
	}
	for _, tt := range tests {
		if bad := checkExpr(tt.expr, have); len(bad) != tt.bad {
			t.Errorf("checkExpr(%q) = %v, want %d problems", tt.expr, bad, tt.bad)
		}
	}
}
