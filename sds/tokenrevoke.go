package sds

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/sds-server/bootstrap"
)

// ErrTokenRevoked is returned when a certificate would be issued to a node
// whose bootstrap token has been revoked.
var ErrTokenRevoked = errors.New("bootstrap token is revoked")

// tokenRevokedMessage is what the streams of a revoked token's nodes see.
func tokenRevokedMessage(tokenID string) string {
	return fmt.Sprintf("bootstrap token %s was revoked; create a new one with `sds-server token create`", tokenID)
}

// tokenRevokedRefusal refuses a stream of a node whose token was revoked.
func tokenRevokedRefusal(tokenID string) *refusal {
	return &refusal{code: codes.PermissionDenied, reason: bootstrap.ReasonRevoked, msg: tokenRevokedMessage(tokenID)}
}

// RevokeToken revokes the bootstrap token id (or the token text): from now
// on it admits no node and authenticates no stream, every open stream
// authenticated with it (those of the nodes it admitted) ends at once with
// PermissionDenied, and those nodes get no further certificate; the
// certificates they hold stay valid until they expire. With withNodes the
// nodes are revoked too (RevokeNode: their certificates go on the
// revocation list). It returns the token's record and the nodes revoked.
// Revoking a revoked token again is not an error.
func (s *Server) RevokeToken(ctx context.Context, id string, withNodes bool) (bootstrap.Record, []string, error) {
	rec, err := s.cfg.Tokens.Revoke(ctx, id)
	if err != nil {
		return bootstrap.Record{}, nil, err
	}
	nodes, streams := s.cutToken(rec.ID)
	s.log.Warn("token revoked", "token_id", rec.ID, "service", rec.Service, "env", rec.Env,
		"nodes_cut", nodes, "streams_closed", streams, "revoke_nodes", withNodes)
	if !withNodes {
		return rec, nil, nil
	}
	ids, err := s.RevokeTokenNodes(ctx, rec.ID, "token "+rec.ID+" revoked")
	if err != nil {
		return rec, ids, fmt.Errorf("token %s is revoked and its nodes' streams are closed, but revoking its nodes stopped after %d: %w", rec.ID, len(ids), err)
	}
	return rec, ids, nil
}

// cutToken stops serving the nodes of a revoked token: no further
// certificate for them (including a node bound later by a stream
// authenticated before the revocation), and every stream authenticated
// with the token ends. An issuance in flight is waited for; it discards
// its certificate (issueLocked). It returns how many live nodes and
// streams it cut.
func (s *Server) cutToken(tokenID string) (nodes, streams int) {
	s.mu.Lock()
	if s.revokedTokens == nil {
		s.revokedTokens = make(map[string]struct{})
	}
	s.revokedTokens[tokenID] = struct{}{}
	var cut []*liveNode
	for _, ln := range s.live {
		if ln.rec.TokenID == tokenID {
			ln.tokenRevoked.Store(true)
			cut = append(cut, ln)
		}
	}
	var ends []func(error)
	for _, st := range s.streams {
		if st.token.ID == tokenID {
			ends = append(ends, st.end)
		}
	}
	s.mu.Unlock()
	msg := tokenRevokedMessage(tokenID)
	for _, end := range ends {
		end(endStreamWith(status.New(codes.PermissionDenied, msg)))
	}
	for _, ln := range cut {
		ln.mu.Lock() // wait for an issuance in flight; none starts after this
		ln.mu.Unlock()
		s.sched.unschedule(ln)
	}
	return len(cut), len(ends)
}
