package sds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/bootstrap"
)

// otherRoot returns a self-signed CA certificate the server does not trust.
func otherRoot(t *testing.T) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(42),
		Subject:               pkix.Name{CommonName: "another mesh root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func secretOf(t *testing.T, text string) string {
	t.Helper()
	tok, err := bootstrap.Parse(text)
	if err != nil {
		t.Fatalf("parse token: %v", err)
	}
	return tok.Secret
}

// TestStreamRefused checks every way a stream credential can be bad: the
// right gRPC code and message, the metric, one log line without the secret,
// and that the server keeps serving valid streams afterwards.
func TestStreamRefused(t *testing.T) {
	env := newTestEnv(t)
	ctx := context.Background()
	validToken, _ := env.token(t, "frontend", 0, 0)

	type credential struct {
		auth   string // authorization metadata value; empty sends none
		secret string // the secret part that must never be logged
		node   string // claimed node.id of the refused stream
	}
	tests := []struct {
		name   string
		setup  func(t *testing.T) credential
		code   codes.Code
		reason string
		word   string                           // distinctive word of the status message
		check  func(t *testing.T, c credential) // extra checks after the refusal
	}{
		{
			name:   "no authorization metadata",
			setup:  func(t *testing.T) credential { return credential{node: "n-missing"} },
			code:   codes.Unauthenticated,
			reason: bootstrap.ReasonMissing,
			word:   "no bootstrap token",
		},
		{
			name: "malformed bearer token",
			setup: func(t *testing.T) credential {
				return credential{auth: "Bearer garbage", secret: "garbage", node: "n-malformed"}
			},
			code:   codes.Unauthenticated,
			reason: bootstrap.ReasonMalformed,
			word:   "malformed",
		},
		{
			name: "well-formed token with an unknown secret",
			setup: func(t *testing.T) credential {
				tok, err := bootstrap.New(env.ca.Root())
				if err != nil {
					t.Fatal(err)
				}
				return credential{auth: bearer(tok.String()), secret: tok.Secret, node: "n-unknown"}
			},
			code:   codes.Unauthenticated,
			reason: bootstrap.ReasonUnknown,
			word:   "unknown bootstrap token",
		},
		{
			name: "token pinning another root",
			setup: func(t *testing.T) credential {
				// A registered secret under another root's digest: only the
				// root check can tell it apart from a valid token.
				text, _ := env.token(t, "frontend", 0, 0)
				tok, err := bootstrap.Parse(text)
				if err != nil {
					t.Fatal(err)
				}
				other, err := bootstrap.New(otherRoot(t))
				if err != nil {
					t.Fatal(err)
				}
				tok.Digest = other.Digest
				return credential{auth: bearer(tok.String()), secret: tok.Secret, node: "n-wrong-root"}
			},
			code:   codes.Unauthenticated,
			reason: bootstrap.ReasonWrongRoot,
			word:   "does not trust",
		},
		{
			name: "another root's own token",
			setup: func(t *testing.T) credential {
				tok, err := bootstrap.New(otherRoot(t))
				if err != nil {
					t.Fatal(err)
				}
				return credential{auth: bearer(tok.String()), secret: tok.Secret, node: "n-other-root"}
			},
			code:   codes.Unauthenticated,
			reason: bootstrap.ReasonWrongRoot,
			word:   "does not trust",
		},
		{
			name: "revoked token",
			setup: func(t *testing.T) credential {
				text, rec := env.token(t, "frontend", 0, 0)
				if _, err := env.reg.Revoke(ctx, rec.ID); err != nil {
					t.Fatal(err)
				}
				return credential{auth: bearer(text), secret: secretOf(t, text), node: "n-revoked"}
			},
			code:   codes.PermissionDenied,
			reason: bootstrap.ReasonRevoked,
			word:   "revoked",
		},
		{
			name: "expired token, new node",
			setup: func(t *testing.T) credential {
				text, _ := env.token(t, "frontend", time.Minute, 0)
				env.clock.Advance(2 * time.Minute)
				return credential{auth: bearer(text), secret: secretOf(t, text), node: "n-expired"}
			},
			code:   codes.PermissionDenied,
			reason: bootstrap.ReasonExpired,
			word:   "expired",
		},
		{
			name: "token past its use limit",
			setup: func(t *testing.T) credential {
				text, rec := env.token(t, "frontend", 0, 1)
				r, _ := env.fetch(t, sdsSotw, text, "first-node", SecretDefault)
				if !sameNames(r.names, []string{SecretDefault}) {
					t.Fatalf("first node of a one-use token got %v", r.names)
				}
				if got := mustGetToken(t, env, rec.ID).Uses; got != 1 {
					t.Fatalf("after the first node, Uses = %d, want 1", got)
				}
				return credential{auth: bearer(text), secret: secretOf(t, text), node: "second-node"}
			},
			code:   codes.PermissionDenied,
			reason: bootstrap.ReasonExhausted,
			word:   "allowed nodes",
			check: func(t *testing.T, c credential) {
				tok, _ := bootstrap.Parse(strings.TrimPrefix(c.auth, "Bearer "))
				if got := mustGetToken(t, env, tok.ID()).Uses; got != 1 {
					t.Errorf("after the refusal, Uses = %d, want 1", got)
				}
			},
		},
		{
			name: "valid token with a 257-character node.id",
			setup: func(t *testing.T) credential {
				text, _ := env.token(t, "frontend", 0, 0)
				return credential{auth: bearer(text), secret: secretOf(t, text), node: strings.Repeat("n", 257)}
			},
			code:   codes.InvalidArgument,
			reason: "bad_node",
			word:   "node.id",
		},
		{
			name: "valid token without node.id",
			setup: func(t *testing.T) credential {
				text, _ := env.token(t, "frontend", 0, 0)
				return credential{auth: bearer(text), secret: secretOf(t, text), node: ""}
			},
			code:   codes.InvalidArgument,
			reason: "bad_node",
			word:   "node.id",
		},
	}

	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.setup(t)
			counter := env.metrics.authFailures.WithLabelValues(tc.reason)
			before := metricValue(t, counter)
			logStart := len(env.logs.String())

			s := env.open(t, sdsSotw, c.auth)
			send(t, s, xdsReq{node: c.node, names: []string{SecretDefault}})
			r, err := s.recv(recvTimeout)
			if err == nil {
				t.Fatalf("stream got a response (%v), want it refused", r.names)
			}
			st, ok := status.FromError(err)
			if !ok || st.Code() != tc.code {
				t.Fatalf("stream ended with %v, want code %s", err, tc.code)
			}
			if !strings.Contains(st.Message(), tc.word) {
				t.Errorf("status message %q does not say %q", st.Message(), tc.word)
			}
			if c.secret != "" && strings.Contains(st.Message(), c.secret) {
				t.Errorf("status message %q contains the token secret", st.Message())
			}
			if got := metricValue(t, counter); got != before+1 {
				t.Errorf("sds_authentication_failures_total{reason=%q} = %v, want %v", tc.reason, got, before+1)
			}
			logs := env.logs.String()
			newLogs := logs[logStart:]
			if n := countLines(newLogs, `msg="stream refused"`); n != 1 {
				t.Errorf("%d \"stream refused\" log lines, want 1:\n%s", n, newLogs)
			}
			if n := countLines(newLogs, `msg="stream refused"`, "reason="+tc.reason); n != 1 {
				t.Errorf("no \"stream refused\" log line with reason=%s:\n%s", tc.reason, newLogs)
			}
			if c.secret != "" && strings.Contains(logs, c.secret) {
				t.Errorf("the log contains the token secret:\n%s", logs)
			}
			if tc.check != nil {
				tc.check(t, c)
			}

			// The server keeps serving everyone else.
			node := "healthy-" + string(rune('a'+i))
			r, _ = env.fetch(t, sdsSotw, validToken, node, SecretDefault)
			if !sameNames(r.names, []string{SecretDefault}) {
				t.Fatalf("valid stream after the refusal got %v, want [default]", r.names)
			}
			if uri := leaf(t, r.secrets[SecretDefault]).URIs; len(uri) != 1 || uri[0].String() != spiffeID("frontend") {
				t.Errorf("valid stream after the refusal got URI SANs %v", uri)
			}
		})
	}

	if logs := env.logs.String(); strings.Contains(logs, secretOf(t, validToken)) {
		t.Errorf("the log contains the valid token's secret:\n%s", logs)
	}
}

// TestStreamRefusedEveryVariant checks that SDS and ADS, SotW and delta all
// authenticate their streams.
func TestStreamRefusedEveryVariant(t *testing.T) {
	env := newTestEnv(t)
	for _, v := range allVariants {
		t.Run(v.name, func(t *testing.T) {
			counter := env.metrics.authFailures.WithLabelValues(bootstrap.ReasonMissing)
			before := metricValue(t, counter)
			s := env.open(t, v, "")
			send(t, s, xdsReq{node: "n-" + v.name, names: []string{SecretDefault}})
			_, err := s.recv(recvTimeout)
			if status.Code(err) != codes.Unauthenticated {
				t.Fatalf("stream without a token ended with %v, want Unauthenticated", err)
			}
			if got := metricValue(t, counter); got != before+1 {
				t.Errorf("missing-token failures = %v, want %v", got, before+1)
			}
		})
	}
	nodes, err := env.srv.NodeList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 0 {
		t.Errorf("refused streams admitted nodes: %+v", nodes)
	}
}

func mustGetToken(t *testing.T, env *testEnv, id string) bootstrap.Record {
	t.Helper()
	rec, err := env.reg.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("get token %s: %v", id, err)
	}
	return rec
}
