package bootstrap

import (
	"context"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer/local"
)

// TestFetchServerDuringRootRotation: a token pinning the old root A keeps
// bootstrapping while A is in the bundle (phases 1 and 2), although the
// listener's chain (leaf, B's intermediate, B cross-signed by A, B, A) puts
// two CAs under A, one more than A's MaxPathLen 1; a token pinning B works
// from phase 1 on and after completion. Chains come from issuer/local.
func TestFetchServerDuringRootRotation(t *testing.T) {
	ctx := context.Background()
	ca, err := local.Open(ctx, t.TempDir(), local.Options{TrustDomain: "mesh.local"})
	if err != nil {
		t.Fatal(err)
	}
	a := ca.Root()
	if a.MaxPathLen != 1 {
		t.Fatalf("root MaxPathLen %d: the test is meant for roots with path length 1", a.MaxPathLen)
	}
	if err := ca.BeginRotation(ctx, 0); err != nil {
		t.Fatal(err)
	}
	info, _ := ca.Rotation()
	b := info.NewRoot
	tokA, tokB := mustToken(t, a), mustToken(t, b)

	fetch := func(t *testing.T, tok Token) (Server, []*x509.Certificate, error) {
		t.Helper()
		cert, err := ca.ServerCertificate([]string{"127.0.0.1"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		var chain []*x509.Certificate
		for _, der := range cert.Certificate {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			chain = append(chain, c)
		}
		srv := startTLSServer(t, cert)
		s, err := FetchServer(ctx, srv.addr, tok)
		return s, chain, err
	}
	check := func(t *testing.T, tok Token, want *x509.Certificate) {
		t.Helper()
		s, _, err := fetch(t, tok)
		if err != nil {
			t.Fatalf("FetchServer: %v", err)
		}
		if !s.Root.Equal(want) || s.TrustDomain != "mesh.local" {
			t.Fatalf("FetchServer returned root %s, trust domain %q", s.Root.Subject.CommonName, s.TrustDomain)
		}
	}

	for _, phase := range []string{local.PhaseTrustBoth, local.PhaseReissue} {
		t.Run(phase, func(t *testing.T) {
			_, chain, _ := fetch(t, tokA)
			// The case the fix is for: Go's own verification against A
			// alone refuses this chain.
			pool, inter := x509.NewCertPool(), x509.NewCertPool()
			pool.AddCert(a)
			for _, c := range chain[1:] {
				inter.AddCert(c)
			}
			if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter}); err == nil {
				t.Fatal("crypto/x509 verifies the chain against A by itself: the test no longer covers the path length case")
			}
			check(t, tokA, a)
			check(t, tokB, b)
		})
		if _, err := ca.AdvanceRotation(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Phase 3 and after completion: A is out of the chain; the token
	// pinning A is refused (as the server refuses it), B's works.
	for _, phase := range []string{local.PhaseTrustNew, local.PhaseComplete} {
		t.Run(phase, func(t *testing.T) {
			check(t, tokB, b)
			if _, _, err := fetch(t, tokA); err == nil || !strings.Contains(err.Error(), "does not match the token's digest") {
				t.Fatalf("token pinning A in %s: %v", phase, err)
			}
		})
		if phase == local.PhaseTrustNew {
			if _, err := ca.AdvanceRotation(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestAnchorsUnder: only CA certificates the pinned root signed, valid now,
// become extra anchors.
func TestAnchorsUnder(t *testing.T) {
	p := newPKI(t, "a", "")
	other := newPKI(t, "other", "")
	now := time.Now()

	// Claims the root as issuer (same issuer name) but is signed by another key.
	forgedTmpl := caTemplate("forged")
	fakeParent := *p.root
	fakeParent.PublicKey = other.root.PublicKey
	forged := signCert(t, forgedTmpl, &fakeParent, other.interKey.Public(), other.rootKey)
	if string(forged.RawIssuer) != string(p.root.RawSubject) {
		t.Fatal("the forged certificate does not name the root as its issuer")
	}
	expiredTmpl := caTemplate("expired")
	expiredTmpl.NotBefore, expiredTmpl.NotAfter = now.Add(-2*time.Hour), now.Add(-time.Hour)
	expired := signCert(t, expiredTmpl, p.root, p.interKey.Public(), p.rootKey)
	notYetTmpl := caTemplate("not yet")
	notYetTmpl.NotBefore, notYetTmpl.NotAfter = now.Add(time.Hour), now.Add(2*time.Hour)
	notYet := signCert(t, notYetTmpl, p.root, p.interKey.Public(), p.rootKey)
	notCA := p.issueLeaf(t, "", p.root, p.rootKey)

	tests := []struct {
		name string
		c    *x509.Certificate
		want bool
	}{
		{"signed by the root", p.inter, true},
		{"the root itself", p.root, false},
		{"forged issuer name", forged, false},
		{"another root's intermediate", other.inter, false},
		{"expired", expired, false},
		{"not yet valid", notYet, false},
		{"not a CA", notCA, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := anchorsUnder(p.root, []*x509.Certificate{tc.c}, now)
			if (len(got) == 1) != tc.want {
				t.Fatalf("anchorsUnder returned %d certificates, want the certificate trusted: %v", len(got), tc.want)
			}
		})
	}

	t.Run("root with name constraints", func(t *testing.T) {
		tmpl := caTemplate("constrained")
		tmpl.PermittedURIDomains = []string{"mesh.local"}
		k := newKey(t)
		root := signCert(t, tmpl, nil, k.Public(), k)
		inter := signCert(t, caTemplate("i"), root, p.interKey.Public(), k)
		if got := anchorsUnder(root, []*x509.Certificate{inter}, now); len(got) != 0 {
			t.Fatal("a root with name constraints got extra anchors, which would bypass its constraints")
		}
	})
}
