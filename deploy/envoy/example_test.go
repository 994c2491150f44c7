package envoyconfig

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/meshid/sds-server/bootstrap"
)

var update = flag.Bool("update", false, "rewrite the generated part of sidecar-example.yaml")

const (
	exampleFile = "sidecar-example.yaml"
	// marker ends the hand-written header of the example; what follows is
	// the generator's output, unedited.
	marker = "# ---- everything below is the generator's output, unedited ----\n"
	// exampleSecret is the secret of the example's token: 31 base36
	// characters, obviously not random. It admits nothing anywhere.
	exampleSecret = "0000000000000000000000000000000"
)

// exampleOptions are the fixed inputs of the example: the web sidecar of
// docker-compose.yml (upstreams emoji and voting), whose token pins
// testdata/example-root.pem (a throwaway root whose key was discarded).
func exampleOptions(t *testing.T) bootstrap.EnvoyOptions {
	t.Helper()
	rootPEM, err := os.ReadFile(filepath.Join("testdata", "example-root.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(rootPEM)
	if blk == nil {
		t.Fatal("testdata/example-root.pem: no PEM block")
	}
	root, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	tok := bootstrap.Token{Digest: bootstrap.RootDigest(root), Secret: exampleSecret}
	if _, err := bootstrap.Parse(tok.String()); err != nil {
		t.Fatalf("example token: %v", err)
	}
	return bootstrap.EnvoyOptions{
		NodeID: "web-1", Cluster: "sidecar",
		Server: "sds-server:8443", Token: tok.String(), RootPEM: rootPEM,
		TrustDomain: "mesh.local", Env: "default",
		ListenAddr: "0.0.0.0:15443", ServicePort: 8080,
		Upstreams: []bootstrap.Upstream{
			{Name: "emoji", Env: "default", Service: "emoji", Host: "emoji-svc", Port: 15443, LocalPort: 15001},
			{Name: "voting", Env: "default", Service: "voting", Host: "voting-svc", Port: 15443, LocalPort: 15002},
		},
		AdminAddr: "127.0.0.1:15000",
	}
}

// maskRE matches what differs between two renders of the same sidecar
// against different servers: the root CA (inline_bytes) and the token.
var maskRE = regexp.MustCompile(`(?m)^(\s*(?:inline_bytes|value): ).*(SDSTKN|[A-Za-z0-9+/=]{40,}).*$|^# It holds a bootstrap token .*$`)

func mask(b []byte) string { return maskRE.ReplaceAllString(string(b), "${1}<masked>") }

// TestExampleIsGenerated regenerates the example from its fixed inputs and
// requires the same content: the root and token lines are compared masked,
// so that a root or token format change shows as a diff of the rest only.
func TestExampleIsGenerated(t *testing.T) {
	want, err := bootstrap.RenderEnvoy(exampleOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(exampleFile)
	if err != nil {
		t.Fatal(err)
	}
	header, got, ok := bytes.Cut(file, []byte(marker))
	if !ok {
		t.Fatalf("%s: no marker line %q", exampleFile, strings.TrimSpace(marker))
	}
	if *update {
		out := append(append(append([]byte{}, header...), marker...), want...)
		if err := os.WriteFile(exampleFile, out, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("rewrote %s", exampleFile)
		return
	}
	if mask(got) != mask(want) {
		t.Errorf("%s differs from what the generator writes now; run `go test ./deploy/envoy -run Example -update` and review the header comments.\n%s",
			exampleFile, firstDiff(mask(got), mask(want)))
	}
	if mask(got) == mask(want) && !bytes.Equal(got, want) {
		t.Errorf("%s: root or token lines differ from the fixed inputs; run with -update", exampleFile)
	}
	for _, l := range strings.Split(string(header), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			t.Errorf("%s: header line %q is not a comment", exampleFile, l)
		}
	}
}

func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return "line " + strconv.Itoa(i+1) + ":\n  file:      " + x + "\n  generator: " + y
		}
	}
	return ""
}

// TestExampleValidates runs `envoy --mode validate` on the example as
// shipped (header comments included).
func TestExampleValidates(t *testing.T) {
	envoy := os.Getenv("SDS_ENVOY_BIN")
	if envoy == "" {
		envoy, _ = filepath.Abs(filepath.Join("..", "..", ".tools", "bin", "envoy"))
	}
	if _, err := os.Stat(envoy); err != nil {
		if os.Getenv("SDS_REQUIRE_E2E") == "1" {
			t.Fatalf("envoy not found at %s (run `make tools`)", envoy)
		}
		t.Skipf("envoy not found at %s; run `make tools`", envoy)
	}
	out, err := exec.Command(envoy, "--mode", "validate", "-c", exampleFile).CombinedOutput()
	if err != nil {
		t.Fatalf("envoy --mode validate %s: %v\n%s", exampleFile, err, out)
	}
}
