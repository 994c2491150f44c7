package e2e

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/internal/stepcainit"
)

// TestStepCARevocation revokes a node with a real step-ca process as the
// CA: sds-server revokes its certificates at step-ca, publishes step-ca's
// own CRL in ROOTCA, and the backend refuses the node's new connection at
// the TLS handshake, while the other frontend is never refused. step-ca's
// CRL names its distribution point; the shipped template puts that URL,
// learnt by sds-server at start, in every certificate.
func TestStepCARevocation(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	ca := startStepCAWith(t, tool(t, "SDS_STEPCA_BIN", ".tools/bin/step-ca"), stepcainit.Options{})
	srv := startServer(t, bin, "--config", ca.sdsConfig(t), "--crl-period", "20s")
	eventually(t, 10*time.Second, "step-ca's CRL published", func() error {
		if !strings.Contains(srv.out.String(), "the CA's revocation list published") {
			return fmt.Errorf("no CRL published yet:\n%s", tail(srv.out.String(), 10))
		}
		return nil
	})

	backend, fe1, fe2 := twoFrontends(t, srv, envoyBin)
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	verifyFails := func() int { return verifyFailures(backend) }
	before := verifyFails()
	id1, _ := nodeByClaim(t, srv, "frontend-1")
	srv.cli(t, "node", "revoke", id1, "--reason", "e2e: key compromised", "--keep-token")
	if out := srv.out.String(); strings.Contains(out, "the CA could not revoke") {
		t.Errorf("step-ca did not revoke a certificate:\n%s", tail(out, 20))
	}

	eventually(t, 10*time.Second, "frontend-1's new connection refused at the handshake", func() error {
		code, body, err := call(fresh, fe1, "fresh", "GET", "/fresh")
		if err == nil && code == 200 {
			return fmt.Errorf("frontend-1 still reaches backend on a new connection (200 %q)", body)
		}
		if verifyFails() <= before {
			return fmt.Errorf("got %d %v but the backend counted no certificate verification failure", code, err)
		}
		return nil
	})
	for i := range 5 {
		if code, _, err := call(fresh, fe2, "backend", "GET", "/after"); err != nil || code != 200 {
			t.Errorf("frontend-2 request %d after the revocation: %d %v", i, code, err)
		}
	}
}
