package sds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strconv"
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
	if err := s.refreshCRL(ctx); err != nil {
		return rec, fmt.Errorf("node %s is revoked, but the revocation list could not be published yet (retrying): %w", id, err)
	}
	return rec, nil
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
// sign one).
func (s *Server) refreshCRL(ctx context.Context) (err error) {
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
		return fmt.Errorf("read revocations: %w", err)
	}
	deny, err := revokedDenyList(hashes)
	if err != nil {
		return err
	}
	s.pubMu.Lock()
	s.publishRevoked(deny)
	s.pubMu.Unlock()

	if signer, ok := s.cfg.Issuer.(issuer.CRLSigner); ok {
		number, err := s.nextCRLNumber(ctx)
		if err != nil {
			return err
		}
		crl, err := signer.SignCRL(ctx, number, entries, now.Add(-issuer.Backdate), now.Add(s.cfg.CRLPeriod))
		if err != nil {
			return fmt.Errorf("sign revocation list: %w", err)
		}
		s.pubMu.Lock()
		err = s.publishRootCA(s.rootCA.Load().roots, crl)
		s.pubMu.Unlock()
		if err != nil {
			return err
		}
		s.log.Info("revocation list published", "crl_number", number.String(), "entries", len(entries),
			"next_update", crl.NextUpdate.Format(time.RFC3339))
	}
	s.lastRevocationRefresh.Store(now.UnixNano())
	for _, k := range expired {
		if err := s.cfg.Store.Delete(ctx, bucketRevoked, k); err != nil {
			s.log.Warn("could not drop an expired revocation", "serial", k, "error", err)
		}
	}
	return nil
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
		last := time.Unix(0, s.lastRevocationRefresh.Load())
		if s.now().Before(last.Add(s.cfg.CRLPeriod / 2)) {
			continue
		}
		if err := s.refreshCRL(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("revocation list refresh failed; retrying", "error", err)
		}
	}
}

// crlAtRisk reports a revocation list within 10 % of its expiry.
func (s *Server) crlAtRisk() error {
	b := s.rootCA.Load()
	if b == nil || b.crl == nil {
		return nil
	}
	if left := b.crl.NextUpdate.Sub(s.now()); left < s.cfg.CRLPeriod/10 {
		return fmt.Errorf("revocation list expires at %s and could not be re-signed", b.crl.NextUpdate.Format(time.RFC3339))
	}
	return nil
}
