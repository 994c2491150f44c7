package sds

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/issuer"
)

// Buckets of the revocation state in the store.
const (
	bucketRevoked = "revoked_certs" // serial (hex) -> revokedCert
	bucketMeta    = "meta"
	keyCRLNumber  = "crl_number"
)

// DefaultCRLPeriod is how long a signed revocation list stays valid; it is
// re-signed at half of it, so sidecars never hold an expired one.
const DefaultCRLPeriod = time.Hour

// revokedCert is a revoked certificate kept until it expires.
type revokedCert struct {
	Serial    string    `json:"serial"`
	NodeID    string    `json:"node_id"`
	NotAfter  time.Time `json:"not_after"`
	RevokedAt time.Time `json:"revoked_at"`
	SHA256    string    `json:"sha256,omitempty"`
}

// IssuedCert is a certificate issued to a node, kept in its record until it
// expires so that revoking the node revokes every one still valid.
type IssuedCert struct {
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	// SHA256 is the hex digest of the DER, what Envoy's XFCC Hash shows.
	SHA256 string `json:"sha256,omitempty"`
}

// ErrNodeRevoked is returned when a revoked node would be issued a
// certificate.
var ErrNodeRevoked = errors.New("node is revoked")

// RevokeNode revokes a node at once: its record is marked revoked (new
// streams are refused from then on), no further certificate is issued to
// it, its open streams end with PermissionDenied, and every certificate
// issued to it that has not expired goes on the revocation list pushed to
// every sidecar. Revoking a revoked node again changes nothing.
func (s *Server) RevokeNode(ctx context.Context, id, reason string) (*Node, error) {
	now := s.now().UTC()
	already := false
	rec, err := s.nodes.update(ctx, id, func(n *Node) error {
		already = false // fn may run more than once (store.Store.Update)
		if n.Status == NodeRevoked {
			already = true
			return nil
		}
		n.Status, n.RevokedAt, n.RevokeReason = NodeRevoked, now, reason
		return nil
	})
	if err != nil {
		return nil, err
	}
	if already {
		return rec, nil
	}
	for _, c := range rec.Certs {
		if !c.NotAfter.After(now) {
			continue
		}
		b, err := json.Marshal(revokedCert{Serial: c.Serial, NodeID: id, NotAfter: c.NotAfter, RevokedAt: now, SHA256: c.SHA256})
		if err != nil {
			return nil, err
		}
		if err := s.cfg.Store.Put(ctx, bucketRevoked, c.Serial, b); err != nil {
			return nil, fmt.Errorf("record revoked certificate %s: %w", c.Serial, err)
		}
	}

	s.mu.Lock()
	ln := s.live[id]
	var ends []func(error)
	for _, st := range s.streams {
		if st.node == ln && ln != nil {
			ends = append(ends, st.end)
		}
	}
	s.mu.Unlock()
	if ln != nil {
		ln.revoked.Store(true)
		ln.mu.Lock() // wait for an issuance in flight; none starts after this
		ln.mu.Unlock()
		s.sched.unschedule(ln)
		msg := fmt.Sprintf("node %s has been revoked", id)
		if reason != "" {
			msg += ": " + reason
		}
		for _, end := range ends {
			end(endStreamWith(status.New(codes.PermissionDenied, msg)))
		}
	}
	s.log.Warn("node revoked", "node_id", id, "service", rec.Service, "env", rec.Env, "reason", reason,
		"certificates_revoked", len(rec.Certs), "streams_closed", len(ends))
	// A CA that keeps its own list (step-ca) learns of every certificate
	// still valid, before its list is fetched. A failure leaves the node
	// revoked here, and the deny list still applies.
	var caErrs []error
	if rv, ok := s.cfg.Issuer.(issuer.Revoker); ok {
		if _, signs := s.cfg.Issuer.(issuer.CRLSigner); !signs {
			caErrs = s.revokeAtCA(ctx, rv, id, rec.Certs, now, reason)
		}
	}
	caCRLErr, err := s.refreshRevocations(ctx)
	if err != nil {
		caErrs = append(caErrs, fmt.Errorf("the revocation list could not be published yet (retrying): %w", err))
	} else if caCRLErr != nil {
		caErrs = append(caErrs, fmt.Errorf("the CA's revocation list could not be published yet (retrying): %w", caCRLErr))
	}
	if len(caErrs) > 0 {
		return rec, fmt.Errorf("node %s is revoked (its streams are closed and the deny list applies), but: %w", id, errors.Join(caErrs...))
	}
	return rec, nil
}

// revokeAtCA has a Revoker issuer revoke every certificate of node id that
// has not expired, going on after a failure (each logged); the error, if
// any, names the serials the CA did not revoke.
func (s *Server) revokeAtCA(ctx context.Context, rv issuer.Revoker, id string, certs []IssuedCert, now time.Time, reason string) []error {
	var failed []string
	var first error
	revoked := 0
	for _, c := range certs {
		if !c.NotAfter.After(now) {
			continue
		}
		serial, ok := new(big.Int).SetString(c.Serial, 16)
		if !ok {
			failed = append(failed, c.Serial)
			first = cmp.Or(first, fmt.Errorf("bad serial %q", c.Serial))
			continue
		}
		if err := rv.Revoke(ctx, serial, reason); err != nil {
			s.log.Error("the CA could not revoke a certificate; the deny list still refuses it", "node_id", id, "serial", c.Serial, "error", err)
			failed = append(failed, c.Serial)
			first = cmp.Or(first, err)
			continue
		}
		revoked++
	}
	if len(failed) > 0 {
		return []error{fmt.Errorf("the CA did not revoke certificate(s) %s (%d revoked there): %w", strings.Join(failed, ", "), revoked, first)}
	}
	if revoked > 0 {
		s.log.Info("certificates revoked at the CA", "node_id", id, "certificates", revoked)
	}
	return nil
}

// RevokeTokenNodes revokes every node admitted with a token.
func (s *Server) RevokeTokenNodes(ctx context.Context, tokenID, reason string) ([]string, error) {
	nodes, err := s.nodes.list(ctx)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, n := range nodes {
		if n.TokenID != tokenID || n.Status == NodeRevoked {
			continue
		}
		if _, err := s.RevokeNode(ctx, n.ID, reason); err != nil {
			return ids, err
		}
		ids = append(ids, n.ID)
	}
	return ids, nil
}

// refreshCRL rebuilds what enforces revocations from the store, dropping
// entries whose certificate has expired: the revoked-certificates RBAC deny
// list (every issuer) and the signed CRL carried in ROOTCA (issuers that
// sign one, or the CA's own list for an issuer.Revoker). A Revoker's list
// that cannot be fetched is logged and retried by crlLoop, and is no error
// here: the rest is in force.
func (s *Server) refreshCRL(ctx context.Context) error {
	_, err := s.refreshRevocations(ctx)
	return err
}

// refreshRevocations is refreshCRL, which also returns why a Revoker's
// list could not be published (caCRLErr).
func (s *Server) refreshRevocations(ctx context.Context) (caCRLErr, err error) {
	s.crlMu.Lock()
	defer s.crlMu.Unlock()
	defer func() {
		if err != nil {
			// Retry at crlLoop's next tick, not half a period after the
			// last success: a revocation must not wait that long.
			s.lastRevocationRefresh.Store(0)
		}
	}()
	now := s.now().UTC()
	var entries []issuer.RevokedCertificate
	var hashes, expired []string
	err = s.cfg.Store.List(ctx, bucketRevoked, func(key string, value []byte) error {
		var r revokedCert
		if err := json.Unmarshal(value, &r); err != nil {
			return fmt.Errorf("revoked certificate %s: corrupt record: %w", key, err)
		}
		if !r.NotAfter.After(now) {
			expired = append(expired, key)
			return nil
		}
		serial, ok := new(big.Int).SetString(r.Serial, 16)
		if !ok {
			return fmt.Errorf("revoked certificate %s: bad serial", key)
		}
		entries = append(entries, issuer.RevokedCertificate{SerialNumber: serial, RevokedAt: r.RevokedAt})
		if r.SHA256 != "" {
			hashes = append(hashes, r.SHA256)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read revocations: %w", err)
	}
	deny, err := revokedDenyList(hashes)
	if err != nil {
		return nil, err
	}
	s.pubMu.Lock()
	s.publishRevoked(deny)
	s.pubMu.Unlock()

	if signer, ok := s.cfg.Issuer.(issuer.CRLSigner); ok {
		number, err := s.nextCRLNumber(ctx)
		if err != nil {
			return nil, err
		}
		crl, err := signer.SignCRL(ctx, number, entries, now.Add(-issuer.Backdate), now.Add(s.cfg.CRLPeriod))
		if err != nil {
			return nil, fmt.Errorf("sign revocation list: %w", err)
		}
		s.pubMu.Lock()
		err = s.publishRootCA(s.rootCA.Load().roots, crl)
		s.pubMu.Unlock()
		if err != nil {
			return nil, err
		}
		s.log.Info("revocation list published", "crl_number", number.String(), "entries", len(entries),
			"next_update", crl.NextUpdate.Format(time.RFC3339))
	} else if rv, ok := s.cfg.Issuer.(issuer.Revoker); ok {
		if caCRLErr = s.publishRevokerCRL(ctx, rv, now); caCRLErr != nil {
			s.revokerCRLFailedAt.Store(now.UnixNano())
			b := s.rootCA.Load()
			if b.crl != nil {
				s.log.Error("the CA's revocation list could not be refreshed; keeping the last one", "error", caCRLErr,
					"next_update", b.crl.NextUpdate.Format(time.RFC3339))
			} else {
				s.log.Error("the CA's revocation list could not be published; revocation relies on the deny list until it is", "error", caCRLErr)
			}
		} else {
			s.revokerCRLFailedAt.Store(0)
		}
	}
	s.lastRevocationRefresh.Store(now.UnixNano())
	for _, k := range expired {
		if err := s.cfg.Store.Delete(ctx, bucketRevoked, k); err != nil {
			s.log.Warn("could not drop an expired revocation", "serial", k, "error", err)
		}
	}
	return caCRLErr, nil
}

// publishRevokerCRL fetches a Revoker issuer's own list and carries it in
// ROOTCA, unless it expires within crlMinValidity (an expired list makes
// sidecars refuse every certificate): then the last good one stays, and
// crlAtRisk makes the server not ready as that one nears its end. A list
// older than the one published is not taken either. A list that does not
// apply to the workload certificates (issuer.ErrCRLNotApplicable) is only
// warned about: revocation relies on the deny list, as without a CRL.
func (s *Server) publishRevokerCRL(ctx context.Context, rv issuer.Revoker, now time.Time) error {
	crl, err := rv.CRL(ctx)
	if errors.Is(err, issuer.ErrCRLNotApplicable) {
		s.log.Warn("the CA's revocation list is not published to sidecars; revocation relies on the deny list", "error", err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("fetch the CA's revocation list: %w", err)
	}
	if left := crl.NextUpdate.Sub(now); left < crlMinValidity(crl) {
		return fmt.Errorf("the CA's revocation list (this update %s) expires at %s, too soon to hand to sidecars: is the CA re-signing it (step-ca: crl.cacheDuration, crl.renewPeriod)?",
			crl.ThisUpdate.Format(time.RFC3339), crl.NextUpdate.Format(time.RFC3339))
	}
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	b := s.rootCA.Load()
	if b.crl != nil && crl.ThisUpdate.Before(b.crl.ThisUpdate) {
		return fmt.Errorf("the CA returned a revocation list of %s, older than the one published (%s); keeping that one",
			crl.ThisUpdate.Format(time.RFC3339), b.crl.ThisUpdate.Format(time.RFC3339))
	}
	if err := s.publishRootCA(b.roots, crl); err != nil {
		return err
	}
	if b.crl == nil || !bytes.Equal(b.crl.PEM, crl.PEM) {
		s.log.Info("the CA's revocation list published", "this_update", crl.ThisUpdate.Format(time.RFC3339),
			"next_update", crl.NextUpdate.Format(time.RFC3339))
	}
	return nil
}

// crlMinValidity is how long a CA's list must still be valid to be handed
// to sidecars: a tenth of its validity, at most a minute.
func crlMinValidity(crl *issuer.CRL) time.Duration {
	return min(time.Minute, crl.NextUpdate.Sub(crl.ThisUpdate)/10)
}

// nextCRLNumber returns the next CRL number, persisted so it keeps growing
// across restarts.
func (s *Server) nextCRLNumber(ctx context.Context) (*big.Int, error) {
	var n int64
	err := s.cfg.Store.Update(ctx, bucketMeta, keyCRLNumber, func(old []byte) ([]byte, error) {
		n = 0
		if old != nil {
			v, err := strconv.ParseInt(string(old), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("corrupt CRL number %q: %w", old, err)
			}
			n = v
		}
		n++
		return []byte(strconv.FormatInt(n, 10)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("next CRL number: %w", err)
	}
	return big.NewInt(n), nil
}

// crlLoop rebuilds the revocation list and deny list at half the CRL
// period (and retries failures every few seconds), so no sidecar ever holds
// an expired CRL and entries drop off once their certificates expire.
func (s *Server) crlLoop(ctx context.Context) {
	tick := time.NewTicker(min(s.cfg.CRLPeriod/8, 5*time.Second))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if s.now().Before(s.nextRevocationRefresh()) {
			continue
		}
		if err := s.refreshCRL(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("revocation list refresh failed; retrying", "error", err)
		}
	}
}

// nextRevocationRefresh is when crlLoop next rebuilds the revocations: half
// a CRL period after the last time; for a CA's own list (issuer.Revoker)
// also at the latest half-way to its NextUpdate, and, while fetching it
// fails, within revokerCRLRetry.
func (s *Server) nextRevocationRefresh() time.Time {
	last := time.Unix(0, s.lastRevocationRefresh.Load())
	next := last.Add(s.cfg.CRLPeriod / 2)
	if _, signs := s.cfg.Issuer.(issuer.CRLSigner); signs {
		return next
	}
	if _, ok := s.cfg.Issuer.(issuer.Revoker); !ok {
		return next
	}
	if b := s.rootCA.Load(); b != nil && b.crl != nil && b.crl.NextUpdate.After(last) {
		next = minTime(next, last.Add(b.crl.NextUpdate.Sub(last)/2))
	}
	if f := s.revokerCRLFailedAt.Load(); f != 0 {
		next = minTime(next, time.Unix(0, f).Add(min(s.cfg.CRLPeriod/2, revokerCRLRetry)))
	}
	return next
}

// revokerCRLRetry is how soon a CA's list that could not be fetched is
// fetched again.
const revokerCRLRetry = 30 * time.Second

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// crlAtRisk reports a revocation list within 10 % of its expiry (of the CRL
// period, or of the list's own validity if that is shorter).
func (s *Server) crlAtRisk() error {
	b := s.rootCA.Load()
	if b == nil || b.crl == nil {
		return nil
	}
	if left := b.crl.NextUpdate.Sub(s.now()); left < min(s.cfg.CRLPeriod, b.crl.NextUpdate.Sub(b.crl.ThisUpdate))/10 {
		return fmt.Errorf("revocation list expires at %s and could not be re-signed", b.crl.NextUpdate.Format(time.RFC3339))
	}
	return nil
}
