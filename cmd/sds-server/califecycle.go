package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/sds-server/issuer/local"
	"github.com/meshid/sds-server/sds"
)

// caLifecycle connects the built-in CA's intermediate renewal to the rest
// of the server: a new intermediate's revocation list goes out at once (it
// must reach every sidecar before the intermediate signs anything), the
// SDS listener's own certificate moves to a newly activated intermediate,
// and renewals are counted.
type caLifecycle struct {
	log      *slog.Logger
	renewals *prometheus.CounterVec
	// srv and servingCert are set before the CA's Run starts; events
	// during Open (an expired intermediate replaced) find them nil, and
	// the server publishes its first list when it starts anyway.
	srv         *sds.Server
	servingCert *sds.ServingCert
}

func newCALifecycle(log *slog.Logger) *caLifecycle {
	l := &caLifecycle{log: log, renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sds_ca_intermediate_renewals_total",
		Help: "Renewals of the built-in CA's intermediate, by result (success: a successor was made and stored; failure: retried).",
	}, []string{"result"})}
	l.renewals.WithLabelValues("success")
	l.renewals.WithLabelValues("failure")
	return l
}

// observe is the CA's Options.Observe.
func (l *caLifecycle) observe(ev local.Event) {
	switch ev.Kind {
	case local.EventStaged:
		l.renewals.WithLabelValues("success").Inc()
	case local.EventRenewalFailed:
		l.renewals.WithLabelValues("failure").Inc()
		return
	case local.EventActivated:
		if l.servingCert != nil {
			l.servingCert.RenewSoon()
		}
	}
	if l.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := l.srv.RefreshRevocations(ctx); err != nil {
		// The CA waits for a list signed by a new intermediate before
		// using it; the CRL loop retries.
		l.log.Error("could not publish the revocation lists after an intermediate CA change; retrying", "event", ev.Kind, "generation", ev.Generation, "error", err)
	}
}
