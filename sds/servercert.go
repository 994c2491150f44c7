package sds

import (
	"crypto/tls"
	"fmt"
	"sync"
	"time"
)

// ServingCert holds the SDS listener's own certificate and replaces it once
// two thirds of its life have passed, so a long-running server never serves
// an expired certificate to the sidecars that pin its root.
type ServingCert struct {
	issue   func() (tls.Certificate, error)
	now     func() time.Time
	mu      sync.Mutex
	cert    *tls.Certificate
	renewAt time.Time
}

// NewServingCert issues the first certificate with issue, which must return a
// chain whose Leaf is set.
func NewServingCert(issue func() (tls.Certificate, error), now func() time.Time) (*ServingCert, error) {
	if now == nil {
		now = time.Now
	}
	s := &ServingCert{issue: issue, now: now}
	if err := s.renew(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *ServingCert) renew() error {
	c, err := s.issue()
	if err != nil {
		return fmt.Errorf("issue the SDS server certificate: %w", err)
	}
	if c.Leaf == nil {
		return fmt.Errorf("issue the SDS server certificate: no parsed leaf")
	}
	s.cert = &c
	s.renewAt = s.now().Add(c.Leaf.NotAfter.Sub(s.now()) * 2 / 3)
	return nil
}

// GetCertificate is a tls.Config.GetCertificate: it serves the current
// certificate and renews it when due. A failed renewal keeps the current one
// (still valid for a third of its life) and retries on the next handshake.
func (s *ServingCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.now().After(s.renewAt) {
		if err := s.renew(); err != nil {
			s.renewAt = s.now().Add(time.Minute)
		}
	}
	return s.cert, nil
}

// RenewSoon makes the next handshake replace the certificate: the CA that
// signed it was replaced (its intermediate renewed), and the listener must
// move to the new one long before the old one expires.
func (s *ServingCert) RenewSoon() {
	s.mu.Lock()
	s.renewAt = time.Time{}
	s.mu.Unlock()
}

// TLSConfig returns the server TLS configuration of the SDS listener:
// TLS 1.2 at least (1.3 preferred by Go), HTTP/2 ALPN for gRPC.
func (s *ServingCert) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: s.GetCertificate,
		NextProtos:     []string{"h2"},
	}
}
