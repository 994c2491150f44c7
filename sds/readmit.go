package sds

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/meshid/sds-server/bootstrap"
)

// reasonNodeExpired labels the refusal of a node that was away until its
// certificates expired and whose token admits no new node.
const reasonNodeExpired = "node_expired"

// admissionEnd is when node n's admission lapses: when its newest
// certificate expires or, if it never got one, one certificate lifetime
// after it was admitted. The store record alone decides, so the rule holds
// after a restart, when the in-memory node is gone.
func admissionEnd(n *Node, certTTL time.Duration) time.Time {
	admitted := n.AdmittedAt
	if admitted.IsZero() {
		admitted = n.FirstSeen
	}
	end := admitted.Add(certTTL)
	if n.IssuedNotAfter.After(end) {
		end = n.IssuedNotAfter
	}
	return end
}

// readmitIfAway checks a known node that a new stream binds to. A node that
// has been away (no open stream) until its admission lapsed
// (admissionEnd) is indistinguishable from anyone holding its token and
// node.id: it comes back only as a new node would, if the token still
// admits one (not revoked, expired or exhausted), and that takes one more
// use of it. Otherwise the stream is refused with PermissionDenied
// (reasonNodeExpired). It runs under the node registry's lock (bind), so the
// several streams of a returning sidecar take one use, not one each.
func (s *Server) readmitIfAway(ctx context.Context, st *streamState, n *Node) (*Node, error) {
	if n.Status == NodeRevoked {
		return n, nil // refused by admit, without taking a use
	}
	now := s.now().UTC()
	end := admissionEnd(n, s.cfg.CertTTL)
	if now.Before(end) || s.hasOpenStreams(n.ID) {
		return n, nil
	}
	var tok bootstrap.Record
	var err error = st.staleRoot
	if st.staleRoot == nil {
		tok, err = s.cfg.Tokens.Admit(ctx, n.TokenID)
	}
	if ae, ok := bootstrap.AsAuthError(err); ok {
		return nil, &refusal{code: codes.PermissionDenied, reason: reasonNodeExpired, msg: fmt.Sprintf(
			"node %s was away until its certificate expired (%s) and must be admitted again like a new node, but %s; then write a new bootstrap for this sidecar",
			n.ID, end.UTC().Format(time.RFC3339), ae.Error())}
	}
	if err != nil {
		return nil, fmt.Errorf("readmit node %s: %w", n.ID, err)
	}
	back, err := s.nodes.update(ctx, n.ID, func(m *Node) error {
		m.AdmittedAt = now
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("readmit node %s: the token's use is spent but the node record was not updated: %w", n.ID, err)
	}
	uses := fmt.Sprintf("%d/unlimited", tok.Uses)
	if tok.MaxUses > 0 {
		uses = fmt.Sprintf("%d/%d", tok.Uses, tok.MaxUses)
	}
	s.log.Warn("node readmitted after its certificate expired: one more use of its token", "node_id", n.ID,
		"token_id", tok.ID, "token_uses", uses, "expired_at", end.UTC().Format(time.RFC3339), "peer", st.peer)
	return back, nil
}

// hasOpenStreams reports whether node id has a stream open now.
func (s *Server) hasOpenStreams(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	ln := s.live[id]
	return ln != nil && ln.streams > 0
}
