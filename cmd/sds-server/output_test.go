package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"sigs.k8s.io/yaml"

	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/sds"
)

var sdsLineRE = regexp.MustCompile(`(?m)^\s+sds:\s+(\S+)`)

// connectNode opens an SDS stream to the server on dataDir as a sidecar
// claiming nodeID with token, takes its certificate and ACKs it; the
// returned function closes the stream (a sidecar going away).
func connectNode(t *testing.T, s *server, dataDir, token, nodeID string) (closeStream func()) {
	t.Helper()
	m := sdsLineRE.FindStringSubmatch(s.stdout.String())
	if m == nil {
		t.Fatalf("no sds address in serve's output:\n%s", s.stdout)
	}
	rootPEM, err := os.ReadFile(filepath.Join(dataDir, "ca", local.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(rootPEM)
	conn, err := grpc.NewClient(m[1], grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	closeStream = func() { cancel(); conn.Close() }
	t.Cleanup(closeStream)
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	st, err := secretservice.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatalf("open SDS stream: %v", err)
	}
	req := &discovery.DiscoveryRequest{Node: &core.Node{Id: nodeID}, TypeUrl: xdsres.SecretType, ResourceNames: []string{sds.SecretDefault}}
	if err := st.Send(req); err != nil {
		t.Fatalf("send: %v", err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatalf("receive the certificate: %v", err)
	}
	req.VersionInfo, req.ResponseNonce = resp.GetVersionInfo(), resp.GetNonce()
	if err := st.Send(req); err != nil {
		t.Fatalf("ACK: %v", err)
	}
	return closeStream
}

// decodeStrict decodes JSON or YAML output into out, refusing fields out
// does not have.
func decodeStrict(t *testing.T, format, text string, out any) {
	t.Helper()
	var err error
	switch format {
	case outputJSON:
		dec := json.NewDecoder(strings.NewReader(text))
		dec.DisallowUnknownFields()
		err = dec.Decode(out)
	case outputYAML:
		if json.Valid([]byte(text)) {
			t.Fatalf("-o yaml printed JSON:\n%s", text)
		}
		err = yaml.UnmarshalStrict([]byte(text), out)
	}
	if err != nil {
		t.Fatalf("decode -o %s output: %v\n%s", format, err, text)
	}
}

// fieldsOf returns the top-level keys of a JSON or YAML object.
func fieldsOf(t *testing.T, format, text string) []string {
	t.Helper()
	b := []byte(text)
	if format == outputYAML {
		var err error
		if b, err = yaml.YAMLToJSON(b); err != nil {
			t.Fatal(err)
		}
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("not an object: %v\n%s", err, text)
	}
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// firstOf returns the first element of the list under key, as JSON.
func firstOf(t *testing.T, format, text, key string) string {
	t.Helper()
	b := []byte(text)
	if format == outputYAML {
		var err error
		if b, err = yaml.YAMLToJSON(b); err != nil {
			t.Fatal(err)
		}
	}
	var m map[string][]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil || len(m[key]) == 0 {
		t.Fatalf("no %s list: %v\n%s", key, err, text)
	}
	return string(m[key][0])
}

func hasAll(got []string, want ...string) bool {
	for _, w := range want {
		if !slices.Contains(got, w) {
			return false
		}
	}
	return true
}

// TestOutputFormats runs every list, show and status command with -o json
// and -o yaml against a running server with one connected node and an
// invalid policy file, decodes each output strictly into the admin API's
// types and checks the documented field names and values; then the node
// goes away and shows disconnected with its last seen time.
func TestOutputFormats(t *testing.T) {
	clearSDSEnv(t)
	dataDir := filepath.Join(shortTempDir(t), "data")
	policyDir := filepath.Join(shortTempDir(t), "policies")
	if err := os.MkdirAll(filepath.Join(policyDir, "default"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(policyDir, "default", "db.json"), []byte(`[{"permission": {"method": "GET"}, "allow": ["web"]}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServe(t, dataDir, "--policy-dir", policyDir)
	dd := []string{"--data-dir", dataDir}
	cr := runCLI(t, append([]string{"token", "create", "--service", "web", "--uses", "0"}, dd...)...)
	if cr.code != 0 {
		t.Fatalf("token create: %d %s", cr.code, cr.stderr)
	}
	token := strings.TrimSpace(cr.stdout)
	closeStream := connectNode(t, s, dataDir, token, "web-1")

	var nodeID string
	for _, format := range []string{outputJSON, outputYAML} {
		t.Run(format, func(t *testing.T) {
			// token list
			r := runCLI(t, append([]string{"token", "list", "-o", format}, dd...)...)
			var tl sds.TokenList
			if r.code != 0 {
				t.Fatalf("token list: %d %s", r.code, r.stderr)
			}
			decodeStrict(t, format, r.stdout, &tl)
			if len(tl.Tokens) != 1 || tl.Tokens[0].Service != "web" || tl.Tokens[0].Uses != 1 || tl.Tokens[0].Status != "active" {
				t.Errorf("token list: %+v, want the one web token, used once", tl.Tokens)
			}
			if got := fieldsOf(t, format, firstOf(t, format, r.stdout, "tokens")); !hasAll(got, "id", "service", "env", "status", "created_at", "expires_at", "max_uses", "uses", "last_used_at") {
				t.Errorf("token fields %v", got)
			}
			if strings.Contains(r.stdout, token[len(token)-31:]) {
				t.Error("token list shows the token's secret")
			}

			// node list
			r = runCLI(t, append([]string{"node", "list", "-o", format}, dd...)...)
			if r.code != 0 {
				t.Fatalf("node list: %d %s", r.code, r.stderr)
			}
			var nl sds.NodeList
			decodeStrict(t, format, r.stdout, &nl)
			if len(nl.Nodes) != 1 {
				t.Fatalf("node list: %d nodes, want 1", len(nl.Nodes))
			}
			n := nl.Nodes[0]
			if n.ClaimedID != "web-1" || n.State != sds.NodeConnected || n.Mode != sds.NodeModeDirect || n.Streams != 1 || n.LastSeen.IsZero() || n.IssuedSerial == "" {
				t.Errorf("node list: %+v, want web-1 connected, direct, one stream, seen, with a certificate", n)
			}
			nodeID = n.ID
			if got := fieldsOf(t, format, firstOf(t, format, r.stdout, "nodes")); !hasAll(got, "id", "service", "env", "token_id", "claimed_node_id",
				"status", "state", "mode", "streams", "first_seen", "last_seen", "issued_serial", "issued_not_after", "connections") {
				t.Errorf("node fields %v", got)
			}

			// node show
			r = runCLI(t, append([]string{"node", "show", nodeID, "-o", format}, dd...)...)
			if r.code != 0 {
				t.Fatalf("node show: %d %s", r.code, r.stderr)
			}
			var ni sds.NodeInfo
			decodeStrict(t, format, r.stdout, &ni)
			if ni.ID != nodeID || ni.State != sds.NodeConnected || len(ni.Connections) != 1 {
				t.Errorf("node show: %+v", ni)
			}

			// acl status: the invalid file makes it exit 1 after the report.
			r = runCLI(t, append([]string{"acl", "status", "-o", format}, dd...)...)
			checkOneLineError(t, result{r.code, "", r.stderr})
			if !strings.Contains(r.stderr, "1 invalid ACL file(s): default/db.json") {
				t.Errorf("acl status stderr %q does not name the invalid file", r.stderr)
			}
			var pr sds.PolicyReport
			decodeStrict(t, format, r.stdout, &pr)
			if pr.Dir != policyDir || pr.DefaultPolicy != "deny" || len(pr.Services) != 1 || pr.Services[0].File != "default/db.json" || pr.Services[0].Error == "" {
				t.Errorf("acl status: %+v", pr)
			}

			// status
			r = runCLI(t, append([]string{"status", "-o", format}, dd...)...)
			if r.code != 0 {
				t.Fatalf("status: %d %s", r.code, r.stderr)
			}
			var st sds.StatusReport
			decodeStrict(t, format, r.stdout, &st)
			if !st.Ready || st.Nodes.Connected != 1 || st.Nodes.Total != 1 || st.Policy.Invalid != 1 || len(st.CA.Roots) != 1 || st.CA.Intermediate == nil || st.CA.CRL == nil || st.Rotation != nil {
				t.Errorf("status: %+v", st)
			}
			if got := fieldsOf(t, format, r.stdout); !slices.Equal(got, []string{"ca", "nodes", "policy", "ready", "reasons", "rotation", "time", "trust_domain", "warnings"}) {
				t.Errorf("status fields %v", got)
			}
		})
	}

	// The default stays a table.
	r := runCLI(t, append([]string{"node", "list"}, dd...)...)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "ID ") || !strings.Contains(r.stdout, "NODE.ID") || !regexp.MustCompile(`(?m)^`+nodeID+`\s+default/web\s+web-1\s+direct\s+connected\s+1\s`).MatchString(r.stdout) {
		t.Errorf("node list table: %d\n%s", r.code, r.stdout)
	}
	r = runCLI(t, append([]string{"status"}, dd...)...)
	if r.code != 0 || !strings.Contains(r.stdout, "READY:") || !strings.Contains(r.stdout, "1 connected") || !strings.Contains(r.stdout, "ROTATION:") {
		t.Errorf("status table: %d\n%s", r.code, r.stdout)
	}
	r = runCLI(t, append([]string{"node", "show", nodeID, "-o", "table"}, dd...)...)
	if r.code != 0 || !regexp.MustCompile(`(?m)^STATUS:\s+connected$`).MatchString(r.stdout) {
		t.Errorf("node show -o table: %d\n%s", r.code, r.stdout)
	}

	// The sidecar goes away: disconnected, last seen kept.
	closeStream()
	var n sds.NodeInfo
	deadline := time.Now().Add(15 * time.Second)
	for {
		r := runCLI(t, append([]string{"node", "list", "-o", "json"}, dd...)...)
		var nl sds.NodeList
		decodeStrict(t, outputJSON, r.stdout, &nl)
		if n = nl.Nodes[0]; n.State == sds.NodeDisconnected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node still %q 15s after its stream closed", n.State)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n.LastSeen.IsZero() || time.Since(n.LastSeen) > time.Minute || n.Streams != 0 {
		t.Errorf("disconnected node: last seen %s, streams %d", n.LastSeen, n.Streams)
	}
}

// TestACLStatusExitCode: acl status exits 0 with only valid files, 1 naming
// an invalid or a stray file.
func TestACLStatusExitCode(t *testing.T) {
	clearSDSEnv(t)
	dataDir := filepath.Join(shortTempDir(t), "data")
	policyDir := shortTempDir(t)
	write := func(rel, content string) {
		t.Helper()
		p := filepath.Join(policyDir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("default/api.json", `[{"permission": {"method": "GET", "resource": "/users"}, "allow": ["web"]}]`)
	startServe(t, dataDir, "--policy-dir", policyDir)
	dd := []string{"--data-dir", dataDir}
	tests := []struct {
		name, file, content string
		code                int
		stderr              string
	}{
		{name: "valid", code: 0},
		{name: "stray", file: "notes.json", content: `[]`, code: 1, stderr: "1 stray file(s): notes.json"},
		{name: "invalid", file: "default/db.json", content: `[{"allow": ["web"]}]`, code: 1, stderr: "1 invalid ACL file(s): default/db.json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.file != "" {
				write(tt.file, tt.content)
				defer os.Remove(filepath.Join(policyDir, tt.file))
			}
			var r result
			deadline := time.Now().Add(10 * time.Second)
			for { // the server polls policy_dir
				r = runCLI(t, append([]string{"acl", "status"}, dd...)...)
				if r.code == tt.code && strings.Contains(r.stderr, tt.stderr) || time.Now().After(deadline) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if r.code != tt.code || !strings.Contains(r.stderr, tt.stderr) {
				t.Fatalf("acl status: exit %d, stderr %q; want %d and %q\nstdout: %s", r.code, r.stderr, tt.code, tt.stderr, r.stdout)
			}
			if tt.code == 1 {
				checkOneLineError(t, result{r.code, "", r.stderr})
			}
			if !strings.Contains(r.stdout, "default/api") {
				t.Errorf("acl status printed no report:\n%s", r.stdout)
			}
		})
	}
}

// TestOutputFlagErrors: an unknown -o value is a usage error pointing to
// the command's own --help, and nothing reaches the server (there is none).
func TestOutputFlagErrors(t *testing.T) {
	clearSDSEnv(t)
	dd := []string{"--data-dir", t.TempDir()}
	for _, args := range [][]string{
		{"token", "list"}, {"node", "list"}, {"node", "show", "n-1"}, {"acl", "status"}, {"status"},
	} {
		name := strings.Join(args, " ")
		t.Run(name, func(t *testing.T) {
			r := runCLI(t, append(append(args, "-o", "xml"), dd...)...)
			checkUsageError(t, r)
			if !strings.Contains(r.stderr, `unknown output format "xml"`) {
				t.Errorf("stderr %q does not name the bad format", r.stderr)
			}
			cmdPath := "sds-server " + strings.TrimSuffix(name, " n-1")
			if !strings.Contains(r.stderr, "Run '"+cmdPath+" --help'") {
				t.Errorf("stderr %q does not point to %s --help", r.stderr, cmdPath)
			}
		})
	}
}

// TestStatusWithoutServer: status exits 1 without a server, one line
// saying how to reach it.
func TestStatusWithoutServer(t *testing.T) {
	clearSDSEnv(t)
	r := runCLI(t, "status", "--data-dir", t.TempDir())
	checkOneLineError(t, r)
	if !strings.Contains(r.stderr, "sds-server serve") || r.stdout != "" {
		t.Errorf("status without a server: %q / %q", r.stderr, r.stdout)
	}
}

// fakeAdmin serves h on a Unix socket in a fresh directory and returns the
// socket's path.
func fakeAdmin(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(shortTempDir(t), "admin.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// TestStatusExitCode: status exits 0 when the server says ready and 1 when
// not, with the reasons on stderr and the report on stdout in every format.
func TestStatusExitCode(t *testing.T) {
	clearSDSEnv(t)
	tests := []struct {
		name   string
		report sds.StatusReport
		format string
		code   int
		stderr string
	}{
		{name: "ready", report: sds.StatusReport{Ready: true, TrustDomain: "mesh.local"}, format: "table", code: 0},
		{name: "ready json", report: sds.StatusReport{Ready: true, TrustDomain: "mesh.local"}, format: "json", code: 0},
		{name: "not ready", report: sds.StatusReport{Reasons: []string{"no trust bundle loaded"}}, format: "table", code: 1,
			stderr: "sds-server: not ready: no trust bundle loaded\n"},
		{name: "not ready json, two reasons", report: sds.StatusReport{Reasons: []string{"a", "b"}}, format: "json", code: 1,
			stderr: "sds-server: not ready: a; b\n"},
		{name: "not ready yaml", report: sds.StatusReport{Reasons: []string{"a"}}, format: "yaml", code: 1,
			stderr: "sds-server: not ready: a\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := fakeAdmin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodGet || r.URL.Path != "/v1/status" {
					http.Error(w, "unexpected request", http.StatusTeapot)
					return
				}
				w.Header().Set("Content-Type", "application/json")
				_ = json.NewEncoder(w).Encode(tt.report)
			}))
			r := runCLI(t, "status", "-o", tt.format, "--admin-socket", sock)
			if r.code != tt.code || r.stderr != tt.stderr {
				t.Fatalf("exit %d, stderr %q; want %d, %q", r.code, r.stderr, tt.code, tt.stderr)
			}
			switch tt.format {
			case "table":
				want := `(?m)^READY:\s+yes$`
				if !tt.report.Ready {
					want = `(?m)^READY:\s+no: ` + regexp.QuoteMeta(strings.Join(tt.report.Reasons, "; ")) + "$"
				}
				if !regexp.MustCompile(want).MatchString(r.stdout) {
					t.Errorf("table %q lacks %q", r.stdout, want)
				}
			default:
				var got sds.StatusReport
				decodeStrict(t, tt.format, r.stdout, &got)
				if got.Ready != tt.report.Ready || !slices.Equal(got.Reasons, tt.report.Reasons) {
					t.Errorf("printed %+v, want %+v", got, tt.report)
				}
			}
		})
	}
}

// TestAdminErrorMessage: an admin API error reaches the user as its JSON
// message, in one line, exit 1.
func TestAdminErrorMessage(t *testing.T) {
	clearSDSEnv(t)
	sock := fakeAdmin(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_ = json.NewEncoder(w).Encode(sds.ErrorResponse{Error: "node n-1: not found"})
	}))
	r := runCLI(t, "node", "show", "n-1", "--admin-socket", sock)
	checkOneLineError(t, r)
	if r.stderr != "sds-server: node n-1: not found\n" {
		t.Errorf("stderr %q", r.stderr)
	}
}
