package local

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/meshid/sds-server/issuer"
)

var _ issuer.CRLSigner = (*CA)(nil)

// SignCRL signs a revocation list with the intermediate, the CA that issues
// every workload certificate. Sidecars check it for leaf certificates only
// (only_verify_leaf_cert_crl), so the root needs no list of its own.
func (ca *CA) SignCRL(ctx context.Context, number *big.Int, revoked []issuer.RevokedCertificate, thisUpdate, nextUpdate time.Time) (*issuer.CRL, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if number == nil || number.Sign() < 0 {
		return nil, errors.New("sign CRL: the CRL number must be a non-negative integer")
	}
	// Clamp first: a list clamped to an expired intermediate's end would be
	// expired (NextUpdate <= ThisUpdate) when signed, and must be refused too.
	if nextUpdate.After(ca.inter.NotAfter) {
		nextUpdate = ca.inter.NotAfter
	}
	if !nextUpdate.After(thisUpdate) {
		return nil, fmt.Errorf("sign CRL: next update %s (at most the intermediate's expiry, %s) is not after this update %s",
			nextUpdate, ca.inter.NotAfter.UTC().Format(time.RFC3339), thisUpdate)
	}
	entries := make([]x509.RevocationListEntry, 0, len(revoked))
	for _, r := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: r.SerialNumber, RevocationTime: r.RevokedAt.UTC()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    number,
		ThisUpdate:                thisUpdate.UTC(),
		NextUpdate:                nextUpdate.UTC(),
		RevokedCertificateEntries: entries,
	}, ca.inter, ca.interKey)
	if err != nil {
		return nil, fmt.Errorf("sign CRL: %w", err)
	}
	return &issuer.CRL{
		PEM:        pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}),
		ThisUpdate: thisUpdate.UTC(), NextUpdate: nextUpdate.UTC(),
	}, nil
}
