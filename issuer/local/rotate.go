package local

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Phases of a root rotation (docs/ca-lifecycle.md). The CA only records
// them; what each waits for (sidecar ACKs) is checked by the SDS server,
// which calls AdvanceRotation.
const (
	// PhaseTrustBoth: the bundle holds both roots; workload certificates
	// still come from the old root's intermediate. Waits for every sidecar
	// to ACK the bundle.
	PhaseTrustBoth = "trust_both"
	// PhaseReissue: the new root's intermediate signs every workload
	// certificate, with the cross-signed new root in the chain; the bundle
	// still holds both. Waits for every sidecar to serve a certificate
	// under the new root.
	PhaseReissue = "reissue"
	// PhaseTrustNew: the bundle holds the new root alone. Waits for every
	// sidecar to ACK it; then the rotation is complete.
	PhaseTrustNew = "trust_new"
	// PhaseComplete is what AdvanceRotation returns from PhaseTrustNew:
	// no rotation is in progress any more.
	PhaseComplete = "complete"
)

// ErrNoRotation is returned when a rotation step is asked for while none
// is in progress.
var ErrNoRotation = errors.New("no root rotation in progress; start one with `sds-server ca rotate`")

// RotationInfo describes a root rotation in progress.
type RotationInfo struct {
	Phase                     string
	StartedAt, PhaseStartedAt time.Time
	OldRoot, NewRoot          *x509.Certificate
	// RenewOver is what BeginRotation was given (0: the caller's default).
	RenewOver time.Duration
}

// Rotation returns the root rotation in progress, false when none.
func (ca *CA) Rotation() (RotationInfo, bool) {
	r := ca.state.Load().rotation
	if r == nil {
		return RotationInfo{}, false
	}
	return RotationInfo{Phase: r.phase, StartedAt: r.startedAt, PhaseStartedAt: r.phaseStartedAt,
		OldRoot: r.oldRoot.cert, NewRoot: r.newRoot.cert, RenewOver: r.renewOver}, true
}

// UnderRoot reports whether the CA certificate that follows a leaf in its
// chain (its issuer) is signed by root: whether the leaf chains to root.
func UnderRoot(issuerCert, root *x509.Certificate) bool {
	return issuerCert != nil && root != nil && issuerCert.CheckSignatureFrom(root) == nil
}

// BeginRotation starts a root rotation: it makes a new root (B), a
// certificate with B's subject and key signed by the active root (A), and
// an intermediate under B, writes them, then the state file naming B
// incoming (PhaseTrustBoth). Nothing signed under B is used for workload
// certificates before AdvanceRotation. renewOver is recorded for the
// caller (how long phase 2 spreads the re-issue over).
func (ca *CA) BeginRotation(ctx context.Context, renewOver time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ca.renewMu.Lock()
	defer ca.renewMu.Unlock()
	st := ca.state.Load()
	if r := st.rotation; r != nil {
		return fmt.Errorf("a root rotation is already in progress (phase %s since %s); see `sds-server ca status`", r.phase, r.phaseStartedAt.UTC().Format(time.RFC3339))
	}
	if st.staged != nil {
		return fmt.Errorf("an intermediate renewal is in progress (generation %d staged at %s, not yet active); retry once it is active (within the publish delay)", st.staged.gen, st.staged.stagedAt.Format(time.RFC3339))
	}
	a := st.active.root
	if a.keyFile == "" {
		return fmt.Errorf("the root CA %s has no key in this CA: it cannot cross-sign a new root", a.certFile)
	}
	aKey, err := readKey(filepath.Join(ca.disk.dir, a.keyFile), a.cert)
	if err != nil {
		return fmt.Errorf("read the root key: %w", err)
	}
	now := ca.now().Truncate(time.Second)
	if !now.Before(a.cert.NotAfter) {
		return fmt.Errorf("the root CA %s expired at %s: it cannot cross-sign a new root; move the CA directory away to start a new CA", a.certFile, a.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	n := nextRootNumber(st)
	name := "root-" + strconv.Itoa(n)
	bKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate root key: %w", err)
	}
	bTmpl := caTemplate("sds-server root CA "+strconv.Itoa(n), ca.trustDomain, now, now.AddDate(rootYears, 0, 0))
	// Path length 2: the next rotation's chains run leaf, intermediate,
	// cross-signed root, this root.
	bTmpl.MaxPathLen = 2
	b, err := sign(bTmpl, bTmpl, bKey.Public(), bKey)
	if err != nil {
		return fmt.Errorf("new root certificate: %w", err)
	}
	// The cross-signed certificate: B's subject and key, issued by A, valid
	// as long as A is.
	crossTmpl := caTemplate(b.Subject.CommonName, ca.trustDomain, now, a.cert.NotAfter)
	crossTmpl.Subject = b.Subject
	crossTmpl.MaxPathLen = 1
	crossTmpl.SubjectKeyId = b.SubjectKeyId
	cross, err := sign(crossTmpl, a.cert, bKey.Public(), aKey)
	if err != nil {
		return fmt.Errorf("cross-signed root certificate: %w", err)
	}
	bKeyDER, err := x509.MarshalPKCS8PrivateKey(bKey)
	if err != nil {
		return fmt.Errorf("encode root key: %w", err)
	}
	rb := &rootCA{name: name, cert: b, certFile: name + ".crt", keyFile: name + ".key", status: rootStatusIncoming,
		cross: cross, crossFile: name + "-cross.crt", crossBy: a.name}
	in, files, err := ca.newIntermediate(st.nextGeneration(), rb, bKey, now)
	if err != nil {
		return err
	}
	files = append([]file{
		{rb.keyFile, "PRIVATE KEY", bKeyDER, 0o600},
		{rb.certFile, "CERTIFICATE", b.Raw, 0o644},
		{rb.crossFile, "CERTIFICATE", cross.Raw, 0o644},
	}, files...)
	if err := ca.disk.writeFiles(files); err != nil {
		return fmt.Errorf("write the new root: %w", err)
	}
	next := st.with()
	next.roots = append(next.roots, rb)
	next.incoming = in
	next.rotation = &rotation{phase: PhaseTrustBoth, startedAt: now, phaseStartedAt: now, oldRoot: a, newRoot: rb, renewOver: renewOver}
	if err := ca.disk.writeState(next.file()); err != nil {
		return fmt.Errorf("record the new root: %w", err)
	}
	ca.state.Store(next)
	ca.log.Info("root rotation started: new root in the trust bundle", "phase", PhaseTrustBoth, "new_root", name,
		"new_root_not_after", b.NotAfter.UTC().Format(time.RFC3339), "generation", in.gen)
	return nil
}

// nextRootNumber numbers a new root after every root in the file.
func nextRootNumber(st *signerState) int {
	n := 1
	for _, r := range st.roots {
		if v, err := strconv.Atoi(strings.TrimPrefix(r.name, "root-")); err == nil {
			n = max(n, v)
		}
	}
	return n + 1
}

// withStatus returns st's roots with the named ones given new statuses (new
// rootCA values: the old state stays untouched), and st's intermediates
// relinked to them.
func withStatus(st *signerState, status map[string]string, dropKey map[string]bool) *signerState {
	next := st.with()
	byName := map[string]*rootCA{}
	for i, r := range next.roots {
		c := *r
		if s, ok := status[r.name]; ok {
			c.status = s
		}
		if dropKey[r.name] {
			c.keyFile = ""
		}
		next.roots[i] = &c
		byName[r.name] = &c
	}
	relink := func(in *intermediate) *intermediate {
		if in == nil {
			return nil
		}
		c := *in
		c.root = byName[in.root.name]
		return &c
	}
	next.active, next.staged, next.incoming = relink(st.active), relink(st.staged), relink(st.incoming)
	for i, r := range next.retired {
		next.retired[i] = relink(r)
	}
	if r := st.rotation; r != nil {
		next.rotation = &rotation{phase: r.phase, startedAt: r.startedAt, phaseStartedAt: r.phaseStartedAt,
			oldRoot: byName[r.oldRoot.name], newRoot: byName[r.newRoot.name], renewOver: r.renewOver}
	}
	return next
}

// AdvanceRotation moves the rotation to its next phase and returns it
// (PhaseComplete once done). The caller checks the phase's condition.
func (ca *CA) AdvanceRotation(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	ca.renewMu.Lock()
	defer ca.renewMu.Unlock()
	st := ca.state.Load()
	r := st.rotation
	if r == nil {
		return "", ErrNoRotation
	}
	now := ca.now().Truncate(time.Second)
	var next *signerState
	var remove []string
	phase := ""
	switch r.phase {
	case PhaseTrustBoth:
		phase = PhaseReissue
		next = withStatus(st, map[string]string{r.oldRoot.name: rootStatusOutgoing, r.newRoot.name: rootStatusActive}, nil)
		next.retired = append(next.retired, next.active)
		next.active, next.incoming = next.incoming, nil
		if next.staged != nil { // cannot happen (refused at start, no renewal during a rotation)
			return "", errors.New("an intermediate is staged under the old root; this should not happen during a rotation")
		}
	case PhaseReissue:
		phase = PhaseTrustNew
		next = withStatus(st, map[string]string{r.oldRoot.name: rootStatusRetired}, nil)
	case PhaseTrustNew:
		phase = PhaseComplete
		// The old root's key and intermediates go: no sidecar trusts the
		// old root any more, so nothing signed under it verifies anywhere
		// and its revocation lists protect nothing.
		next = withStatus(st, nil, map[string]bool{r.oldRoot.name: true})
		var keep []*intermediate
		for _, in := range next.retired {
			if in.root.name == r.oldRoot.name {
				remove = append(remove, in.keyFile, in.certFile)
				continue
			}
			keep = append(keep, in)
		}
		next.retired = keep
		next.rotation = nil
		remove = append(remove, r.oldRoot.keyFile)
	default:
		return "", fmt.Errorf("rotation in unknown phase %q", r.phase)
	}
	if next.rotation != nil {
		next.rotation.phase, next.rotation.phaseStartedAt = phase, now
	}
	if err := ca.disk.writeState(next.file()); err != nil {
		return "", fmt.Errorf("record rotation phase %s: %w", phase, err)
	}
	ca.state.Store(next)
	if len(remove) > 0 {
		if err := ca.disk.removeFiles(remove); err != nil {
			ca.log.Warn("could not remove the old root's key and intermediates; remove them by hand", "files", strings.Join(remove, ", "), "error", err)
		}
	}
	ca.log.Info("root rotation advanced", "phase", phase, "new_root", r.newRoot.name, "old_root", r.oldRoot.name)
	return phase, nil
}

// AbortRotation returns to the old root alone, before PhaseTrustNew: the
// bundle holds the old root only, and the old root's latest intermediate
// signs again (its revocation list never stopped being published). The
// new root is kept, retired and without its key, as long as
// intermediates it signed may have valid certificates: those chain to the
// old root through the cross-signed certificate.
func (ca *CA) AbortRotation(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ca.renewMu.Lock()
	defer ca.renewMu.Unlock()
	st := ca.state.Load()
	r := st.rotation
	if r == nil {
		return ErrNoRotation
	}
	var next *signerState
	var remove []string
	switch r.phase {
	case PhaseTrustBoth:
		// Nothing under the new root was used but revocation lists and the
		// SDS listener's certificate: drop it all.
		next = st.with()
		var roots []*rootCA
		for _, x := range next.roots {
			if x.name != r.newRoot.name {
				roots = append(roots, x)
			}
		}
		next.roots, next.incoming, next.rotation = roots, nil, nil
		remove = []string{st.incoming.keyFile, st.incoming.certFile, r.newRoot.keyFile, r.newRoot.certFile, r.newRoot.crossFile}
	case PhaseReissue:
		now := ca.now()
		var back *intermediate
		for _, in := range st.retired {
			if in.root.name == r.oldRoot.name && now.Before(in.cert.NotAfter) && (back == nil || in.gen > back.gen) {
				back = in
			}
		}
		if back == nil {
			return fmt.Errorf("cannot abort: no intermediate of the old root %s is still valid; let the rotation complete", r.oldRoot.certFile)
		}
		next = withStatus(st, map[string]string{r.oldRoot.name: rootStatusActive, r.newRoot.name: rootStatusRetired},
			map[string]bool{r.newRoot.name: true})
		var retired []*intermediate
		for _, in := range next.retired {
			if in.gen == back.gen {
				back = in
				continue
			}
			retired = append(retired, in)
		}
		next.retired = append(retired, next.active)
		next.active = back
		next.rotation = nil
		remove = []string{r.newRoot.keyFile}
	default:
		return fmt.Errorf("cannot abort a root rotation in phase %s: the old root is out of the trust bundle already; let it complete", r.phase)
	}
	if err := ca.disk.writeState(next.file()); err != nil {
		return fmt.Errorf("record the aborted rotation: %w", err)
	}
	ca.state.Store(next)
	if err := ca.disk.removeFiles(remove); err != nil {
		ca.log.Warn("could not remove the new root's files after the abort; remove them by hand", "files", strings.Join(remove, ", "), "error", err)
	}
	ca.log.Info("root rotation aborted: back to the old root alone", "phase_was", r.phase, "root", r.oldRoot.name)
	return nil
}
