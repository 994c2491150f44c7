package stepca

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// trustSet is the set of step-ca roots sds-server trusts: the roots step-ca
// serves at /roots, read over TLS verified against the previous set. It
// starts from the configured pin (ca.root_fingerprint / ca.root_file) and
// follows step-ca through a root rotation: a root added to step-ca's
// ca.json is trusted once step-ca, authenticated by a root already trusted,
// lists it; a root removed from ca.json is dropped. The set is immutable;
// the Issuer swaps it atomically.
type trustSet struct {
	roots []*x509.Certificate // the first is what new bootstrap tokens pin
	pool  *x509.CertPool
}

func newTrustSet(roots []*x509.Certificate) *trustSet {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	return &trustSet{roots: roots, pool: pool}
}

func (t *trustSet) contains(c *x509.Certificate) bool {
	return slices.ContainsFunc(t.roots, c.Equal)
}

func (t *trustSet) equal(roots []*x509.Certificate) bool {
	return slices.EqualFunc(t.roots, roots, func(a, b *x509.Certificate) bool { return a.Equal(b) })
}

// issuerOf returns the trusted root that signed c, nil if none.
func (t *trustSet) issuerOf(c *x509.Certificate) *x509.Certificate {
	for _, r := range t.roots {
		if c.Equal(r) || c.CheckSignatureFrom(r) == nil {
			return r
		}
	}
	return nil
}

// orderRoots returns served in the order the trust bundle keeps: first
// the root sds-server's own certificate chains to (serving, if served),
// since new bootstrap tokens must pin what the handshake shows; else the
// root that signed the intermediate step-ca signs with now (inter); then
// the roots already trusted, in their order; then new ones, in step-ca's
// order.
func orderRoots(served, trusted []*x509.Certificate, serving, inter *x509.Certificate) []*x509.Certificate {
	out := make([]*x509.Certificate, 0, len(served))
	add := func(c *x509.Certificate) {
		if !slices.ContainsFunc(out, c.Equal) && slices.ContainsFunc(served, c.Equal) {
			out = append(out, c)
		}
	}
	if serving != nil {
		add(serving)
	}
	if inter != nil && len(out) == 0 {
		for _, r := range served {
			if inter.CheckSignatureFrom(r) == nil {
				add(r)
				break
			}
		}
	}
	for _, r := range trusted {
		add(r)
	}
	for _, r := range served {
		add(r)
	}
	return out
}

// verifyConnection checks step-ca's TLS certificate against the current
// trust set (read at each handshake, so a moved pin applies to the next
// connection without a new client) and the host name.
func (iss *Issuer) verifyConnection(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("step-ca presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		DNSName:       cs.ServerName,
		Roots:         iss.trust.Load().pool,
		Intermediates: inter,
	})
	if err != nil {
		return &tls.CertificateVerificationError{UnverifiedCertificates: cs.PeerCertificates, Err: err}
	}
	return nil
}

// trustState is what the state file keeps: the roots learned from step-ca,
// and the configured pin they descend from. A state whose pin is not the
// configured one is ignored (the operator re-pinned).
type trustState struct {
	// PinnedFrom are the fingerprints of the configured pin.
	PinnedFrom []string `json:"pinned_from"`
	// Roots are the PEM roots trusted when the file was written.
	Roots string `json:"roots"`
}

// loadTrustState reads the roots learned from step-ca for the configured
// pin; none when the file does not exist or was written for another pin.
func loadTrustState(path string, pin []string) ([]*x509.Certificate, error) {
	if path == "" {
		return nil, nil
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("step-ca trust state: %w", err)
	}
	var st trustState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("step-ca trust state %s is corrupt (%v): delete it to trust the configured root again", path, err)
	}
	if !slices.Equal(st.PinnedFrom, pin) {
		return nil, nil
	}
	var roots []*x509.Certificate
	for rest := []byte(st.Roots); ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("step-ca trust state %s is corrupt (%v): delete it to trust the configured root again", path, err)
		}
		roots = append(roots, c)
	}
	return roots, nil
}

// saveTrustState writes the trusted roots, crash-safe (a complete temporary
// file renamed over the old one).
func saveTrustState(path string, pin []string, roots []*x509.Certificate) error {
	if path == "" {
		return nil
	}
	var b strings.Builder
	for _, r := range roots {
		b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw}))
	}
	data, err := json.MarshalIndent(trustState{PinnedFrom: pin, Roots: b.String()}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("step-ca trust state: %w", err)
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("step-ca trust state: %w", err)
	}
	if _, err := f.Write(append(data, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("step-ca trust state: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("step-ca trust state: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("step-ca trust state: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("step-ca trust state: %w", err)
	}
	return nil
}

// OnIntermediateChange sets f, called (once per change, from the Issue
// that saw it) when step-ca starts signing with another intermediate: the
// SDS listener's certificate should then move to it (ServingCert.RenewSoon),
// so that what the handshake shows and what new tokens pin agree.
func (iss *Issuer) OnIntermediateChange(f func()) { iss.onInterChange.Store(&f) }

func (iss *Issuer) intermediateChanged(old, cur *x509.Certificate) {
	iss.log.Info("step-ca signs with another intermediate", "url", iss.url.String(),
		"old", old.Subject.String(), "new", cur.Subject.String(), "new_sha256", fingerprint(cur))
	if f := iss.onInterChange.Load(); f != nil {
		(*f)()
	}
}
