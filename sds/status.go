package sds

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// StatusReport is the answer to GET /v1/status (`sds-server status`): is the
// server ready and why not, and what an operator checks first — nodes,
// renewals, CA and CRL expiry, policy errors. Field names are stable.
type StatusReport struct {
	// Ready is what /readyz answers: false makes `status` exit 1.
	Ready bool `json:"ready"`
	// Reasons say why the server is not ready; empty when it is.
	Reasons []string `json:"reasons"`
	// Warnings are problems that do not make the server unready (yet).
	Warnings []string `json:"warnings"`
	// Time is the server's clock when the report was made.
	Time        time.Time    `json:"time"`
	TrustDomain string       `json:"trust_domain"`
	Nodes       NodeCounts   `json:"nodes"`
	CA          CAStatus     `json:"ca"`
	Policy      PolicyHealth `json:"policy"`
	// Rotation is the built-in CA's root rotation in progress or done
	// since start (carotation.go); null when none.
	Rotation *RotationStatus `json:"rotation"`
}

// NodeCounts counts nodes for StatusReport.
type NodeCounts struct {
	// Total is every node in the registry, revoked ones included.
	Total   int `json:"total"`
	Revoked int `json:"revoked"`
	// Connected counts the nodes with at least one open xDS stream;
	// Streams the open streams bound to a node.
	Connected int `json:"connected"`
	Streams   int `json:"streams"`
	// RenewalFailing counts connected nodes whose last renewal failed.
	RenewalFailing int `json:"renewal_failing"`
	// ServingStale counts connected nodes whose Envoy serves a
	// certificate past 90 % of its life.
	ServingStale int `json:"serving_stale"`
	// AtRisk counts connected nodes within 10 % of their certificate's
	// expiry with renewal failing: any makes the server not ready.
	AtRisk int `json:"at_risk"`
}

// CertExpiry names a CA certificate and when it expires.
type CertExpiry struct {
	Subject  string    `json:"subject"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
}

// CAStatus is the trust bundle, the issuing intermediate and the CRL.
type CAStatus struct {
	Roots []CertExpiry `json:"roots"`
	// Intermediate is the CA that signs workload certificates; null when
	// the issuer does not say and no certificate was issued since start.
	Intermediate *CertExpiry `json:"intermediate"`
	// CRL is the revocation list in ROOTCA; null when there is none.
	CRL *CRLStatus `json:"crl"`
}

// CRLStatus is the validity of the published revocation list.
type CRLStatus struct {
	ThisUpdate time.Time `json:"this_update"`
	NextUpdate time.Time `json:"next_update"`
}

// PolicyHealth sums up policy_dir's problems (`acl status` has the detail).
type PolicyHealth struct {
	Dir string `json:"dir"`
	// Invalid counts the service files whose current content is not in
	// force; InvalidFiles names them (relative to policy_dir).
	Invalid      int      `json:"invalid"`
	InvalidFiles []string `json:"invalid_files"`
	// Stray lists files that name no service or could not be read.
	Stray []string `json:"stray"`
	// Error is why policy_dir itself could not be read at the last poll.
	Error string `json:"error,omitempty"`
}

// intermediateSource is implemented by issuers that know the CA signing
// workload certificates (the built-in CA).
type intermediateSource interface {
	Intermediate() *x509.Certificate
}

// Status reports the server's health for GET /v1/status.
func (s *Server) Status(ctx context.Context) StatusReport {
	rep := StatusReport{Ready: true, Reasons: []string{}, Warnings: []string{}, Time: s.now().UTC(), TrustDomain: s.cfg.TrustDomain}
	if err := s.Ready(ctx); err != nil {
		rep.Ready = false
		rep.Reasons = splitJoined(err)
	}
	rep.Nodes = s.nodeCounts(ctx, &rep)
	rep.CA = s.caStatus()
	rep.Policy = s.policyHealth()
	if d := s.rotation.Load(); d != nil {
		rep.Rotation = d.Status()
	}
	if n := rep.Nodes.RenewalFailing; n > 0 {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("%d connected node(s) with renewal failing (see node list, last_error)", n))
	}
	if n := rep.Nodes.ServingStale; n > 0 {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("%d connected node(s) serving a certificate past 90%% of its life", n))
	}
	if p := rep.Policy; p.Invalid > 0 || len(p.Stray) > 0 {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("%d invalid and %d stray policy file(s) (see acl status)", p.Invalid, len(p.Stray)))
	}
	if e := rep.Policy.Error; e != "" {
		rep.Warnings = append(rep.Warnings, "policy_dir unreadable: "+e)
	}
	return rep
}

// splitJoined lists the errors an errors.Join made, or err alone.
func splitJoined(err error) []string {
	var out []string
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			out = append(out, splitJoined(e)...)
		}
		return out
	}
	return []string{err.Error()}
}

// nodeCounts counts the registry's and the live nodes; a registry that
// cannot be read is a warning in rep.
func (s *Server) nodeCounts(ctx context.Context, rep *StatusReport) NodeCounts {
	var c NodeCounts
	nodes, err := s.nodes.list(ctx)
	if err != nil {
		rep.Warnings = append(rep.Warnings, "node registry unreadable: "+err.Error())
	}
	c.Total = len(nodes)
	for _, n := range nodes {
		if n.Status == NodeRevoked {
			c.Revoked++
		}
	}
	s.mu.Lock()
	for _, ln := range s.live {
		if ln.streams > 0 {
			c.Connected++
			c.Streams += ln.streams
		}
	}
	s.mu.Unlock()
	c.RenewalFailing = s.nodesRenewalFailing()
	c.ServingStale = s.nodesServingStale()
	c.AtRisk = s.nodesAtRisk()
	return c
}

func certExpiry(c *x509.Certificate) CertExpiry {
	return CertExpiry{Subject: c.Subject.String(), Serial: serialHex(c), NotAfter: c.NotAfter.UTC()}
}

// caStatus reads the trust bundle and CRL the server publishes, and the
// intermediate from the issuer or, failing that, from the chain of a
// certificate issued since start.
func (s *Server) caStatus() CAStatus {
	st := CAStatus{Roots: []CertExpiry{}}
	if b := s.rootCA.Load(); b != nil {
		for _, r := range b.roots {
			st.Roots = append(st.Roots, certExpiry(r))
		}
		if b.crl != nil {
			st.CRL = &CRLStatus{ThisUpdate: b.crl.ThisUpdate.UTC(), NextUpdate: b.crl.NextUpdate.UTC()}
		}
	}
	if is, ok := s.cfg.Issuer.(intermediateSource); ok {
		if c := is.Intermediate(); c != nil {
			e := certExpiry(c)
			st.Intermediate = &e
			return st
		}
	}
	if c := s.issuedIntermediate(); c != nil {
		e := certExpiry(c)
		st.Intermediate = &e
	}
	return st
}

// issuedIntermediate returns the CA certificate that follows the leaf in
// the chain of the newest certificate held in memory, or nil.
func (s *Server) issuedIntermediate() *x509.Certificate {
	s.mu.Lock()
	var newest *certState
	for _, ln := range s.live {
		if cs := ln.cur.Load(); cs != nil && (newest == nil || cs.cert.IssuedAt.After(newest.cert.IssuedAt)) {
			newest = cs
		}
	}
	s.mu.Unlock()
	if newest == nil {
		return nil
	}
	rest := newest.cert.ChainPEM
	for i := 0; ; i++ {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil
		}
		if i == 0 || b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil || !c.IsCA {
			return nil
		}
		return c
	}
}

// policyHealth sums up the policy watcher's report.
func (s *Server) policyHealth() PolicyHealth {
	h := PolicyHealth{InvalidFiles: []string{}, Stray: []string{}}
	pw := s.policyWatch.Load()
	if pw == nil {
		return h
	}
	rep := pw.report()
	h.Dir, h.Error = rep.Dir, rep.Error
	for _, p := range rep.Services {
		if p.Error != "" {
			h.Invalid++
			h.InvalidFiles = append(h.InvalidFiles, p.File)
		}
	}
	h.Stray = append(h.Stray, rep.Stray...)
	return h
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.Status(r.Context()))
}

// NotReadyError is the one-line reason a StatusReport is not ready.
func (r StatusReport) NotReadyError() error {
	if r.Ready {
		return nil
	}
	return errors.New("not ready: " + strings.Join(r.Reasons, "; "))
}
