package sds

import (
	"context"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer/local"
)

// authenticateStale handles a token refused because it pins a root no
// longer in the trust bundle (wrongRoot). If it is a token of this server
// (created before a root rotation, see bootstrap.Registry.AuthenticateStale)
// the stream is accepted with the refusal kept for any admission: the
// sidecars it bootstrapped before the rotation must keep reconnecting and
// renewing (their own connection to this server verifies through the
// cross-signed root), while a new node with it is refused with wrongRoot's
// message (create a new token). A token unknown here keeps wrongRoot.
func (s *Server) authenticateStale(ctx context.Context, raw string, wrongRoot *bootstrap.AuthError) (bootstrap.Record, *bootstrap.AuthError, error) {
	rec, err := s.cfg.Tokens.AuthenticateStale(ctx, raw)
	if ae, ok := bootstrap.AsAuthError(err); ok && ae.Reason == bootstrap.ReasonWrongRoot {
		return bootstrap.Record{}, nil, wrongRoot
	}
	if err != nil {
		return bootstrap.Record{}, nil, err
	}
	return rec, wrongRoot, nil
}

// outsideBundle reports whether cs chains to no root of the trust bundle:
// a certificate issued under a root a rotation has since removed (its node
// was away during the rotation). A reconnecting node gets a new certificate
// instead of it. Judged for the built-in CA only (a rotation driver is
// set), whose chains are leaf, intermediate[, cross-signed root]; another
// backend's certificates are never outside.
func (s *Server) outsideBundle(cs *certState) bool {
	if s.rotation.Load() == nil {
		return false
	}
	iss := chainIssuer(cs)
	for _, r := range s.Roots() {
		if local.UnderRoot(iss, r) {
			return false
		}
	}
	return true
}
