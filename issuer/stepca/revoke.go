package stepca

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/smallstep/certificates/api"
	"github.com/smallstep/certificates/errs"
	"github.com/smallstep/cli-utils/token"
	"github.com/smallstep/cli-utils/token/provision"
	"go.step.sm/crypto/randutil"

	"github.com/meshid/sds-server/issuer"
)

// crlSettings is what ca.json needs for step-ca to keep a CRL, quoted in
// errors.
const crlSettings = `"crl": {"enabled": true, "generateOnRevoke": true, "cacheDuration": "1h"}`

// maxCRLSize bounds the CRL read from step-ca.
const maxCRLSize = 16 << 20

// Revoke has step-ca revoke the certificate with this serial number, with
// a one-time token of sds-server's JWK provisioner whose subject is the
// serial (what step-ca checks a revocation token by) and whose audience is
// the revoke endpoint. The revocation is passive (step-ca records it and
// puts it on its CRL), with reason code unspecified and the reason text.
// A certificate step-ca has already revoked is not an error. It implements
// issuer.Revoker; ctx bounds it, and so does the per-request timeout.
func (iss *Issuer) Revoke(ctx context.Context, serial *big.Int, reason string) error {
	if serial == nil || serial.Sign() <= 0 {
		return errors.New("revoke certificate: no serial number")
	}
	sn := serial.String() // step-ca compares the token subject with the decimal serial
	ott, err := iss.revokeToken(sn)
	if err != nil {
		return fmt.Errorf("revoke certificate %s: sign one-time token: %w", sn, err)
	}
	ctx, cancel := context.WithTimeout(ctx, iss.timeout)
	defer cancel()
	_, err = iss.client.RevokeWithContext(ctx, &api.RevokeRequest{
		Serial: sn, OTT: ott, ReasonCode: 0, Reason: reason, Passive: true,
	}, nil)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("step-ca at %s: revoke certificate %s: %w", iss.url, sn, ctx.Err())
	}
	var apiErr *errs.Error
	if errors.As(err, &apiErr) {
		switch code, msg := apiErr.StatusCode(), apiErr.Message(); {
		case code == http.StatusBadRequest && strings.Contains(msg, "already revoked"):
			return nil
		case code == http.StatusNotImplemented:
			return fmt.Errorf("step-ca at %s: revoke certificate %s: step-ca has no database to record revocations in; configure one in ca.json (e.g. \"db\": {\"type\": \"bbolt\", \"dataSource\": \"/home/step/db/bbolt.db\"}): HTTP %d: %s",
				iss.url, sn, code, msg)
		case code == http.StatusUnauthorized:
			return fmt.Errorf("step-ca at %s: revoke certificate %s: step-ca refused sds-server's revocation token (provisioner %q): HTTP %d: %s",
				iss.url, sn, iss.provisioner, code, msg)
		}
	}
	return iss.requestError("revoke certificate "+sn, err)
}

// revokeToken signs a one-time revocation token, as `step ca token
// --revoke` does: subject the serial, audience the revoke endpoint.
func (iss *Issuer) revokeToken(serial string) (string, error) {
	jti, err := randutil.Hex(64)
	if err != nil {
		return "", err
	}
	now := time.Now()
	tok, err := provision.New(serial,
		token.WithJWTID(jti),
		token.WithKid(iss.jwk.KeyID),
		token.WithIssuer(iss.provisioner),
		token.WithAudience(iss.url.ResolveReference(&url.URL{Path: "/1.0/revoke"}).String()),
		token.WithValidity(now, now.Add(tokenLifetime)),
		token.WithSHA(fingerprint(iss.Root())),
	)
	if err != nil {
		return "", err
	}
	return tok.SignedString(iss.jwk.Algorithm, iss.jwk.Key)
}

// oidIssuingDistributionPoint is the CRL extension step-ca marks its lists
// with (critical), naming the URL it serves them at.
var oidIssuingDistributionPoint = asn1.ObjectIdentifier{2, 5, 29, 28}

// fetchCRL reads and parses step-ca's current revocation list.
func (iss *Issuer) fetchCRL(ctx context.Context) (*x509.RevocationList, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, iss.timeout)
	defer cancel()
	u := iss.url.ResolveReference(&url.URL{Path: "/1.0/crl"}).String()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("step-ca CRL: %w", err)
	}
	resp, err := iss.httpc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("step-ca at %s: read CRL: %w", iss.url, ctx.Err())
		}
		return nil, nil, iss.requestError("read CRL", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxCRLSize+1))
	if err != nil {
		return nil, nil, fmt.Errorf("step-ca at %s: read CRL: %w", iss.url, err)
	}
	if resp.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(body))
		var e struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(body, &e) == nil && e.Message != "" {
			msg = e.Message
		}
		switch resp.StatusCode {
		case http.StatusNotFound:
			return nil, nil, fmt.Errorf("step-ca at %s serves no CRL (HTTP 404: %s): enable it in step-ca's ca.json with %s, and reload step-ca", iss.url, msg, crlSettings)
		case http.StatusNotImplemented:
			return nil, nil, fmt.Errorf("step-ca at %s cannot keep a CRL without a database (HTTP 501: %s): configure one in ca.json (e.g. \"db\": {\"type\": \"bbolt\", ...}) and %s", iss.url, msg, crlSettings)
		}
		return nil, nil, fmt.Errorf("step-ca at %s: read CRL: HTTP %d: %s", iss.url, resp.StatusCode, msg)
	}
	if len(body) > maxCRLSize {
		return nil, nil, fmt.Errorf("step-ca at %s: read CRL: larger than %d bytes", iss.url, maxCRLSize)
	}
	der := body
	if b, _ := pem.Decode(body); b != nil && b.Type == "X509 CRL" {
		der = b.Bytes
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, nil, fmt.Errorf("step-ca at %s: parse CRL: %w", iss.url, err)
	}
	return crl, der, nil
}

// CRL fetches step-ca's current revocation list (GET /1.0/crl, DER),
// checks that the intermediate that issues the workload certificates
// signed it, and returns it as PEM with its validity. It implements
// issuer.Revoker.
//
// step-ca marks its list with an issuing distribution point; a TLS peer
// (BoringSSL in Envoy) uses such a list only for certificates that carry
// the same URL as a CRL distribution point, and refuses every other
// certificate for want of a list in scope. So unless the workload
// certificates carry it (the provisioner's template adds
// "crlDistributionPoints"), CRL fails with an error wrapping
// issuer.ErrCRLNotApplicable instead of returning a list that would cut
// the whole mesh.
func (iss *Issuer) CRL(ctx context.Context) (*issuer.CRL, error) {
	crl, der, err := iss.fetchCRL(ctx)
	if err != nil {
		return nil, err
	}
	inter := iss.inter.Load()
	if inter == nil {
		return nil, fmt.Errorf("step-ca at %s: CRL: no workload certificate signed yet, so the intermediate to check the CRL against is unknown", iss.url)
	}
	if !bytes.Equal(crl.RawIssuer, inter.RawSubject) {
		return nil, fmt.Errorf("step-ca at %s: the CRL is issued by %q, not by %q, the intermediate that signs the workload certificates", iss.url, crl.Issuer, inter.Subject)
	}
	if err := crl.CheckSignatureFrom(inter); err != nil {
		return nil, fmt.Errorf("step-ca at %s: the CRL's signature does not verify against the intermediate %q: %w", iss.url, inter.Subject, err)
	}
	if crl.NextUpdate.IsZero() || !crl.NextUpdate.After(crl.ThisUpdate) {
		return nil, fmt.Errorf("step-ca at %s: the CRL has no usable next update (this update %s, next update %s): set crl.cacheDuration in ca.json",
			iss.url, crl.ThisUpdate.Format(time.RFC3339), crl.NextUpdate.Format(time.RFC3339))
	}
	if idp, ok := issuingDistributionPoints(crl); ok {
		var have []string
		if p := iss.leafCRLDP.Load(); p != nil {
			have = *p
		}
		if !slices.ContainsFunc(idp, func(u string) bool { return slices.Contains(have, u) }) {
			return nil, fmt.Errorf("%w: step-ca's CRL names the distribution point %s, which the certificates of provisioner %q do not carry (they carry %v); use the x509 template of deploy/step-ca, which adds it from the token, and restart sds-server after enabling the CRL (a TLS peer would otherwise refuse every certificate)",
				issuer.ErrCRLNotApplicable, strings.Join(idp, ", "), iss.provisioner, have)
		}
	}
	return &issuer.CRL{
		PEM:        pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}),
		ThisUpdate: crl.ThisUpdate.UTC(), NextUpdate: crl.NextUpdate.UTC(),
	}, nil
}

// issuingDistributionPoints returns the URIs of the distribution point a
// CRL's issuing distribution point extension names, and whether it names
// one at all (a name that is not a URI counts, with no URI).
func issuingDistributionPoints(crl *x509.RevocationList) ([]string, bool) {
	for _, ext := range crl.Extensions {
		if !ext.Id.Equal(oidIssuingDistributionPoint) {
			continue
		}
		// IssuingDistributionPoint ::= SEQUENCE {
		//   distributionPoint [0] DistributionPointName OPTIONAL, ... }
		// DistributionPointName ::= CHOICE { fullName [0] GeneralNames, ... }
		var seq asn1.RawValue
		if _, err := asn1.Unmarshal(ext.Value, &seq); err != nil {
			return nil, true
		}
		var dp asn1.RawValue
		if _, err := asn1.Unmarshal(seq.Bytes, &dp); err != nil || dp.Class != asn1.ClassContextSpecific || dp.Tag != 0 {
			return nil, false // no distribution point: the list applies to everything
		}
		var name asn1.RawValue
		if _, err := asn1.Unmarshal(dp.Bytes, &name); err != nil || name.Tag != 0 {
			return nil, true
		}
		var uris []string
		for rest := name.Bytes; len(rest) > 0; {
			var gn asn1.RawValue
			var err error
			if rest, err = asn1.Unmarshal(rest, &gn); err != nil {
				break
			}
			if gn.Class == asn1.ClassContextSpecific && gn.Tag == 6 { // uniformResourceIdentifier
				uris = append(uris, string(gn.Bytes))
			}
		}
		return uris, true
	}
	return nil, false
}

// learnCRLDistributionPoint reads the distribution point step-ca marks its
// CRL with, so that every workload certificate issued from now on carries it
// (through the token's "sds" claim and the template) and step-ca's CRL
// applies to them. Without a CRL at step-ca it leaves certificates as they
// are: revocation then relies on the stream cut and the deny list.
func (iss *Issuer) learnCRLDistributionPoint(ctx context.Context) {
	crl, _, err := iss.fetchCRL(ctx)
	if err != nil {
		return
	}
	if idp, ok := issuingDistributionPoints(crl); ok && len(idp) > 0 {
		iss.crlDP.Store(&idp[0])
	}
}
