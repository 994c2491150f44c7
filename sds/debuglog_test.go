package sds

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestDebugLogs: at debug, a stream's life (open, bind, initial request,
// push, ACK, close) and a failed TLS handshake each leave a line with the
// stable keys; at info, none of them is written.
func TestDebugLogs(t *testing.T) {
	for _, v := range []variant{sdsSotw, sdsDelta} {
		for _, info := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/info=%v", v.name, info), func(t *testing.T) {
				env := newTestEnvWith(t, envOptions{logInfo: info})
				tok, rec := env.token(t, "web", 0, 0)
				reply, s := env.fetch(t, v, tok, "w1", SecretDefault)
				nodeID := env.nodeFor(t, rec.ID, "w1").ID
				serial := fmt.Sprintf("%x", leaf(t, reply.secrets[SecretDefault]).SerialNumber)
				send(t, s, xdsReq{node: "w1", names: []string{SecretDefault}, version: reply.version, nonce: reply.nonce})
				if !eventually(5*time.Second, func() bool { return info || strings.Contains(env.logs.String(), "kind=ack") }) {
					t.Fatalf("no ACK logged within 5s:\n%s", env.logs)
				}
				s.close()
				if !eventually(5*time.Second, func() bool { return len(env.srv.connectedNodes()) == 0 }) {
					t.Fatal("stream still open 5s after it was closed")
				}
				// A client that does not trust the server's certificate.
				c, err := tls.Dial("tcp", env.addr, &tls.Config{RootCAs: x509.NewCertPool(), ServerName: "127.0.0.1", NextProtos: []string{"h2"}})
				if err == nil {
					c.Close()
					t.Fatal("TLS handshake with an untrusted certificate succeeded")
				}
				tlsLine := []string{"level=DEBUG", `msg="tls handshake failed"`, "peer=127.0.0.1:", "error="}
				if !info && !eventually(5*time.Second, func() bool { return countLines(env.logs.String(), tlsLine...) > 0 }) {
					t.Errorf("no TLS handshake failure logged within 5s:\n%s", env.logs)
				}

				// A SotW push carries the response's version; a delta push
				// each resource's, the certificate serial for a certificate.
				protocol, version := "sotw", "version="+reply.version
				if v.delta {
					protocol, version = "delta", SecretDefault+"="+serial
				}
				peer := "peer=127.0.0.1:"
				want := [][]string{
					{`msg="stream opened"`, "stream_id=", "xds_type=sds", "protocol=" + protocol, peer, "token_id="},
					{`msg="stream bound to node"`, "node_id=" + nodeID, "claimed_node_id=w1", "service=web", "protocol=" + protocol, peer},
					{`msg="xds request"`, "node_id=", "type_url=type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "names=1", "kind=initial"},
					{`msg="xds push"`, "node_id=" + nodeID, "type_url=type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", version, "nonce=" + reply.nonce},
					{`msg="xds request"`, "node_id=" + nodeID, "nonce=" + reply.nonce, "kind=ack"},
					{`msg="stream closed"`, "node_id=" + nodeID, "xds_type=sds", "protocol=" + protocol, peer},
				}
				logs := env.logs.String()
				for _, w := range want {
					if n := countLines(logs, append([]string{"level=DEBUG"}, w...)...); info && n != 0 || !info && n == 0 {
						t.Errorf("%d lines with %q at info=%v", n, w, info)
					}
				}
				if info && strings.Contains(logs, "level=DEBUG") {
					t.Errorf("debug lines at info:\n%s", logs)
				}
				if t.Failed() {
					t.Logf("log:\n%s", logs)
				}
			})
		}
	}
}
