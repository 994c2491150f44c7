package sds

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"slices"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// checkWorkloadSecret checks a tls_certificate secret against the identity
// it must carry: service in env "default", CN the server-assigned node ID.
func checkWorkloadSecret(t *testing.T, env *testEnv, sec *tlsv3.Secret, service, nodeID string) {
	t.Helper()
	chain, key := leafOf(t, sec)
	l := chain[0]
	if len(l.URIs) != 1 || l.URIs[0].String() != spiffeID(service) {
		t.Errorf("%s: URI SANs %v, want [%s]", sec.GetName(), l.URIs, spiffeID(service))
	}
	if !slices.Equal(l.Subject.OrganizationalUnit, []string{service}) {
		t.Errorf("%s: Subject OU %v, want [%s]", sec.GetName(), l.Subject.OrganizationalUnit, service)
	}
	if !slices.Equal(l.Subject.Organization, []string{"default"}) {
		t.Errorf("%s: Subject O %v, want [default]", sec.GetName(), l.Subject.Organization)
	}
	if l.Subject.CommonName != nodeID {
		t.Errorf("%s: Subject CN %q, want the server-assigned node ID %q", sec.GetName(), l.Subject.CommonName, nodeID)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		t.Fatalf("%s: private key %T is not a signer", sec.GetName(), key)
	}
	if pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(l.PublicKey) {
		t.Errorf("%s: private key does not match the leaf's public key", sec.GetName())
	}
	// The chain verifies up to the CA root.
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(env.ca.Root())
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := l.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: env.clock.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("%s: chain does not verify to the CA root: %v", sec.GetName(), err)
	}
}

// checkRootCA checks that the ROOTCA secret holds exactly the CA root.
func checkRootCA(t *testing.T, env *testEnv, sec *tlsv3.Secret) {
	t.Helper()
	vc := sec.GetValidationContext()
	if vc == nil {
		t.Fatalf("ROOTCA has no validation_context")
	}
	var got [][]byte
	rest := vc.GetTrustedCa().GetInlineBytes()
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		got = append(got, b.Bytes)
	}
	if len(got) != 1 || !bytes.Equal(got[0], env.ca.Root().Raw) {
		t.Errorf("ROOTCA trusted_ca holds %d certificates, want exactly the CA root", len(got))
	}
	if sec.GetTlsCertificate() != nil {
		t.Errorf("ROOTCA carries a tls_certificate")
	}
}

// TestSecretsHappyPath serves default, ROOTCA and the SPIFFE alias over every
// protocol variant.
func TestSecretsHappyPath(t *testing.T) {
	env := newTestEnv(t)
	token, rec := env.token(t, "frontend", 0, 0)
	alias := spiffeID("frontend")

	tests := []struct {
		v       variant
		streams [][]string // the names asked for, one stream each
	}{
		{sdsSotw, [][]string{{SecretDefault}, {SecretRootCA}, {alias}}},
		{adsSotw, [][]string{{SecretDefault, SecretRootCA, alias}}},
		{sdsDelta, [][]string{{SecretDefault, SecretRootCA, alias}}},
		{adsDelta, [][]string{{SecretDefault, SecretRootCA, alias}}},
	}
	for _, tc := range tests {
		t.Run(tc.v.name, func(t *testing.T) {
			claimed := "sidecar-" + tc.v.name
			got := map[string]*tlsv3.Secret{}
			for _, names := range tc.streams {
				r, _ := env.fetch(t, tc.v, token, claimed, names...)
				if !sameNames(r.names, names) {
					t.Fatalf("asked for %v, got %v", names, r.names)
				}
				if len(r.removed) != 0 {
					t.Errorf("first response removes %v", r.removed)
				}
				for n, s := range r.secrets {
					if s.GetName() != n {
						t.Errorf("resource %q carries secret named %q", n, s.GetName())
					}
					got[n] = s
				}
			}
			node := env.nodeFor(t, rec.ID, claimed)
			if node.ID == claimed || node.Service != "frontend" || node.Env != "default" || node.Status != NodeActive {
				t.Errorf("node record %+v", node)
			}
			checkWorkloadSecret(t, env, got[SecretDefault], "frontend", node.ID)
			checkRootCA(t, env, got[SecretRootCA])
			checkWorkloadSecret(t, env, got[alias], "frontend", node.ID)
			d, a := got[SecretDefault].GetTlsCertificate(), got[alias].GetTlsCertificate()
			if !proto.Equal(d, a) {
				t.Errorf("the %s alias does not carry the default certificate and key", alias)
			}
			if node.IssuedSerial != fmt.Sprintf("%x", leaf(t, got[SecretDefault]).SerialNumber) {
				t.Errorf("node record's issued serial %q is not the served certificate's", node.IssuedSerial)
			}
		})
	}
	if n := metricValue(t, env.metrics.nodesAdmitted); n != float64(len(tests)) {
		t.Errorf("sds_nodes_admitted_total = %v, want %d", n, len(tests))
	}
	if u := mustGetToken(t, env, rec.ID).Uses; u != len(tests) {
		t.Errorf("token Uses = %d, want %d (one per node)", u, len(tests))
	}
}

// TestIdentityConfinement: a stream only ever gets its own token's identity,
// whatever node.id it claims and whatever names it asks for.
func TestIdentityConfinement(t *testing.T) {
	env := newTestEnv(t)
	backendToken, backendRec := env.token(t, "backend", 0, 0)
	frontendToken, frontendRec := env.token(t, "frontend", 0, 0)

	r, _ := env.fetch(t, sdsSotw, backendToken, "backend-1", SecretDefault)
	backendNode := env.nodeFor(t, backendRec.ID, "backend-1")
	checkWorkloadSecret(t, env, r.secrets[SecretDefault], "backend", backendNode.ID)

	backendAlias := spiffeID("backend")
	unknown := env.metrics.unknownResources.WithLabelValues(xdsres.SecretType)

	for _, v := range allVariants {
		t.Run(v.name, func(t *testing.T) {
			// Claiming the backend's node.id gives a frontend node.
			r, _ := env.fetch(t, v, frontendToken, "backend-1", SecretDefault)
			fe := env.nodeFor(t, frontendRec.ID, "backend-1")
			if fe.ID == backendNode.ID {
				t.Fatalf("frontend token claiming node.id backend-1 bound to the backend node")
			}
			checkWorkloadSecret(t, env, r.secrets[SecretDefault], "frontend", fe.ID)
			if cn := leaf(t, r.secrets[SecretDefault]).Subject.CommonName; cn == backendNode.ID {
				t.Errorf("frontend certificate has the backend node's CN")
			}

			// Only another identity's name: nothing at all.
			before := metricValue(t, unknown)
			s := env.open(t, v, bearer(frontendToken))
			send(t, s, xdsReq{node: "fe-" + v.name, names: []string{backendAlias}})
			if r, err := s.recv(500 * time.Millisecond); err != errNoReply {
				t.Fatalf("asking for %s: got (%v, %v), want no response", backendAlias, r, err)
			}
			if got := metricValue(t, unknown); got != before+1 {
				t.Errorf("unknown-resource requests = %v, want %v", got, before+1)
			}

			// Own and other names: only the own one.
			before = metricValue(t, unknown)
			r, _ = env.fetch(t, v, frontendToken, "fe-"+v.name, SecretDefault, backendAlias)
			if !sameNames(r.names, []string{SecretDefault}) {
				t.Fatalf("asking for [default %s]: got %v, want [default]", backendAlias, r.names)
			}
			checkWorkloadSecret(t, env, r.secrets[SecretDefault], "frontend", env.nodeFor(t, frontendRec.ID, "fe-"+v.name).ID)
			if got := metricValue(t, unknown); got != before+1 {
				t.Errorf("unknown-resource requests = %v, want %v", got, before+1)
			}
		})
	}
}

// TestReconnect: the same token and node.id bind to the same node and get
// the same certificate while it has life left; a new node.id is a new node
// and consumes a use.
func TestReconnect(t *testing.T) {
	env := newTestEnv(t)
	token, rec := env.token(t, "frontend", 0, 0)

	first, s := env.fetch(t, sdsSotw, token, "fe-1", SecretDefault)
	s.close()
	firstLeaf := leaf(t, first.secrets[SecretDefault])
	issued := metricValue(t, env.metrics.certsIssued.WithLabelValues("success"))

	tests := []struct {
		name       string
		claimed    string
		advance    time.Duration // server clock moved before reconnecting
		sameNode   bool
		sameSerial bool
		uses       int // token uses after the reconnection
	}{
		{name: "same node.id", claimed: "fe-1", sameNode: true, sameSerial: true, uses: 1},
		{name: "same node.id, other variant", claimed: "fe-1", sameNode: true, sameSerial: true, uses: 1},
		{name: "different node.id", claimed: "fe-2", sameNode: false, sameSerial: false, uses: 2},
		// 50 of 60 minutes gone: less than 20% of its life left, renewed.
		{name: "same node.id, certificate near expiry", claimed: "fe-1", advance: 50 * time.Minute, sameNode: true, sameSerial: false, uses: 2},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.advance != 0 {
				// Nothing connected, so no scheduled renewal runs meanwhile.
				if !eventually(2*time.Second, func() bool { return metricValue(t, env.metrics.connectedSidecars) == 0 }) {
					t.Fatal("streams of earlier cases still connected")
				}
				env.clock.Advance(tc.advance)
			}
			v := allVariants[i%len(allVariants)]
			r, s := env.fetch(t, v, token, tc.claimed, SecretDefault)
			defer s.close()
			l := leaf(t, r.secrets[SecretDefault])
			node := env.nodeFor(t, rec.ID, tc.claimed)
			if l.Subject.CommonName != node.ID {
				t.Errorf("CN %q is not the bound node's ID %q", l.Subject.CommonName, node.ID)
			}
			if same := l.Subject.CommonName == firstLeaf.Subject.CommonName; same != tc.sameNode {
				t.Errorf("same node as the first stream: %v, want %v", same, tc.sameNode)
			}
			if same := l.SerialNumber.Cmp(firstLeaf.SerialNumber) == 0; same != tc.sameSerial {
				t.Errorf("same certificate serial as the first stream: %v, want %v", same, tc.sameSerial)
			}
			if u := mustGetToken(t, env, rec.ID).Uses; u != tc.uses {
				t.Errorf("token Uses = %d, want %d", u, tc.uses)
			}
		})
	}
	if got := metricValue(t, env.metrics.certsIssued.WithLabelValues("success")); got != issued+2 {
		t.Errorf("certificates issued after the first = %v, want 2 (new node, renewal)", got-issued)
	}
	nodes, err := env.srv.NodeList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 {
		t.Errorf("%d nodes, want 2", len(nodes))
	}
}

// TestAckDoesNotResend: an ACK gets no new response, a NACK is counted, and
// a new certificate of the node is pushed on the open stream.
func TestAckDoesNotResend(t *testing.T) {
	env := newTestEnv(t)
	token, _ := env.token(t, "frontend", 0, 0)
	names := []string{SecretDefault, SecretRootCA}

	for _, v := range allVariants {
		t.Run(v.name, func(t *testing.T) {
			claimed := "ack-" + v.name
			r, s := env.fetch(t, v, token, claimed, names...)
			if !sameNames(r.names, names) {
				t.Fatalf("got %v, want %v", r.names, names)
			}
			oldSerial := leaf(t, r.secrets[SecretDefault]).SerialNumber

			// ACK: no resend.
			ack := xdsReq{version: r.version, nonce: r.nonce}
			if !v.delta {
				ack.names = names
			}
			send(t, s, ack)
			if r, err := s.recv(300 * time.Millisecond); err != errNoReply {
				t.Fatalf("after an ACK: got (%v, %v), want no response", r, err)
			}

			// NACK: counted, not resent either.
			nacks := env.metrics.nacks.WithLabelValues(xdsres.SecretType)
			before := metricValue(t, nacks)
			nack := ack
			nack.nack = "rejected by the test"
			send(t, s, nack)
			if !eventually(2*time.Second, func() bool { return metricValue(t, nacks) == before+1 }) {
				t.Errorf("sds_nacks_total = %v, want %v", metricValue(t, nacks), before+1)
			}
			if r, err := s.recv(300 * time.Millisecond); err != errNoReply {
				t.Fatalf("after a NACK: got (%v, %v), want no response", r, err)
			}

			// A renewal (another stream of the same node after the
			// certificate aged) is pushed to this ACKed stream.
			env.clock.Advance(50 * time.Minute)
			_, other := env.fetch(t, sdsSotw, token, claimed, SecretDefault)
			other.close()
			push := mustRecv(t, s)
			sec, ok := push.secrets[SecretDefault]
			if !ok {
				t.Fatalf("push carries %v, want default", push.names)
			}
			if leaf(t, sec).SerialNumber.Cmp(oldSerial) == 0 {
				t.Errorf("push carries the old certificate")
			}
			if v.delta {
				// Delta sends only what changed: ROOTCA did not.
				if !sameNames(push.names, []string{SecretDefault}) {
					t.Errorf("delta push carries %v, want only [default]", push.names)
				}
			} else if !sameNames(push.names, names) {
				t.Errorf("SotW push carries %v, want %v", push.names, names)
			}
		})
	}
}

// TestFetchAndStreamsGauge: REST-style fetches are refused, and the open
// streams gauge follows streams as they open and close.
func TestFetchAndStreamsGauge(t *testing.T) {
	env := newTestEnv(t)
	token, _ := env.token(t, "frontend", 0, 0)

	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", bearer(token)), recvTimeout)
	defer cancel()
	_, err := secretservice.NewSecretDiscoveryServiceClient(env.conn).FetchSecrets(ctx,
		&discoverygrpc.DiscoveryRequest{TypeUrl: xdsres.SecretType, ResourceNames: []string{SecretDefault}})
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("FetchSecrets: %v, want Unimplemented", err)
	}

	tests := []struct {
		v        variant
		protocol string
		kind     string
	}{
		{sdsSotw, "sotw", "sds"},
		{adsSotw, "sotw", "ads"},
		{sdsDelta, "delta", "sds"},
		{adsDelta, "delta", "ads"},
	}
	for _, tc := range tests {
		t.Run(tc.v.name, func(t *testing.T) {
			g := env.metrics.streams.WithLabelValues(tc.kind, tc.protocol)
			before := metricValue(t, g)
			_, s := env.fetch(t, tc.v, token, "gauge-"+tc.v.name, SecretDefault)
			if got := metricValue(t, g); got != before+1 {
				t.Errorf("sds_connected_streams{%s,%s} = %v with the stream open, want %v", tc.kind, tc.protocol, got, before+1)
			}
			if got := metricValue(t, env.metrics.connectedSidecars); got != 1 {
				t.Errorf("sds_connected_nodes = %v with one node connected, want 1", got)
			}
			s.close()
			if !eventually(2*time.Second, func() bool { return metricValue(t, g) == before }) {
				t.Errorf("sds_connected_streams{%s,%s} = %v after the stream closed, want %v", tc.kind, tc.protocol, metricValue(t, g), before)
			}
			if !eventually(2*time.Second, func() bool { return metricValue(t, env.metrics.connectedSidecars) == 0 }) {
				t.Errorf("sds_connected_nodes = %v after the stream closed, want 0", metricValue(t, env.metrics.connectedSidecars))
			}
		})
	}
}
