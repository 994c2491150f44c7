package local

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// Kinds of Event.
const (
	// EventStaged: a new intermediate was made and written; it signs
	// revocation lists at once and certificates once activated. This is
	// a successful renewal.
	EventStaged = "staged"
	// EventActivated: the staged intermediate signs every new certificate
	// from now on; the one it replaces is retired.
	EventActivated = "activated"
	// EventPruned: an expired, retired intermediate was dropped.
	EventPruned = "pruned"
	// EventRenewalFailed: a renewal or activation failed; it is retried.
	EventRenewalFailed = "renewal_failed"
)

// Event is a lifecycle change of the built-in CA (see Options.Observe).
type Event struct {
	Kind string
	// Generation and NotAfter describe the intermediate concerned.
	Generation int
	NotAfter   time.Time
	// Err is why a renewal failed (EventRenewalFailed).
	Err error
}

// publication records when a revocation list signed by a staged
// intermediate was first signed.
type publication struct {
	gen int
	at  time.Time
}

// maxPublishDelay bounds how long a staged intermediate waits, after its
// revocation list was first signed, before it signs certificates.
const maxPublishDelay = time.Hour

// lifetime is an intermediate's lifetime from its issue: its validity
// without the backdating of NotBefore (what intermediate_ttl set).
func lifetime(in *intermediate) time.Duration {
	v := in.cert.NotAfter.Sub(in.cert.NotBefore)
	if v-issuer.Backdate >= minShortIntermediateTTL {
		v -= issuer.Backdate
	}
	return v
}

// renewAt is when in's successor is made: when IntermediateRenewBefore of
// its lifetime is left.
func (ca *CA) renewAt(in *intermediate) time.Time {
	return in.cert.NotAfter.Add(-time.Duration(float64(lifetime(in)) * ca.renewBefore))
}

// publishDelay is how long a staged intermediate waits after its first
// revocation list before it signs certificates: a tenth of the renewal
// lead of the active one, at most maxPublishDelay. Every sidecar must hold
// a list signed by a certificate's issuer before it meets the certificate
// (with a CRL configured, Envoy refuses a certificate whose issuer has no
// list), and the SDS server pushes the list to every stream as soon as it
// is signed.
func (ca *CA) publishDelay(active *intermediate) time.Duration {
	return min(time.Duration(float64(lifetime(active))*ca.renewBefore/10), maxPublishDelay)
}

// retryDelay is how soon a failed renewal is tried again.
func retryDelay(active *intermediate) time.Duration {
	return min(time.Minute, max(time.Second, lifetime(active)/50))
}

// activationDue returns when the staged intermediate of st may start
// signing, and false while no revocation list it signed exists yet.
func (ca *CA) activationDue(st *signerState) (time.Time, bool) {
	p := ca.published.Load()
	if st.staged == nil || p == nil || p.gen != st.staged.gen {
		return time.Time{}, false
	}
	return p.at.Add(ca.publishDelay(st.active)), true
}

// notePublished is called by SignCRL after signing with st: the first list
// signed by a staged intermediate starts its publish delay.
func (ca *CA) notePublished(st *signerState) {
	if st.staged == nil {
		return
	}
	p := ca.published.Load()
	if p != nil && p.gen == st.staged.gen {
		return
	}
	if ca.published.CompareAndSwap(p, &publication{gen: st.staged.gen, at: ca.now()}) {
		select {
		case ca.kick <- struct{}{}:
		default:
		}
	}
}

// Run keeps the intermediate renewed until ctx ends: at start and then
// whenever due, it makes a successor when IntermediateRenewBefore of the
// intermediate's life is left, activates it once its revocation list has
// been out for the publish delay, and drops retired generations once they
// expire. Failures are logged, reported to Options.Observe and retried.
func (ca *CA) Run(ctx context.Context) {
	for {
		next := ca.step(ctx)
		d := min(max(next.Sub(ca.now()), 50*time.Millisecond), time.Minute)
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-ca.kick:
			t.Stop()
		}
	}
}

// step does whatever lifecycle change is due now and returns when the
// next one is.
func (ca *CA) step(ctx context.Context) time.Time {
	ca.renewMu.Lock()
	defer ca.renewMu.Unlock()
	now := ca.now()
	next := now.Add(time.Minute)
	st := ca.state.Load()
	retry := now.Add(retryDelay(st.active))

	if !now.Before(st.active.cert.NotAfter) {
		if err := ca.replaceExpiredLocked(ctx, now); err != nil {
			ca.failed(st, err, retry)
			return retry
		}
		st = ca.state.Load()
	}
	if err := ca.pruneLocked(now); err != nil {
		ca.failed(st, fmt.Errorf("drop expired intermediates: %w", err), retry)
		next = retry
	}
	st = ca.state.Load()
	for _, r := range st.retired {
		next = minTime(next, r.cert.NotAfter)
	}
	if r := st.rotation; r != nil && r.phase != PhaseTrustNew {
		// A root rotation replaces the intermediate itself; renewal
		// resumes under the new root once it is the only one trusted.
		return next
	}
	if st.staged != nil {
		due, ok := ca.activationDue(st)
		switch {
		case !ok:
			// Waiting for the first revocation list it signs (kick).
		case now.Before(due):
			next = minTime(next, due)
		default:
			if err := ca.activateLocked(); err != nil {
				ca.failed(st, fmt.Errorf("activate intermediate generation %d: %w", st.staged.gen, err), retry)
				return minTime(next, retry)
			}
			st = ca.state.Load()
		}
	}
	if st.staged == nil {
		at := ca.renewAt(st.active)
		if now.Before(at) {
			return minTime(next, at)
		}
		if err := ca.stageLocked(ctx, now); err != nil {
			ca.failed(st, err, retry)
			return minTime(next, retry)
		}
		// Look again within the publish delay, should no kick come.
		next = minTime(next, now.Add(ca.publishDelay(st.active)))
	}
	return next
}

// failed logs and reports a failed lifecycle change.
func (ca *CA) failed(st *signerState, err error, retry time.Time) {
	ca.log.Error("intermediate CA renewal failed; retrying", "error", err,
		"generation", st.active.gen, "not_after", st.active.cert.NotAfter.UTC().Format(time.RFC3339),
		"retry_at", retry.UTC().Format(time.RFC3339))
	ca.emit(Event{Kind: EventRenewalFailed, Generation: st.active.gen, NotAfter: st.active.cert.NotAfter, Err: err})
}

func (ca *CA) emit(ev Event) {
	if ca.observe != nil {
		ca.observe(ev)
	}
}

// renewExpired replaces an expired intermediate at Open, or says why it
// cannot: then nothing can be issued, and serve must not start.
func (ca *CA) renewExpired(ctx context.Context) error {
	ca.renewMu.Lock()
	defer ca.renewMu.Unlock()
	now := ca.now()
	st := ca.state.Load()
	if now.Before(st.active.cert.NotAfter) {
		return nil
	}
	if err := ca.replaceExpiredLocked(ctx, now); err != nil {
		return fmt.Errorf("load CA: the intermediate CA %s expired at %s and cannot be renewed: %w",
			filepath.Join(ca.disk.dir, st.active.certFile), st.active.cert.NotAfter.UTC().Format(time.RFC3339), err)
	}
	return nil
}

// replaceExpiredLocked activates a successor of the expired active
// intermediate at once, making one first if none is staged: no
// certificate of the expired one is valid, so there is nothing to wait
// for.
func (ca *CA) replaceExpiredLocked(ctx context.Context, now time.Time) error {
	st := ca.state.Load()
	if st.staged == nil || !now.Before(st.staged.cert.NotAfter) {
		if st.staged != nil { // expired too: retire it with the active one
			if err := ca.activateLocked(); err != nil {
				return err
			}
		}
		if err := ca.stageLocked(ctx, now); err != nil {
			return err
		}
	}
	ca.log.Warn("intermediate CA expired; its successor signs at once", "generation", ca.state.Load().active.gen,
		"expired_at", ca.state.Load().active.cert.NotAfter.UTC().Format(time.RFC3339))
	return ca.activateLocked()
}

// stageLocked makes the next intermediate generation under the root of
// the active one and writes it, then the state file naming it staged.
func (ca *CA) stageLocked(ctx context.Context, now time.Time) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	st := ca.state.Load()
	r := st.active.root
	if r.keyFile == "" {
		return fmt.Errorf("the root CA %s has no key in this CA: a new root is needed", r.certFile)
	}
	rootKey, err := readKey(filepath.Join(ca.disk.dir, r.keyFile), r.cert)
	if err != nil {
		return fmt.Errorf("read the root key: %w", err)
	}
	now = now.Truncate(time.Second)
	in, files, err := ca.newIntermediate(st.nextGeneration(), r, rootKey, now)
	if err != nil {
		return err
	}
	in.stagedAt = now.UTC()
	if err := ca.disk.writeFiles(files); err != nil {
		return fmt.Errorf("write intermediate generation %d: %w", in.gen, err)
	}
	next := st.with()
	next.staged = in
	if err := ca.disk.writeState(next.file()); err != nil {
		return fmt.Errorf("record intermediate generation %d: %w", in.gen, err)
	}
	ca.state.Store(next)
	ca.log.Info("intermediate CA renewed: successor made; it signs revocation lists now and certificates once they are out",
		"generation", in.gen, "not_after", in.cert.NotAfter.UTC().Format(time.RFC3339),
		"replaces", st.active.gen, "replaced_not_after", st.active.cert.NotAfter.UTC().Format(time.RFC3339),
		"publish_delay", ca.publishDelay(st.active))
	ca.emit(Event{Kind: EventStaged, Generation: in.gen, NotAfter: in.cert.NotAfter})
	return nil
}

// activateLocked makes the staged intermediate the active one and retires
// the active one.
func (ca *CA) activateLocked() error {
	st := ca.state.Load()
	next := st.with()
	next.active, next.staged, next.retired = st.staged, nil, append(next.retired, st.active)
	if err := ca.disk.writeState(next.file()); err != nil {
		return err
	}
	ca.state.Store(next)
	ca.log.Info("intermediate CA activated: new certificates chain to it", "generation", next.active.gen,
		"not_after", next.active.cert.NotAfter.UTC().Format(time.RFC3339), "retired", st.active.gen,
		"retired_not_after", st.active.cert.NotAfter.UTC().Format(time.RFC3339))
	ca.emit(Event{Kind: EventActivated, Generation: next.active.gen, NotAfter: next.active.cert.NotAfter})
	return nil
}

// pruneLocked drops retired intermediates that have expired, with the
// certificates they signed: the state file first, then their files.
func (ca *CA) pruneLocked(now time.Time) error {
	st := ca.state.Load()
	var keep, gone []*intermediate
	for _, r := range st.retired {
		if now.Before(r.cert.NotAfter) {
			keep = append(keep, r)
		} else {
			gone = append(gone, r)
		}
	}
	if len(gone) == 0 {
		return nil
	}
	next := st.with()
	next.retired = keep
	if err := ca.disk.writeState(next.file()); err != nil {
		return err
	}
	ca.state.Store(next)
	var files []string
	for _, g := range gone {
		files = append(files, g.keyFile, g.certFile)
		ca.log.Info("expired intermediate CA dropped", "generation", g.gen, "expired_at", g.cert.NotAfter.UTC().Format(time.RFC3339))
		ca.emit(Event{Kind: EventPruned, Generation: g.gen, NotAfter: g.cert.NotAfter})
	}
	if err := ca.disk.removeFiles(files); err != nil {
		// Unused from now on: only tidiness is lost.
		ca.log.Warn("could not remove the files of an expired intermediate CA", "error", err)
	}
	return nil
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
