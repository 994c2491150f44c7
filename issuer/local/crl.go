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

// SignCRL signs a revocation list with every intermediate whose
// certificates may be valid or are about to be issued (the active one, its
// staged successor and retired ones not yet expired), and returns them
// concatenated in one PEM: Envoy loads them all and checks a certificate
// against the list of its issuer (only_verify_leaf_cert_crl; the root
// needs no list). Every list carries every revoked serial: serials are
// random, and a serial on the list of an issuer that never used it matches
// nothing. Each list's next update is cut short at its intermediate's
// expiry, which the certificates it covers never outlive; the returned
// NextUpdate is the active intermediate's list's.
func (ca *CA) SignCRL(ctx context.Context, number *big.Int, revoked []issuer.RevokedCertificate, thisUpdate, nextUpdate time.Time) (*issuer.CRL, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if number == nil || number.Sign() < 0 {
		return nil, errors.New("sign CRL: the CRL number must be a non-negative integer")
	}
	st := ca.state.Load()
	// Clamp first: a list clamped to an expired intermediate's end would be
	// expired (NextUpdate <= ThisUpdate) when signed, and must be refused too.
	activeNext := minTime(nextUpdate, st.active.cert.NotAfter)
	if !activeNext.After(thisUpdate) {
		return nil, fmt.Errorf("sign CRL: next update %s (at most the intermediate's expiry, %s) is not after this update %s",
			activeNext, st.active.cert.NotAfter.UTC().Format(time.RFC3339), thisUpdate)
	}
	entries := make([]x509.RevocationListEntry, 0, len(revoked))
	for _, r := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: r.SerialNumber, RevocationTime: r.RevokedAt.UTC()})
	}
	signers := st.crlSigners()
	var out []byte
	for _, in := range signers {
		next := minTime(nextUpdate, in.cert.NotAfter)
		if !next.After(thisUpdate) {
			continue // expired: no certificate it signed is valid
		}
		der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
			Number:                    number,
			ThisUpdate:                thisUpdate.UTC(),
			NextUpdate:                next.UTC(),
			RevokedCertificateEntries: entries,
		}, in.cert, in.key)
		if err != nil {
			return nil, fmt.Errorf("sign CRL with intermediate generation %d: %w", in.gen, err)
		}
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})...)
	}
	ca.notePublished(st)
	return &issuer.CRL{
		PEM:        out,
		ThisUpdate: thisUpdate.UTC(), NextUpdate: activeNext.UTC(),
	}, nil
}
