package sds

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/store"
)

// TokenAction says what revoking a node does with the bootstrap token that
// admitted it, so that the token's holder cannot simply join again under
// another node.id.
type TokenAction int

// Token actions of RevokeNodeWith.
const (
	// TokenAuto revokes a single-use token (MaxUses 1) with the node,
	// leaves alone a token that admits no new node anyway (revoked,
	// expired, exhausted), and refuses (*SharedTokenError, nothing
	// revoked) when a multi-use or unlimited token could still admit one.
	TokenAuto TokenAction = iota
	// TokenKeep revokes only the node; the token keeps admitting.
	TokenKeep
	// TokenRevoke revokes the token too, whatever its use limit: the
	// streams of its other nodes end as well (RevokeToken).
	TokenRevoke
)

// ErrTokenNotRevoked is wrapped by RevokeNodeWith's error when the node was
// revoked but its token could not be.
var ErrTokenNotRevoked = errors.New("the node's bootstrap token was not revoked")

// SharedTokenError refuses a node revocation that would leave a multi-use
// token able to admit a replacement. Nothing was revoked.
type SharedTokenError struct {
	NodeID string
	Token  bootstrap.Record
	// Others counts the token's other nodes that are not revoked.
	Others int
}

// Error names the token and the two ways on.
func (e *SharedTokenError) Error() string {
	left := "unlimited uses"
	if e.Token.MaxUses > 0 {
		left = fmt.Sprintf("%d of %d uses left", e.Token.MaxUses-e.Token.Uses, e.Token.MaxUses)
	}
	return fmt.Sprintf("node %s was admitted by bootstrap token %s, which can still admit new nodes (%s, until %s): "+
		"revoking only the node would let the token's holder join again under another node id. Nothing was revoked. "+
		"Run again with --revoke-token (API: revoke_token=true) to revoke the token too: the streams of its %d other node(s) end and they cannot reconnect; "+
		"or with --keep-token (API: keep_token=true) to revoke only the node",
		e.NodeID, e.Token.ID, left, e.Token.ExpiresAt.UTC().Format(time.RFC3339), e.Others)
}

// NodeRevocation is what RevokeNodeWith did.
type NodeRevocation struct {
	// Node is the revoked node's record.
	Node *Node
	// Token is the record of the node's token (after its revocation, if
	// revoked here); nil if the token no longer exists.
	Token *bootstrap.Record
	// TokenRevoked is true when this call revoked the token.
	TokenRevoked bool
	// TokenNote says, for the operator, what happened to the token and why.
	TokenNote string
}

// RevokeNodeWith revokes node id (RevokeNode) and deals with its token as
// action says. The decision about the token is made before anything is
// revoked: a *SharedTokenError revokes nothing. When the node is revoked
// but its token could not be, the result is returned with an error
// wrapping ErrTokenNotRevoked; an error with a result and without it is
// RevokeNode's (the CA or the revocation list did not follow yet).
func (s *Server) RevokeNodeWith(ctx context.Context, id, reason string, action TokenAction) (*NodeRevocation, error) {
	n, err := s.nodes.get(ctx, id)
	if err != nil {
		return nil, err
	}
	out := &NodeRevocation{}
	tok, err := s.cfg.Tokens.Get(ctx, n.TokenID)
	switch {
	case errors.Is(err, store.ErrNotFound):
		out.TokenNote = fmt.Sprintf("token %s no longer exists", n.TokenID)
	case err != nil:
		return nil, fmt.Errorf("revoke node %s: read its bootstrap token: %w", id, err)
	default:
		out.Token = &tok
	}
	revokeToken := false
	if out.Token != nil {
		status := tok.Status(s.now())
		switch {
		case action == TokenKeep:
			out.TokenNote = fmt.Sprintf("token %s kept (%s, as asked)", tok.ID, status)
		case action == TokenRevoke || tok.MaxUses == 1:
			revokeToken = true
		case status != "active":
			out.TokenNote = fmt.Sprintf("token %s left as is: it admits no new node (%s)", tok.ID, status)
		default:
			others, err := s.otherNodes(ctx, tok.ID, id)
			if err != nil {
				return nil, fmt.Errorf("revoke node %s: %w", id, err)
			}
			return nil, &SharedTokenError{NodeID: id, Token: tok, Others: others}
		}
	}
	rec, nodeErr := s.RevokeNode(ctx, id, reason)
	if rec == nil {
		return nil, nodeErr
	}
	out.Node = rec
	if !revokeToken {
		return out, nodeErr
	}
	trec, _, err := s.RevokeToken(ctx, tok.ID, false)
	if err != nil {
		s.log.Error("node revoked, but its token could not be revoked", "node_id", id, "token_id", tok.ID, "error", err)
		return out, fmt.Errorf("node %s is revoked (its streams are closed, its certificates on the revocation list), but %w: %w; run `sds-server token revoke %s`",
			id, ErrTokenNotRevoked, err, tok.ID)
	}
	out.Token, out.TokenRevoked = &trec, true
	out.TokenNote = fmt.Sprintf("token %s revoked too", tok.ID)
	if tok.MaxUses == 1 && action != TokenRevoke {
		out.TokenNote += " (single-use)"
	}
	return out, nodeErr
}

// otherNodes counts the nodes of token tokenID, other than except, that are
// not revoked.
func (s *Server) otherNodes(ctx context.Context, tokenID, except string) (int, error) {
	nodes, err := s.nodes.list(ctx)
	if err != nil {
		return 0, fmt.Errorf("list the token's nodes: %w", err)
	}
	n := 0
	for _, nd := range nodes {
		if nd.TokenID == tokenID && nd.ID != except && nd.Status != NodeRevoked {
			n++
		}
	}
	return n, nil
}
