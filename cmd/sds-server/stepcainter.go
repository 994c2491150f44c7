package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/meshid/sds-server/issuer/stepca"
	"github.com/meshid/sds-server/sds"
)

// followStepCAIntermediate moves the SDS listener to step-ca's new
// intermediate as soon as step-ca signs with another one (a root rotation's
// switch), then re-reads the roots so that the root the listener's chain
// now ends with comes first: new bootstrap tokens pin what the handshake
// shows from the first one on.
func followStepCAIntermediate(ctx context.Context, log *slog.Logger, iss *stepca.Issuer, sc *sds.ServingCert, srv *sds.Server) {
	iss.OnIntermediateChange(func() {
		sc.RenewSoon()
		go func() {
			// Renews now rather than at the next handshake (a failure is
			// retried at a handshake a minute later, as ServingCert does).
			_, _ = sc.GetCertificate(nil)
			rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			defer cancel()
			if err := srv.RefreshRoots(rctx); err != nil {
				log.Warn("trust bundle refresh after step-ca's intermediate changed failed; retried at the next refresh", "error", err)
			}
		}()
	})
}
