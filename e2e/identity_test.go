package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// app is a tiny HTTP service standing behind a sidecar. It records the
// x-forwarded-client-cert header of every request.
type app struct {
	name string
	port int
	mu   sync.Mutex
	xfcc []string
}

func startApp(t *testing.T, name string) *app {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &app{name: name, port: lis.Addr().(*net.TCPAddr).Port}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.xfcc = append(a.xfcc, r.Header.Get("X-Forwarded-Client-Cert"))
		a.mu.Unlock()
		fmt.Fprintf(w, "hello from %s %s\n", name, r.URL.Path)
	})}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { _ = srv.Close() })
	return a
}

func (a *app) lastXFCC() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.xfcc) == 0 {
		return ""
	}
	return a.xfcc[len(a.xfcc)-1]
}

// TestMeshIdentity is the first whole path: tokens, bootstraps checked by
// Envoy, two real sidecars, mTLS with the mesh identity, and refusal of a
// client without one.
func TestMeshIdentity(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	srv := startServer(t, bin)
	dir := t.TempDir()

	m := startMesh(t, srv, envoyBin)
	backendApp, beIn, feOut := m.backendApp, m.beIn, m.feOut
	tokFrontend := m.tokFrontend

	// frontend -> backend through the mesh.
	var body string
	eventually(t, 20*time.Second, "request through frontend's outbound listener", func() error {
		b, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/hello", feOut))
		body = b
		return err
	})
	if !strings.Contains(body, "hello from backend /hello") {
		t.Fatalf("body %q, want the backend app's answer", body)
	}
	wantURI := "URI=spiffe://mesh.local/ns/default/sa/frontend"
	if x := backendApp.lastXFCC(); !strings.Contains(x, wantURI) {
		t.Fatalf("backend saw x-forwarded-client-cert %q, want it to contain %q", x, wantURI)
	}

	// The backend sidecar refuses a TLS client without a mesh certificate,
	// and one whose certificate comes from another CA.
	t.Run("refuses non-mesh clients", func(t *testing.T) {
		for _, tc := range []struct {
			name  string
			certs []tls.Certificate
		}{
			{"no client certificate", nil},
			{"certificate from another CA", []tls.Certificate{foreignCert(t, "spiffe://mesh.local/ns/default/sa/frontend")}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				answer, err := tryRequest(fmt.Sprintf("127.0.0.1:%d", beIn), tc.certs)
				if answer != "" {
					t.Fatalf("backend sidecar answered %q to a client without a mesh certificate; want the handshake refused", answer)
				}
				// A TLS alert from the sidecar, not a closed port.
				if err == nil || !strings.Contains(err.Error(), "remote error: tls:") {
					t.Fatalf("want a TLS alert from the backend sidecar, got %v", err)
				}
			})
		}
	})

	// The certificate Envoy serves, read back with openssl.
	t.Run("served certificate", func(t *testing.T) {
		checkServedCertificate(t, srv, fmt.Sprintf("127.0.0.1:%d", beIn), "backend", "default")
	})

	// A token whose root does not match the server: bootstrap refuses and
	// writes nothing.
	t.Run("bootstrap refuses a foreign root", func(t *testing.T) {
		other := startServer(t, bin)
		out := filepath.Join(dir, "foreign.yaml")
		stdout, stderr, code := srv.cliResult("bootstrap", "envoy", "--server", other.addr, "--token", tokFrontend,
			"--service-port", "1", "--listen", "2", "-o", out)
		if code != 1 {
			t.Fatalf("exit %d, want 1; stderr %q", code, stderr)
		}
		if _, err := os.Stat(out); !os.IsNotExist(err) {
			t.Fatalf("%s was written despite the mismatch", out)
		}
		if stdout != "" || len(lines(stderr)) != 1 || !strings.Contains(stderr, "digest") {
			t.Fatalf("want one stderr line about the digest and no stdout; got stdout %q stderr %q", stdout, stderr)
		}
	})
}

// tryRequest opens TLS to addr with certs, sends a GET and returns what came
// back and the first error (with TLS 1.3 a refused client certificate shows
// up as an alert on the first read).
func tryRequest(addr string, certs []tls.Certificate) (string, error) {
	d := &net.Dialer{Timeout: 3 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{InsecureSkipVerify: true, Certificates: certs})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	_, werr := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	// Read even if the write failed: the peer's alert may already be queued.
	b, err := io.ReadAll(conn)
	if err == nil {
		err = werr
	}
	return string(b), err
}

// foreignCert makes a self-signed client certificate carrying uri.
func foreignCert(t *testing.T, uri string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(uri)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42), Subject: pkix.Name{CommonName: "intruder"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// checkServedCertificate reads the chain a sidecar serves with openssl
// s_client, shows it with openssl x509 and verifies it with openssl verify
// against the built-in CA's root.
func checkServedCertificate(t *testing.T, srv *server, addr, service, env string) {
	t.Helper()
	checkServedCertificateRoot(t, srv, addr, service, env, filepath.Join(srv.dataDir, "ca", "root.crt"))
}

// checkServedCertificateRoot is checkServedCertificate against the root in
// rootFile.
func checkServedCertificateRoot(t *testing.T, srv *server, addr, service, env, rootFile string) {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	dir := t.TempDir()
	cmd := exec.Command("openssl", "s_client", "-connect", addr, "-showcerts")
	cmd.Stdin = strings.NewReader("")
	raw, _ := cmd.CombinedOutput() // the handshake fails without a client cert; the chain is printed first
	var blocks []*pem.Block
	rest := raw
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		blocks = append(blocks, b)
	}
	if len(blocks) < 2 {
		t.Fatalf("openssl s_client showed %d certificates, want leaf + intermediate:\n%s", len(blocks), raw)
	}
	leaf, inter := filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "inter.pem")
	if err := os.WriteFile(leaf, pem.EncodeToMemory(blocks[0]), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inter, pem.EncodeToMemory(blocks[1]), 0o600); err != nil {
		t.Fatal(err)
	}
	text, err := exec.Command("openssl", "x509", "-in", leaf, "-noout", "-text").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl x509: %v\n%s", err, text)
	}
	nodes := srv.cli(t, "node", "list")
	var nodeID string
	for _, l := range lines(nodes) {
		if f := strings.Fields(l); len(f) > 1 && f[1] == env+"/"+service {
			nodeID = f[0]
		}
	}
	if nodeID == "" {
		t.Fatalf("no %s/%s node in `node list`:\n%s", env, service, nodes)
	}
	for _, want := range []string{
		"URI:spiffe://mesh.local/ns/" + env + "/sa/" + service,
		"O = " + env, "OU = " + service, "CN = " + nodeID,
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("served certificate lacks %q:\n%s", want, text)
		}
	}
	out, err := exec.Command("openssl", "verify", "-CAfile", rootFile, "-untrusted", inter, leaf).CombinedOutput()
	if err != nil || !strings.Contains(string(out), ": OK") {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
}

// mesh is a frontend and a backend sidecar, each in front of a test app;
// the frontend reaches the backend through its outbound listener feOut.
type mesh struct {
	tokFrontend, tokBackend string
	backendApp, frontendApp *app
	beIn, feIn, feOut       int
	backend, frontend       *envoy
}

// startMesh creates tokens, generates and validates both bootstraps (with
// extra bootstrap flags) and starts both sidecars.
func startMesh(t *testing.T, srv *server, envoyBin string, extra ...string) *mesh {
	t.Helper()
	dir := t.TempDir()
	m := &mesh{
		tokFrontend: strings.TrimSpace(srv.cli(t, "token", "create", "--service", "frontend")),
		tokBackend:  strings.TrimSpace(srv.cli(t, "token", "create", "--service", "backend")),
		backendApp:  startApp(t, "backend"),
		frontendApp: startApp(t, "frontend"),
		beIn:        freePort(t), feIn: freePort(t), feOut: freePort(t),
	}
	beAdmin, feAdmin := fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))
	beCfg, feCfg := filepath.Join(dir, "backend.yaml"), filepath.Join(dir, "frontend.yaml")
	srv.cli(t, append([]string{"bootstrap", "envoy", "--server", srv.addr, "--token", m.tokBackend,
		"--service-port", fmt.Sprint(m.backendApp.port), "--listen", fmt.Sprintf("127.0.0.1:%d", m.beIn),
		"--admin", beAdmin, "--node-id", "backend-1", "-o", beCfg}, extra...)...)
	srv.cli(t, append([]string{"bootstrap", "envoy", "--server", srv.addr, "--token", m.tokFrontend,
		"--service-port", fmt.Sprint(m.frontendApp.port), "--listen", fmt.Sprintf("127.0.0.1:%d", m.feIn),
		"--admin", feAdmin, "--node-id", "frontend-1",
		"--upstream", fmt.Sprintf("backend=backend@127.0.0.1:%d,%d", m.beIn, m.feOut), "-o", feCfg}, extra...)...)
	for _, cfg := range []string{beCfg, feCfg} {
		fi, err := os.Stat(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600 (it holds the token)", cfg, fi.Mode().Perm())
		}
		out, err := exec.Command(envoyBin, "--mode", "validate", "-c", cfg).CombinedOutput()
		if err != nil {
			t.Fatalf("envoy --mode validate %s: %v\n%s", cfg, err, tail(string(out), 20))
		}
	}
	m.backend = startEnvoy(t, envoyBin, "backend", beCfg, beAdmin)
	m.frontend = startEnvoy(t, envoyBin, "frontend", feCfg, feAdmin)
	return m
}
