package main

import (
	"encoding/base64"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer/local"
)

var caFiles = []string{local.RootCertFile, local.RootKeyFile, local.IntermediateCertFile, local.IntermediateKeyFile}

// serveOnce starts serve on dataDir, checks it serves, stops it and returns
// the CA files it left.
func serveOnce(t *testing.T, dataDir string) map[string]string {
	t.Helper()
	s := startServe(t, dataDir)
	if code := s.stop(t); code != 0 {
		t.Fatalf("serve exited with %d after cancellation, want 0\nstderr: %s", code, s.stderr)
	}
	ca := readFiles(t, filepath.Join(dataDir, "ca"))
	for _, f := range caFiles {
		if ca[f] == "" {
			t.Fatalf("serve left no %s in %s (got %v)", f, filepath.Join(dataDir, "ca"), ca)
		}
	}
	return ca
}

// serveFails runs serve on dataDir and checks it fails with exit 1 and one
// stderr line mentioning every string in want.
func serveFails(t *testing.T, dataDir string, want ...string) result {
	t.Helper()
	r := runCLI(t, "serve", "--data-dir", dataDir, "--listen-addr", "127.0.0.1:0", "--metrics-addr", "")
	checkOneLineError(t, r)
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr %q does not mention %q", r.stderr, w)
		}
	}
	if strings.Contains(r.stdout, "sds:") {
		t.Errorf("serve reported serving before failing: %q", r.stdout)
	}
	return r
}

func TestServeCorruptStateFile(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	state := filepath.Join(dataDir, "state.db")
	garbage := strings.Repeat("this is not a bbolt database\n", 512)
	writeFile(t, state, garbage)

	serveFails(t, dataDir, state)

	if _, err := os.Lstat(filepath.Join(dataDir, "ca")); !os.IsNotExist(err) {
		t.Errorf("CA dir exists after a failed start (stat: %v): serve must not create a CA it cannot use", err)
	}
	if _, err := os.Lstat(filepath.Join(dataDir, "admin.sock")); !os.IsNotExist(err) {
		t.Errorf("admin socket exists after a failed start (stat: %v)", err)
	}
	if got := readFiles(t, dataDir); !reflect.DeepEqual(got, map[string]string{"state.db": garbage}) {
		t.Errorf("data dir changed by a failed start: files %v", keys(got))
	}
}

func TestServePartialCADir(t *testing.T) {
	clearSDSEnv(t)
	good := serveOnce(t, shortTempDir(t))

	tests := []struct {
		name    string
		present []string
	}{
		{"root only", []string{local.RootCertFile, local.RootKeyFile}},
		{"intermediate key missing", []string{local.RootCertFile, local.RootKeyFile, local.IntermediateCertFile}},
		{"root key missing", []string{local.RootCertFile, local.IntermediateCertFile, local.IntermediateKeyFile}},
		{"intermediate only", []string{local.IntermediateCertFile, local.IntermediateKeyFile}},
		{"root certificate alone", []string{local.RootCertFile}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearSDSEnv(t)
			dataDir := shortTempDir(t)
			caDir := filepath.Join(dataDir, "ca")
			if err := os.Mkdir(caDir, 0o700); err != nil {
				t.Fatal(err)
			}
			want := map[string]string{}
			for _, f := range tt.present {
				writeFile(t, filepath.Join(caDir, f), good[f])
				want[f] = good[f]
			}
			var missing []string
			for _, f := range caFiles {
				if _, ok := want[f]; !ok {
					missing = append(missing, filepath.Join(caDir, f))
				}
			}

			serveFails(t, dataDir, missing...)

			if got := readFiles(t, caDir); !reflect.DeepEqual(got, want) {
				t.Errorf("CA dir changed by a failed start: has %v, want exactly %v with the same bytes", keys(got), tt.present)
			}
		})
	}
}

func TestServeDataDirNotADirectory(t *testing.T) {
	clearSDSEnv(t)
	dir := shortTempDir(t)
	file := writeFile(t, filepath.Join(dir, "data"), "not a directory\n")
	tests := []struct {
		name, dataDir string
	}{
		{"data dir is a file", file},
		{"data dir below a file", filepath.Join(file, "sub")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			serveFails(t, tt.dataDir, tt.dataDir)
			if b, err := os.ReadFile(file); err != nil || string(b) != "not a directory\n" {
				t.Errorf("file changed: %q, %v", b, err)
			}
		})
	}
}

var sdsAddrRE = regexp.MustCompile(`(?m)^\s*sds:\s+(127\.0\.0\.1:\d+)\s`)

func TestServeStartsAndRestartsWithTheSameCA(t *testing.T) {
	clearSDSEnv(t)
	parent := shortTempDir(t)
	dataDir := filepath.Join(parent, "data") // serve creates it
	sock := filepath.Join(dataDir, "admin.sock")

	s := startServe(t, dataDir)
	out := s.stdout.String()
	m := sdsAddrRE.FindStringSubmatch(out)
	if m == nil || strings.HasSuffix(m[1], ":0") {
		t.Fatalf("stdout does not give the bound SDS address on an 'sds:' line:\n%s", out)
	}
	addr := m[1]
	if !strings.Contains(out, sock) {
		t.Errorf("stdout does not give the admin socket %s:\n%s", sock, out)
	}
	// The printed address is the live listener.
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial printed address %s: %v", addr, err)
	}
	c.Close()
	if fi, err := os.Stat(dataDir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir: %v, %v; want a 0700 directory", fi.Mode(), err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("admin socket: %v, %v; want a 0600 socket", fi.Mode(), err)
	}

	// A second server on the same data dir is refused, and the first one
	// keeps serving.
	r := serveFails(t, dataDir, filepath.Join(dataDir, "state.db"))
	if !strings.Contains(r.stderr, "another sds-server") {
		t.Errorf("second serve on a busy data dir: %q does not say another server runs", r.stderr)
	}

	// The client commands reach it through the admin socket.
	cr := runCLI(t, "token", "create", "--service", "web", "--uses", "1", "--data-dir", dataDir)
	if cr.code != 0 {
		t.Fatalf("token create: exit %d\nstderr: %s", cr.code, cr.stderr)
	}
	tokText := strings.TrimSuffix(cr.stdout, "\n")
	tok, err := bootstrap.Parse(tokText)
	if err != nil || strings.Contains(tokText, "\n") {
		t.Fatalf("token create stdout %q is not the token alone: %v", cr.stdout, err)
	}
	if strings.Contains(cr.stderr, tok.Secret) || !strings.Contains(cr.stderr, tok.ID()) {
		t.Errorf("token create stderr %q: want the token ID and never the secret", cr.stderr)
	}
	// --uses defaults to 1; 0 asks for unlimited uses.
	for _, tc := range []struct {
		args       []string
		said, list string
	}{
		{nil, "1 use(s)", "0/1"},
		{[]string{"--uses", "0"}, "unlimited uses", "0/unlimited"},
		{[]string{"--uses", "3"}, "3 use(s)", "0/3"},
	} {
		r := runCLI(t, append([]string{"token", "create", "--service", "api", "--data-dir", dataDir}, tc.args...)...)
		id, _, _ := strings.Cut(strings.TrimPrefix(r.stderr, "token "), " ")
		l := runCLI(t, "token", "list", "--data-dir", dataDir)
		line := ""
		for _, ln := range strings.Split(l.stdout, "\n") {
			if strings.HasPrefix(ln, id+" ") {
				line = ln
			}
		}
		if r.code != 0 || !strings.Contains(r.stderr, tc.said) || !strings.Contains(line, " "+tc.list+" ") {
			t.Errorf("token create %v: exit %d, stderr %q, listed as %q; want %q and uses %q", tc.args, r.code, r.stderr, line, tc.said, tc.list)
		}
	}
	lr := runCLI(t, "token", "list", "--data-dir", dataDir)
	if lr.code != 0 || !strings.Contains(lr.stdout, tok.ID()) || !strings.Contains(lr.stdout, "default/web") || strings.Contains(lr.stdout, tok.Secret) {
		t.Errorf("token list: exit %d, stdout %q; want the token's ID and identity, not its secret\nstderr: %s", lr.code, lr.stdout, lr.stderr)
	}
	// bootstrap envoy fetches the root from the live server, pinned by the token.
	br := runCLI(t, "bootstrap", "envoy", "--server", addr, "--token", tokText, "--service-port", "8080", "--listen", "15001", "--timeout", "5s")
	if br.code != 0 {
		t.Errorf("bootstrap envoy against the running server: exit %d\nstderr: %s", br.code, br.stderr)
	}
	rootPEM, err := os.ReadFile(filepath.Join(dataDir, "ca", local.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(br.stdout, base64.StdEncoding.EncodeToString(rootPEM)) || !strings.Contains(br.stdout, addr[strings.LastIndex(addr, ":")+1:]) {
		t.Errorf("bootstrap does not carry the server's root certificate and port:\n%s", br.stdout)
	}

	if code := s.stop(t); code != 0 {
		t.Fatalf("serve exited with %d after cancellation, want 0\nstderr: %s", code, s.stderr)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("admin socket left behind after a clean stop (stat: %v)", err)
	}
	first := readFiles(t, filepath.Join(dataDir, "ca"))

	// A restart on the same data dir loads the same CA and the same state.
	second := serveOnce(t, dataDir)
	if !reflect.DeepEqual(first, second) {
		t.Fatalf("CA files changed across a restart: before %v, after %v", keys(first), keys(second))
	}
	s2 := startServe(t, dataDir)
	lr = runCLI(t, "token", "list", "--data-dir", dataDir)
	if lr.code != 0 || !strings.Contains(lr.stdout, tok.ID()) {
		t.Errorf("token list after restart: exit %d, stdout %q; the token did not survive\nstderr: %s", lr.code, lr.stdout, lr.stderr)
	}
	if code := s2.stop(t); code != 0 {
		t.Fatalf("serve exited with %d after cancellation, want 0\nstderr: %s", code, s2.stderr)
	}
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
