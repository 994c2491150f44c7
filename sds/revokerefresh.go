package sds

import "context"

// RefreshRevocations re-signs the revocation list now and pushes the
// ROOTCA carrying it to every stream, without waiting for the CRL period.
// The built-in CA calls for it when its intermediates change: a new
// intermediate must have its list on every sidecar before it signs a
// certificate, since Envoy refuses a certificate whose issuer has no list.
func (s *Server) RefreshRevocations(ctx context.Context) error {
	return s.refreshCRL(ctx)
}
