package local

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// parseCRL decodes the PEM of a signed list and checks it is one X509 CRL
// block signed by ca's intermediate (and not by the root).
func parseCRL(t *testing.T, ca *CA, c *issuer.CRL) *x509.RevocationList {
	t.Helper()
	b, rest := pem.Decode(c.PEM)
	if b == nil || b.Type != "X509 CRL" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("CRL PEM is not exactly one X509 CRL block: %q", c.PEM)
	}
	crl, err := x509.ParseRevocationList(b.Bytes)
	if err != nil {
		t.Fatalf("parse CRL: %v", err)
	}
	if err := crl.CheckSignatureFrom(ca.Intermediate()); err != nil {
		t.Errorf("CRL is not signed by the intermediate: %v", err)
	}
	if err := crl.CheckSignatureFrom(ca.Root()); err == nil {
		t.Errorf("CRL signature checks against the root: it must be the intermediate's")
	}
	if !bytes.Equal(crl.RawIssuer, ca.Intermediate().RawSubject) {
		t.Errorf("CRL issuer is not the intermediate's subject")
	}
	if !bytes.Equal(crl.AuthorityKeyId, ca.Intermediate().SubjectKeyId) {
		t.Errorf("CRL authority key ID %x, want the intermediate's %x", crl.AuthorityKeyId, ca.Intermediate().SubjectKeyId)
	}
	return crl
}

func TestSignCRL(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	end := ca.IntermediateNotAfter()
	revokedAt := t0.Add(-time.Hour)
	two := []issuer.RevokedCertificate{
		{SerialNumber: big.NewInt(0x1234), RevokedAt: revokedAt},
		{SerialNumber: new(big.Int).Lsh(big.NewInt(1), 120), RevokedAt: revokedAt.Add(time.Minute)},
	}
	tests := []struct {
		name         string
		number       *big.Int
		revoked      []issuer.RevokedCertificate
		this, next   time.Time
		wantErr      string    // a word of the error; empty: success
		wantNext     time.Time // the NextUpdate signed
		cancelledCtx bool
	}{
		{name: "two entries", number: big.NewInt(7), revoked: two, this: t0, next: t0.Add(time.Hour), wantNext: t0.Add(time.Hour)},
		{name: "empty list", number: big.NewInt(1), this: t0, next: t0.Add(time.Hour), wantNext: t0.Add(time.Hour)},
		{name: "number zero", number: big.NewInt(0), this: t0, next: t0.Add(time.Hour), wantNext: t0.Add(time.Hour)},
		{name: "nil number", number: nil, this: t0, next: t0.Add(time.Hour), wantErr: "non-negative"},
		{name: "negative number", number: big.NewInt(-1), this: t0, next: t0.Add(time.Hour), wantErr: "non-negative"},
		{name: "next equals this", number: big.NewInt(1), this: t0, next: t0, wantErr: "not after"},
		{name: "next before this", number: big.NewInt(1), this: t0, next: t0.Add(-time.Second), wantErr: "not after"},
		{name: "clamped to the intermediate", number: big.NewInt(2), revoked: two, this: end.Add(-time.Hour), next: end.Add(time.Hour), wantNext: end},
		{name: "next exactly the intermediate's end", number: big.NewInt(2), this: end.Add(-time.Hour), next: end, wantNext: end},
		// Clamped to the intermediate's end, the list would be expired
		// when signed: refused rather than handed to sidecars.
		{name: "intermediate expired", number: big.NewInt(3), this: end, next: end.Add(time.Hour), wantErr: "not after"},
		{name: "intermediate long expired", number: big.NewInt(3), this: end.Add(time.Hour), next: end.Add(2 * time.Hour), wantErr: "not after"},
		{name: "cancelled context", number: big.NewInt(1), this: t0, next: t0.Add(time.Hour), cancelledCtx: true, wantErr: "canceled"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			if tc.cancelledCtx {
				c, cancel := context.WithCancel(ctx)
				cancel()
				ctx = c
			}
			got, err := ca.SignCRL(ctx, tc.number, tc.revoked, tc.this, tc.next)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("SignCRL: (CRL %v, error %v), want an error saying %q", got != nil, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("SignCRL: %v", err)
			}
			if !got.ThisUpdate.Equal(tc.this) || !got.NextUpdate.Equal(tc.wantNext) {
				t.Errorf("returned validity %s .. %s, want %s .. %s", got.ThisUpdate, got.NextUpdate, tc.this, tc.wantNext)
			}
			if got.ThisUpdate.Location() != time.UTC || got.NextUpdate.Location() != time.UTC {
				t.Errorf("returned times are not UTC")
			}
			crl := parseCRL(t, ca, got)
			if crl.Number == nil || crl.Number.Cmp(tc.number) != 0 {
				t.Errorf("CRL number %v, want %v", crl.Number, tc.number)
			}
			if !crl.ThisUpdate.Equal(tc.this) || !crl.NextUpdate.Equal(tc.wantNext) {
				t.Errorf("signed validity %s .. %s, want %s .. %s", crl.ThisUpdate, crl.NextUpdate, tc.this, tc.wantNext)
			}
			if crl.NextUpdate.After(end) {
				t.Errorf("signed NextUpdate %s outlives the intermediate (%s)", crl.NextUpdate, end)
			}
			if len(crl.RevokedCertificateEntries) != len(tc.revoked) {
				t.Fatalf("CRL has %d entries, want %d", len(crl.RevokedCertificateEntries), len(tc.revoked))
			}
			for i, e := range crl.RevokedCertificateEntries {
				want := tc.revoked[i]
				if e.SerialNumber.Cmp(want.SerialNumber) != 0 || !e.RevocationTime.Equal(want.RevokedAt) {
					t.Errorf("entry %d: serial %x revoked at %s, want %x at %s", i, e.SerialNumber, e.RevocationTime, want.SerialNumber, want.RevokedAt)
				}
			}
		})
	}
}

// ---- openssl ------------------------------------------------------------------

// runOpenSSL runs openssl with args in dir and returns its combined output.
func runOpenSSL(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "openssl", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func writePEM(t *testing.T, path, typ string, ders ...[]byte) {
	t.Helper()
	var b []byte
	for _, d := range ders {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: d})...)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestCRLOpenSSL checks the lists against OpenSSL, whose checks BoringSSL
// (Envoy) shares: the list verifies against the CA file, and a chain check
// with CRLs rejects a revoked leaf and accepts it with an empty list.
//
// -crl_check checks the leaf only, which is what Envoy does with
// only_verify_leaf_cert_crl; -crl_check_all checks every certificate of the
// chain and then also wants a list from the root for the intermediate, which
// this CA does not publish: that is why ROOTCA must set
// only_verify_leaf_cert_crl.
func TestCRLOpenSSL(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl is not on PATH")
	}
	// The real clock: openssl checks validity against the current time.
	ca, _ := newTestCA(t, Options{TrustDomain: testTrustDomain})
	ctx := context.Background()
	issue := func() *x509.Certificate {
		c, err := ca.Issue(ctx, issuer.Request{Identity: testIdentity(), CSR: newCSR(t, newP256(t), nil), TTL: 4 * time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf
	}
	revokedLeaf, goodLeaf := issue(), issue()

	dir := t.TempDir()
	writePEM(t, filepath.Join(dir, "root.pem"), "CERTIFICATE", ca.Root().Raw)
	writePEM(t, filepath.Join(dir, "inter.pem"), "CERTIFICATE", ca.Intermediate().Raw)
	writePEM(t, filepath.Join(dir, "cafile.pem"), "CERTIFICATE", ca.Intermediate().Raw, ca.Root().Raw)
	writePEM(t, filepath.Join(dir, "revoked.pem"), "CERTIFICATE", revokedLeaf.Raw)
	writePEM(t, filepath.Join(dir, "good.pem"), "CERTIFICATE", goodLeaf.Raw)

	now := time.Now()
	sign := func(name string, revoked ...*x509.Certificate) *issuer.CRL {
		var entries []issuer.RevokedCertificate
		for _, c := range revoked {
			entries = append(entries, issuer.RevokedCertificate{SerialNumber: c.SerialNumber, RevokedAt: now})
		}
		crl, err := ca.SignCRL(ctx, big.NewInt(1), entries, now.Add(-issuer.Backdate), now.Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), crl.PEM, 0o600); err != nil {
			t.Fatal(err)
		}
		return crl
	}
	sign("crl.pem", revokedLeaf)
	sign("empty.pem")

	for _, name := range []string{"crl.pem", "empty.pem"} {
		out, err := runOpenSSL(t, dir, "crl", "-in", name, "-CAfile", "cafile.pem", "-noout", "-verify")
		if err != nil || !strings.Contains(out, "verify OK") {
			t.Errorf("openssl crl -verify %s: %v\n%s", name, err, out)
		}
	}
	// The list of another CA does not verify: the check above means something.
	other, _ := newTestCA(t, Options{TrustDomain: testTrustDomain})
	writePEM(t, filepath.Join(dir, "other.pem"), "CERTIFICATE", other.Intermediate().Raw, other.Root().Raw)
	if out, err := runOpenSSL(t, dir, "crl", "-in", "crl.pem", "-CAfile", "other.pem", "-noout", "-verify"); err == nil && strings.Contains(out, "verify OK") {
		t.Errorf("openssl crl -verify accepts the list against another CA:\n%s", out)
	}

	verify := func(crlFile, leafFile string, extra ...string) (string, error) {
		args := append([]string{"verify"}, extra...)
		args = append(args, "-CAfile", "root.pem", "-untrusted", "inter.pem", "-CRLfile", crlFile, leafFile)
		return runOpenSSL(t, dir, args...)
	}
	tests := []struct {
		name, crl, leaf string
		flags           []string
		want            string // a word of the output
		ok              bool
	}{
		{"revoked leaf", "crl.pem", "revoked.pem", []string{"-crl_check"}, "certificate revoked", false},
		{"other leaf, same list", "crl.pem", "good.pem", []string{"-crl_check"}, "good.pem: OK", true},
		{"empty list", "empty.pem", "revoked.pem", []string{"-crl_check"}, "revoked.pem: OK", true},
		{"empty list, other leaf", "empty.pem", "good.pem", []string{"-crl_check"}, "good.pem: OK", true},
		// Every CA of the chain checked: no list for the intermediate.
		{"crl_check_all wants a list from the root", "empty.pem", "good.pem", []string{"-crl_check_all"}, "unable to get certificate CRL", false},
		// Past NextUpdate the list fails every leaf: why it must stay fresh.
		{"expired list", "empty.pem", "good.pem", []string{"-crl_check", "-attime", strconv.FormatInt(now.Add(90*time.Minute).Unix(), 10)}, "CRL has expired", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := verify(tc.crl, tc.leaf, tc.flags...)
			if (err == nil) != tc.ok || !strings.Contains(out, tc.want) {
				t.Errorf("openssl verify %v %s with %s: error %v, want ok=%v and %q in:\n%s", tc.flags, tc.leaf, tc.crl, err, tc.ok, tc.want, out)
			}
		})
	}
}
