package stepca

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/internal/stepcainit"
	"github.com/meshid/sds-server/issuer"
)

func parseCRL(t *testing.T, c *issuer.CRL) *x509.RevocationList {
	t.Helper()
	b, rest := pem.Decode(c.PEM)
	if b == nil || b.Type != "X509 CRL" || len(strings.TrimSpace(string(rest))) != 0 {
		t.Fatalf("not one PEM X509 CRL: %q", c.PEM)
	}
	crl, err := x509.ParseRevocationList(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return crl
}

// TestRevokeAndCRL: a certificate revoked through step-ca's revoke API
// (sds-server's revocation token) is on step-ca's CRL, which is signed by
// the intermediate that issued it; revoking it again is no error.
func TestRevokeAndCRL(t *testing.T) {
	tc := startCAWith(t, stepcainit.Options{})
	iss := open(t, tc.options())
	ctx := context.Background()
	csr, _ := workloadCSR(t, testID)
	cert, err := iss.Issue(ctx, issuer.Request{Identity: testID, CSR: csr, TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	// The shipped template names step-ca's CRL as the distribution point,
	// learnt from step-ca at Open, so the CRL applies to the certificate.
	if dps := cert.Leaf.CRLDistributionPoints; len(dps) != 1 || dps[0] != tc.CRLURL {
		t.Fatalf("certificate CRL distribution points %v, want [%s]", dps, tc.CRLURL)
	}
	other, err := iss.Issue(ctx, issuer.Request{Identity: testID, CSR: csr, TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}

	before, err := iss.CRL(ctx)
	if err != nil {
		t.Fatalf("CRL: %v", err)
	}
	if n := len(parseCRL(t, before).RevokedCertificateEntries); n != 0 {
		t.Errorf("CRL lists %d certificates before any revocation", n)
	}

	if err := iss.Revoke(ctx, cert.Leaf.SerialNumber, "key leaked"); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	if err := iss.Revoke(ctx, cert.Leaf.SerialNumber, "again"); err != nil {
		t.Errorf("Revoke of a revoked certificate: %v, want no error", err)
	}
	got, err := iss.CRL(ctx)
	if err != nil {
		t.Fatalf("CRL: %v", err)
	}
	crl := parseCRL(t, got)
	chain := parseChain(t, cert.ChainPEM)
	if err := crl.CheckSignatureFrom(chain[1]); err != nil {
		t.Errorf("CRL not signed by the issuing intermediate: %v", err)
	}
	var listed []*big.Int
	for _, e := range crl.RevokedCertificateEntries {
		listed = append(listed, e.SerialNumber)
	}
	if len(listed) != 1 || listed[0].Cmp(cert.Leaf.SerialNumber) != 0 {
		t.Errorf("CRL lists %v, want only %v (not %v)", listed, cert.Leaf.SerialNumber, other.Leaf.SerialNumber)
	}
	if !got.ThisUpdate.Equal(crl.ThisUpdate) || !got.NextUpdate.Equal(crl.NextUpdate) || got.NextUpdate.Sub(got.ThisUpdate) != stepcainit.DefaultCRLCacheDuration {
		t.Errorf("ThisUpdate %s NextUpdate %s, want the CRL's, %s apart", got.ThisUpdate, got.NextUpdate, stepcainit.DefaultCRLCacheDuration)
	}
	if !got.ThisUpdate.After(before.ThisUpdate) && crl.Number.Cmp(parseCRL(t, before).Number) <= 0 {
		t.Error("the CRL was not regenerated on revocation")
	}
}

// TestCRLErrors: a step-ca without a CRL, a CRL the certificates are out
// of scope of, and a step-ca that is down or silent give clear errors, in
// bounded time.
func TestCRLErrors(t *testing.T) {
	ctx := context.Background()
	check := func(t *testing.T, err error, want ...string) {
		t.Helper()
		if err == nil {
			t.Fatal("no error")
		}
		t.Logf("error: %v", err)
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not mention %q", err, w)
			}
		}
	}
	t.Run("CRL disabled", func(t *testing.T) {
		tc := startCAWith(t, stepcainit.Options{NoCRL: true})
		_, err := open(t, tc.options()).CRL(ctx)
		check(t, err, "serves no CRL", `"crl": {"enabled": true, "generateOnRevoke": true`, "ca.json")
	})
	t.Run("no database", func(t *testing.T) {
		tc := startCA(t, stepcainit.Options{})
		iss := open(t, tc.options())
		err := iss.Revoke(ctx, big.NewInt(12345), "")
		check(t, err, "no database", `"db"`)
	})
	t.Run("distribution point not in the certificates", func(t *testing.T) {
		// As if step-ca's CRL had been enabled after sds-server started:
		// the certificates issued do not name its distribution point.
		tc := startCAWith(t, stepcainit.Options{})
		iss := open(t, tc.options())
		iss.crlDP.Store(nil)
		csr, _ := workloadCSR(t, testID)
		if _, err := iss.Issue(ctx, issuer.Request{Identity: testID, CSR: csr, TTL: time.Minute}); err != nil {
			t.Fatal(err)
		}
		_, err := iss.CRL(ctx)
		if !errors.Is(err, issuer.ErrCRLNotApplicable) {
			t.Errorf("error %v does not wrap ErrCRLNotApplicable", err)
		}
		check(t, err, tc.CRLURL, "deploy/step-ca", "restart sds-server")
	})
	t.Run("down", func(t *testing.T) {
		tc := startCAWith(t, stepcainit.Options{})
		opts := tc.options()
		opts.Timeout = 300 * time.Millisecond
		iss := open(t, opts)
		tc.stop()
		start := time.Now()
		_, err := iss.CRL(ctx)
		check(t, err, tc.URL)
		err = iss.Revoke(ctx, big.NewInt(12345), "")
		check(t, err, tc.URL)
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("took %s with step-ca down", d)
		}
	})
	t.Run("silent", func(t *testing.T) {
		tc := startCAWith(t, stepcainit.Options{})
		opts := tc.options()
		opts.Timeout = 300 * time.Millisecond
		iss := open(t, opts)
		iss.httpc.Transport = hangingTransport{}
		start := time.Now()
		_, err := iss.CRL(ctx)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("CRL on a silent step-ca: %v, want a deadline error", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("took %s on a silent step-ca", d)
		}
	})
}
