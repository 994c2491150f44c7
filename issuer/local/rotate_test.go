package local

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// parseChain parses a PEM chain.
func parseChain(t testing.TB, chain []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for rest := chain; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return out
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
}

// chainsTo reports whether certs (leaf first) form a chain of signatures
// ending in a certificate signed by root: what a verifier trusting root
// alone, picking the certificates in order, builds. (crypto/x509 would
// also apply the old root's path length of 1, which Envoy's verifier does
// not apply to a trust anchor; the e2e test checks Envoy.)
func chainsTo(certs []*x509.Certificate, root *x509.Certificate) bool {
	cur := certs[0]
	for _, next := range certs[1:] {
		if cur.CheckSignatureFrom(root) == nil {
			return true
		}
		if !bytes.Equal(cur.RawIssuer, next.RawSubject) || cur.CheckSignatureFrom(next) != nil {
			return false
		}
		cur = next
	}
	return cur.CheckSignatureFrom(root) == nil
}

func bundleNames(ca *CA) string {
	roots, _ := ca.Roots(context.Background())
	var n []string
	for _, r := range roots {
		n = append(n, r.Subject.CommonName)
	}
	return strings.Join(n, ",")
}

// TestRootRotation walks the three phases: the bundle, the issuing
// intermediate and the chains at each, and the old root's key gone at
// the end.
func TestRootRotation(t *testing.T) {
	ctx := context.Background()
	clk := &fakeClock{t: t0}
	ca, dir := newTestCA(t, lifecycleOptions(clk, nil))
	a := ca.Root()
	oldLeaf := issueLeaf(t, ca)

	if err := ca.BeginRotation(ctx, 0); err != nil {
		t.Fatal(err)
	}
	info, ok := ca.Rotation()
	if !ok || info.Phase != PhaseTrustBoth || !info.OldRoot.Equal(a) {
		t.Fatalf("rotation %+v %v", info, ok)
	}
	b := info.NewRoot
	if got := bundleNames(ca); got != "sds-server root CA 2,sds-server root CA" {
		t.Fatalf("phase 1 bundle %s, want the new root first, then the old", got)
	}
	if err := ca.BeginRotation(ctx, 0); err == nil || !strings.Contains(err.Error(), "already in progress") {
		t.Errorf("second BeginRotation: %v", err)
	}
	// Workload certificates still come from A's intermediate.
	verifyChain(t, issueLeaf(t, ca), a, clk.Now())
	// The new intermediate publishes its revocation list already.
	if got := strings.Join(crlIssuers(t, ca, crlBlocks(t, ca, clk.Now())), ","); !strings.Contains(got, "intermediate CA 2") {
		t.Errorf("phase 1 lists signed by %s, want the new root's intermediate among them", got)
	}
	// The SDS listener's certificate verifies against either root.
	sc, err := ca.ServerCertificate([]string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var scCerts []*x509.Certificate
	for _, der := range sc.Certificate {
		c, _ := x509.ParseCertificate(der)
		scCerts = append(scCerts, c)
	}
	if !chainsTo(scCerts[:3], a) || !chainsTo(scCerts[:2], b) {
		t.Errorf("server chain %v does not reach both roots", subjects(scCerts))
	}
	if !scCerts[len(scCerts)-1].Equal(a) || !scCerts[len(scCerts)-2].Equal(b) {
		t.Errorf("server chain %v does not end with the bundle", subjects(scCerts))
	}

	// Phase 2: leaves under B, with the cross-signed B for peers on A.
	if p, err := ca.AdvanceRotation(ctx); err != nil || p != PhaseReissue {
		t.Fatalf("advance: %s %v", p, err)
	}
	if got := bundleNames(ca); got != "sds-server root CA 2,sds-server root CA" {
		t.Fatalf("phase 2 bundle %s", got)
	}
	leaf := issueLeaf(t, ca)
	certs := parseChain(t, leaf.ChainPEM)
	if len(certs) != 3 || !chainsTo(certs, a) || !chainsTo(certs[:2], b) {
		t.Fatalf("phase 2 chain %v: want leaf, B's intermediate, B cross-signed by A", subjects(certs))
	}
	bPool := x509.NewCertPool()
	bPool.AddCert(b)
	inter := x509.NewCertPool()
	inter.AddCert(certs[1])
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: bPool, Intermediates: inter, CurrentTime: clk.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("phase 2 leaf does not verify against B: %v", err)
	}
	// Old leaves verify still (A in the bundle, its intermediate listed).
	verifyChain(t, oldLeaf, a, clk.Now())

	// Phase 3: B alone.
	if p, err := ca.AdvanceRotation(ctx); err != nil || p != PhaseTrustNew {
		t.Fatalf("advance: %s %v", p, err)
	}
	if got := bundleNames(ca); got != "sds-server root CA 2" {
		t.Fatalf("phase 3 bundle %s, want B alone", got)
	}
	if err := ca.AbortRotation(ctx); err == nil || !strings.Contains(err.Error(), "let it complete") {
		t.Errorf("abort in phase 3: %v", err)
	}
	if p, err := ca.AdvanceRotation(ctx); err != nil || p != PhaseComplete {
		t.Fatalf("advance: %s %v", p, err)
	}
	if _, ok := ca.Rotation(); ok {
		t.Fatal("rotation still in progress after completion")
	}
	if _, err := os.Stat(filepath.Join(dir, RootKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the old root's key is still there: %v", err)
	}
	if c := parseChain(t, issueLeaf(t, ca).ChainPEM); len(c) != 2 {
		t.Errorf("after completion the chain has %d certificates, want leaf and intermediate", len(c))
	}
	verifyChain(t, issueLeaf(t, ca), b, clk.Now())
	sc, err = ca.ServerCertificate([]string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(sc.Certificate) != 4 {
		t.Errorf("server chain after completion has %d certificates, want leaf, intermediate, cross-signed B, B", len(sc.Certificate))
	}
	if _, err := ca.AdvanceRotation(ctx); !errors.Is(err, ErrNoRotation) {
		t.Errorf("advance with no rotation: %v", err)
	}

	// It reopens, and the intermediate renews under B.
	re, err := Open(ctx, dir, lifecycleOptions(clk, nil))
	if err != nil {
		t.Fatal(err)
	}
	clk.Set(re.renewAt(re.state.Load().active))
	drive(t, ctx, re, clk)
	if got := re.state.Load().active; got.gen != 3 || !got.root.cert.Equal(b) {
		t.Errorf("renewal after the rotation: generation %d under %s", got.gen, got.root.cert.Subject)
	}
	// A second rotation works too (B cross-signs C).
	if err := re.BeginRotation(ctx, 0); err != nil {
		t.Fatalf("second rotation: %v", err)
	}
}

func subjects(cs []*x509.Certificate) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Subject.CommonName+"<-"+c.Issuer.CommonName)
	}
	return out
}

// TestAbortRotation: before phase 3 an abort returns to A alone; leaves
// issued under B meanwhile still chain to A through the cross-signed B.
func TestAbortRotation(t *testing.T) {
	ctx := context.Background()
	for _, phase := range []string{PhaseTrustBoth, PhaseReissue} {
		t.Run(phase, func(t *testing.T) {
			clk := &fakeClock{t: t0}
			ca, dir := newTestCA(t, lifecycleOptions(clk, nil))
			a := ca.Root()
			gen := ca.state.Load().active.gen
			if err := ca.BeginRotation(ctx, 0); err != nil {
				t.Fatal(err)
			}
			var bLeaf *issuer.Certificate
			if phase == PhaseReissue {
				if _, err := ca.AdvanceRotation(ctx); err != nil {
					t.Fatal(err)
				}
				bLeaf = issueLeaf(t, ca)
			}
			if err := ca.AbortRotation(ctx); err != nil {
				t.Fatal(err)
			}
			if got := bundleNames(ca); got != "sds-server root CA" {
				t.Fatalf("bundle after abort %s, want A alone", got)
			}
			if st := ca.state.Load(); st.active.gen != gen || st.rotation != nil || st.incoming != nil {
				t.Fatalf("after abort: active generation %d (want %d), %s", st.active.gen, gen, roles(ca))
			}
			verifyChain(t, issueLeaf(t, ca), a, clk.Now())
			if bLeaf != nil && !chainsTo(parseChain(t, bLeaf.ChainPEM), a) {
				t.Error("a leaf issued under B before the abort no longer chains to A")
			}
			if _, err := os.Stat(filepath.Join(dir, "root-2.key")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the new root's key is still there: %v", err)
			}
			if _, err := Open(ctx, dir, lifecycleOptions(clk, nil)); err != nil {
				t.Fatalf("open after abort: %v", err)
			}
			if err := ca.AbortRotation(ctx); !errors.Is(err, ErrNoRotation) {
				t.Errorf("second abort: %v", err)
			}
			// A new rotation can start again.
			if err := ca.BeginRotation(ctx, 0); err != nil {
				t.Fatalf("rotation after abort: %v", err)
			}
		})
	}
}

// rotateAll drives a rotation from wherever ca is to completion.
func rotateAll(ctx context.Context, ca *CA) error {
	if _, ok := ca.Rotation(); !ok {
		if err := ca.BeginRotation(ctx, 0); err != nil {
			return err
		}
	}
	for range 4 {
		p, err := ca.AdvanceRotation(ctx)
		if err != nil {
			return err
		}
		if p == PhaseComplete {
			return nil
		}
	}
	return errors.New("rotation did not complete in 4 steps")
}

// TestRotationCrashAtEveryStep stops a whole rotation after each of its
// writes, as a crash would: the directory opens, issues a certificate that
// chains to a root of its bundle, and the rotation resumes to completion.
func TestRotationCrashAtEveryStep(t *testing.T) {
	ctx := context.Background()
	clk := &fakeClock{t: t0}
	_, pdir := newTestCA(t, lifecycleOptions(clk, nil))

	var steps []string
	{
		ca, err := Open(ctx, copyDir(t, pdir), lifecycleOptions(clk, nil))
		if err != nil {
			t.Fatal(err)
		}
		ca.disk.hook = func(s string) error { steps = append(steps, s); return nil }
		if err := rotateAll(ctx, ca); err != nil {
			t.Fatal(err)
		}
	}
	if len(steps) < 15 {
		t.Fatalf("only %d steps recorded: %q", len(steps), steps)
	}
	for i, name := range steps {
		t.Run(fmt.Sprintf("%02d %s", i, name), func(t *testing.T) {
			dir := copyDir(t, pdir)
			ca, err := Open(ctx, dir, lifecycleOptions(clk, nil))
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			ca.disk.hook = func(string) error {
				if n++; n > i {
					return errCrash
				}
				return nil
			}
			// A failed removal after the commit is only logged.
			if err := rotateAll(ctx, ca); !errors.Is(err, errCrash) && !strings.HasPrefix(name, "remove ") {
				t.Fatalf("rotation with a crash at step %d: %v", i, err)
			}
			re, err := Open(ctx, dir, lifecycleOptions(clk, nil))
			if err != nil {
				t.Fatalf("open after a crash at %q: %v", name, err)
			}
			roots, _ := re.Roots(ctx)
			certs := parseChain(t, issueLeaf(t, re).ChainPEM)
			ok := false
			for _, r := range roots {
				ok = ok || chainsTo(certs, r)
			}
			if !ok {
				t.Fatalf("after a crash at %q a new leaf %v chains to no root of the bundle", name, subjects(certs))
			}
			if _, ok := re.Rotation(); ok || bundleNames(re) == "sds-server root CA" {
				if err := rotateAll(ctx, re); err != nil {
					t.Fatalf("resume after a crash at %q: %v", name, err)
				}
			}
			if got := bundleNames(re); got != "sds-server root CA 2" {
				t.Fatalf("after resuming, bundle %s, want the new root alone", got)
			}
			if _, err := Open(ctx, dir, lifecycleOptions(clk, nil)); err != nil {
				t.Fatalf("open after resuming: %v", err)
			}
		})
	}
}
