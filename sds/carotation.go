package sds

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/sds-server/issuer/local"
)

// RootRotator is the CA side of a root rotation: the built-in CA. It
// records and persists the phases; RotationDriver decides when to move on,
// from what the sidecars ACKed.
type RootRotator interface {
	Rotation() (local.RotationInfo, bool)
	BeginRotation(ctx context.Context, renewOver time.Duration) error
	AdvanceRotation(ctx context.Context) (string, error)
	AbortRotation(ctx context.Context) error
}

// DefaultRenewOver is how long phase 2 of a root rotation (and an abort)
// spreads the re-issue of every certificate over.
const DefaultRenewOver = 10 * time.Minute

// RotationDriver walks a root rotation of the built-in CA through its
// phases, each gated on evidence from the sidecars: phase 1 and 3 advance
// once every connected sidecar ACKed the new trust bundle (bundleack.go),
// phase 2 once every connected sidecar serves a certificate under the new
// root (markServing). It survives restarts: the phase is the CA's, and
// every check is made again from live state.
type RotationDriver struct {
	s         *Server
	ca        RootRotator
	renewOver time.Duration
	// changed is called after every change of the CA's roots or signing
	// intermediate (the SDS listener's certificate moves).
	changed func()

	mu      sync.Mutex
	history []PhaseChange
	// reissueTo and reissueBy direct the spread re-issue after an abort
	// (in phase 2 they come from the CA's phase).
	reissueTo *x509.Certificate
	reissueBy time.Time
	kick      chan struct{}
}

// PhaseChange is one step of a rotation, as the server saw it.
type PhaseChange struct {
	Phase string    `json:"phase"`
	At    time.Time `json:"at"`
	// Done of Total connected sidecars had reached the step left.
	Done  int `json:"done"`
	Total int `json:"total"`
	// Forced names the sidecars not done when an operator forced it.
	Forced []string `json:"forced,omitempty"`
}

// NewRotationDriver connects ca's rotation to s. renewOver <= 0 means
// DefaultRenewOver; changed may be nil.
func NewRotationDriver(s *Server, ca RootRotator, renewOver time.Duration, changed func()) (*RotationDriver, error) {
	if renewOver <= 0 {
		renewOver = DefaultRenewOver
	}
	if changed == nil {
		changed = func() {}
	}
	d := &RotationDriver{s: s, ca: ca, renewOver: renewOver, changed: changed, kick: make(chan struct{}, 1)}
	if err := d.registerMetrics(); err != nil {
		return nil, err
	}
	s.rotation.Store(d)
	return d, nil
}

// Run checks the rotation's gate every second (and at once when kicked)
// until ctx ends, advancing when it is met.
func (d *RotationDriver) Run(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		d.tick(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.kick:
		}
	}
}

func (d *RotationDriver) wake() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// tick re-publishes the bundle, spreads re-issues and advances when due.
func (d *RotationDriver) tick(ctx context.Context) {
	info, ok := d.ca.Rotation()
	d.mu.Lock()
	to, by := d.reissueTo, d.reissueBy
	d.mu.Unlock()
	if !ok {
		if to != nil {
			if d.spreadReissue(to, by) == 0 {
				d.mu.Lock()
				d.reissueTo = nil
				d.mu.Unlock()
			}
		}
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := d.s.RefreshRoots(rctx); err != nil {
		d.s.log.Warn("root rotation: could not publish the trust bundle; retrying", "error", err)
		return
	}
	if info.Phase == local.PhaseReissue {
		d.spreadReissue(info.NewRoot, info.PhaseStartedAt.Add(d.spread(info)))
	}
	done, total, lag := d.progress(info)
	if len(lag) > 0 || done != total {
		return
	}
	if _, err := d.advance(ctx, info, done, total, nil); err != nil {
		d.s.log.Error("root rotation: could not advance; retrying", "phase", info.Phase, "error", err)
	}
}

// progress reports how many connected sidecars reached the current phase's
// goal, and names the others.
func (d *RotationDriver) progress(info local.RotationInfo) (done, total int, laggards []NodeLag) {
	laggards = []NodeLag{}
	switch info.Phase {
	case local.PhaseTrustBoth, local.PhaseTrustNew:
		r := d.s.BundleRollout()
		want, err := d.bundleWanted()
		if err != nil || r.Version != want {
			// Not published yet: nobody has it.
			return 0, r.Connected, append(laggards, r.Laggards...)
		}
		return r.Acked, r.Connected, r.Laggards
	case local.PhaseReissue:
		for _, ln := range d.s.connectedNodes() {
			total++
			ln.hmu.Lock()
			cs := ln.serving
			ln.hmu.Unlock()
			if cs != nil && local.UnderRoot(chainIssuer(cs), info.NewRoot) {
				done++
				continue
			}
			has := ""
			if cs != nil {
				has = cs.serial
			}
			laggards = append(laggards, NodeLag{NodeID: ln.rec.ID, Service: ln.rec.Service, Env: ln.rec.Env, Has: has})
		}
		slices.SortFunc(laggards, func(a, b NodeLag) int { return cmpString(a.NodeID, b.NodeID) })
	}
	return done, total, laggards
}

// bundleWanted is the version of the CA's bundle now.
func (d *RotationDriver) bundleWanted() (string, error) {
	iss, ok := d.ca.(interface {
		Roots(context.Context) ([]*x509.Certificate, error)
	})
	if !ok {
		return d.s.BundleVersion(), nil
	}
	roots, err := iss.Roots(context.Background())
	if err != nil {
		return "", err
	}
	return BundleVersion(roots), nil
}

// chainIssuer returns the CA certificate after the leaf in cs's chain.
func chainIssuer(cs *certState) *x509.Certificate {
	rest := cs.cert.ChainPEM
	for i := 0; ; i++ {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil
		}
		if i == 1 {
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil
			}
			return c
		}
	}
}

// spreadReissue makes every connected node whose certificate does not
// chain to root renew at a random point before by (now if by has passed),
// unless it is due sooner already, and returns how many are not there yet.
func (d *RotationDriver) spreadReissue(root *x509.Certificate, by time.Time) int {
	now := d.s.now()
	left := 0
	for _, ln := range d.s.connectedNodes() {
		cs := ln.cur.Load()
		if cs != nil && local.UnderRoot(chainIssuer(cs), root) {
			continue
		}
		left++
		if due, ok := d.s.sched.scheduled(ln); ok && !due.After(by) && ln.forceRenew.Load() {
			continue
		}
		at := now
		if by.After(now) {
			at = now.Add(time.Duration(rand.Int64N(int64(by.Sub(now)) + 1)))
		}
		ln.forceRenew.Store(true)
		d.s.sched.schedule(ln, at)
	}
	return left
}

// advance moves the CA to the next phase and records it.
func (d *RotationDriver) advance(ctx context.Context, info local.RotationInfo, done, total int, forced []string) (string, error) {
	phase, err := d.ca.AdvanceRotation(ctx)
	if err != nil {
		return "", err
	}
	now := d.s.now().UTC()
	d.mu.Lock()
	d.history = append(d.history, PhaseChange{Phase: phase, At: now, Done: done, Total: total, Forced: forced})
	d.mu.Unlock()
	d.s.log.Info("root rotation phase advanced", "from", info.Phase, "to", phase, "sidecars_done", done, "sidecars", total,
		"forced", strings.Join(forced, ","), "phase_took", now.Sub(info.PhaseStartedAt).Round(time.Millisecond))
	d.publishChange(ctx)
	d.changed()
	d.wake()
	return phase, nil
}

// Start begins a rotation (phase 1: the bundle holds both roots); phase 2
// spreads the re-issue over renewOver (<= 0: the driver's default).
func (d *RotationDriver) Start(ctx context.Context, renewOver time.Duration) error {
	if err := d.ca.BeginRotation(ctx, renewOver); err != nil {
		return err
	}
	d.mu.Lock()
	d.history = []PhaseChange{{Phase: local.PhaseTrustBoth, At: d.s.now().UTC()}}
	d.reissueTo = nil
	d.mu.Unlock()
	d.publishChange(ctx)
	d.changed()
	d.wake()
	return nil
}

// ErrNotDone says a phase cannot advance without --force.
var ErrNotDone = errors.New("sidecars have not reached this phase's goal")

// Continue advances past the current phase: at once if its goal is met,
// else only with force, naming the sidecars left behind (also returned).
func (d *RotationDriver) Continue(ctx context.Context, force bool) (string, []NodeLag, error) {
	info, ok := d.ca.Rotation()
	if !ok {
		return "", nil, local.ErrNoRotation
	}
	done, total, lag := d.progress(info)
	if len(lag) > 0 && !force {
		return "", lag, fmt.Errorf("phase %s: %d of %d sidecars done, waiting for %s: %w (add --force to advance without them)",
			info.Phase, done, total, lagNames(lag), ErrNotDone)
	}
	var forced []string
	for _, l := range lag {
		forced = append(forced, l.NodeID)
	}
	if len(forced) > 0 {
		d.s.log.Warn("root rotation forced past sidecars that are not done", "phase", info.Phase, "nodes", strings.Join(forced, ","))
	}
	phase, err := d.advance(ctx, info, done, total, forced)
	return phase, lag, err
}

func lagNames(lag []NodeLag) string {
	var out []string
	for i, l := range lag {
		if i == 10 {
			out = append(out, fmt.Sprintf("and %d more", len(lag)-10))
			break
		}
		out = append(out, fmt.Sprintf("%s (%s/%s)", l.NodeID, l.Env, l.Service))
	}
	return strings.Join(out, ", ")
}

// Abort returns to the old root alone (before phase 3) and re-issues every
// certificate from the old root's intermediate, spread over renewOver.
func (d *RotationDriver) Abort(ctx context.Context) error {
	info, ok := d.ca.Rotation()
	if !ok {
		return local.ErrNoRotation
	}
	if err := d.ca.AbortRotation(ctx); err != nil {
		return err
	}
	now := d.s.now()
	d.mu.Lock()
	d.history = append(d.history, PhaseChange{Phase: "aborted", At: now.UTC()})
	d.reissueTo, d.reissueBy = info.OldRoot, now.Add(d.renewOver)
	d.mu.Unlock()
	d.publishChange(ctx)
	d.changed()
	d.wake()
	d.s.log.Info("root rotation aborted", "phase_was", info.Phase)
	return nil
}

// RotationStatus is a root rotation as `sds-server ca status` shows it;
// Phase is "" when none is in progress.
type RotationStatus struct {
	Phase          string      `json:"phase"`
	StartedAt      *time.Time  `json:"started_at,omitempty"`
	PhaseStartedAt *time.Time  `json:"phase_started_at,omitempty"`
	OldRoot        *CertExpiry `json:"old_root,omitempty"`
	NewRoot        *CertExpiry `json:"new_root,omitempty"`
	// Waiting says what the phase waits for.
	Waiting string `json:"waiting,omitempty"`
	// Done of Total connected sidecars reached the phase's goal; Laggards
	// are the others.
	Done     int       `json:"done"`
	Total    int       `json:"total"`
	Laggards []NodeLag `json:"laggards"`
	// RenewBy is when every certificate is due to be re-issued (phase 2).
	RenewBy *time.Time `json:"renew_by,omitempty"`
	// History is every phase change since the server started.
	History []PhaseChange `json:"history"`
}

// Status reports the rotation; nil when none is in progress and none
// happened since start.
func (d *RotationDriver) Status() *RotationStatus {
	d.mu.Lock()
	hist := slices.Clone(d.history)
	d.mu.Unlock()
	info, ok := d.ca.Rotation()
	if !ok && len(hist) == 0 {
		return nil
	}
	st := &RotationStatus{Laggards: []NodeLag{}, History: hist}
	if hist == nil {
		st.History = []PhaseChange{}
	}
	if !ok {
		st.Phase = "none"
		return st
	}
	st.Phase = info.Phase
	st.StartedAt, st.PhaseStartedAt = timePtr(info.StartedAt), timePtr(info.PhaseStartedAt)
	o, n := certExpiry(info.OldRoot), certExpiry(info.NewRoot)
	st.OldRoot, st.NewRoot = &o, &n
	switch info.Phase {
	case local.PhaseTrustBoth:
		st.Waiting = "every connected sidecar to ACK the trust bundle with both roots"
	case local.PhaseReissue:
		st.Waiting = "every connected sidecar to serve a certificate under the new root"
		st.RenewBy = timePtr(info.PhaseStartedAt.Add(d.spread(info)))
	case local.PhaseTrustNew:
		st.Waiting = "every connected sidecar to ACK the trust bundle with the new root alone"
	}
	st.Done, st.Total, st.Laggards = d.progress(info)
	return st
}

func timePtr(t time.Time) *time.Time { u := t.UTC(); return &u }

// spread is how long phase 2 of info spreads the re-issue over.
func (d *RotationDriver) spread(info local.RotationInfo) time.Duration {
	if info.RenewOver > 0 {
		return info.RenewOver
	}
	return d.renewOver
}

// phaseNumber is the sds_ca_rotation_phase gauge's value.
func phaseNumber(p string) float64 {
	switch p {
	case local.PhaseTrustBoth:
		return 1
	case local.PhaseReissue:
		return 2
	case local.PhaseTrustNew:
		return 3
	}
	return 0
}

func (d *RotationDriver) registerMetrics() error {
	progress := func(done bool) float64 {
		info, ok := d.ca.Rotation()
		if !ok {
			return 0
		}
		n, total, _ := d.progress(info)
		if done {
			return float64(n)
		}
		return float64(total - n)
	}
	for _, c := range []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_ca_rotation_phase",
			Help: "Phase of the built-in CA's root rotation: 0 none, 1 both roots trusted, 2 certificates re-issued under the new root, 3 the new root alone trusted.",
		}, func() float64 {
			info, _ := d.ca.Rotation()
			return phaseNumber(info.Phase)
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_ca_rotation_sidecars_done",
			Help: "Connected sidecars that reached the current rotation phase's goal (0 when no rotation).",
		}, func() float64 { return progress(true) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sds_ca_rotation_sidecars_pending",
			Help: "Connected sidecars that have not reached the current rotation phase's goal yet (0 when no rotation).",
		}, func() float64 { return progress(false) }),
	} {
		if err := d.s.cfg.Metrics.reg.Register(c); err != nil {
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}

// rotateRequest is the body of POST /v1/ca/rotate.
type rotateRequest struct {
	// Action is "start" (default), "continue" or "abort".
	Action string `json:"action"`
	Force  bool   `json:"force"`
	// RenewOver (start) is how long phase 2 spreads the re-issue over,
	// a Go duration; empty: 10m.
	RenewOver string `json:"renew_over"`
}

// RotateResult answers POST /v1/ca/rotate.
type RotateResult struct {
	Phase string `json:"phase"`
	// Forced names the sidecars advanced past (continue --force).
	Forced []NodeLag `json:"forced"`
}

func (s *Server) handleCARotate(w http.ResponseWriter, r *http.Request) {
	d := s.rotation.Load()
	if d == nil {
		writeError(w, http.StatusNotImplemented, errors.New("root rotation needs the built-in CA (ca.backend: local)"))
		return
	}
	var req rotateRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad request body: %w", err))
		return
	}
	var res RotateResult
	res.Forced = []NodeLag{}
	switch req.Action {
	case "", "start":
		var over time.Duration
		if req.RenewOver != "" {
			v, err := time.ParseDuration(req.RenewOver)
			if err != nil || v <= 0 {
				writeError(w, http.StatusBadRequest, fmt.Errorf("invalid renew_over %q: use a positive duration such as 10m", req.RenewOver))
				return
			}
			over = v
		}
		if err := d.Start(r.Context(), over); err != nil {
			writeError(w, http.StatusConflict, err)
			return
		}
		res.Phase = local.PhaseTrustBoth
	case "continue":
		phase, lag, err := d.Continue(r.Context(), req.Force)
		if err != nil {
			writeError(w, http.StatusConflict, err)
			return
		}
		res.Phase = phase
		if req.Force {
			res.Forced = append(res.Forced, lag...)
		}
	case "abort":
		if err := d.Abort(r.Context()); err != nil {
			writeError(w, http.StatusConflict, err)
			return
		}
		res.Phase = "aborted"
	default:
		writeError(w, http.StatusBadRequest, fmt.Errorf("unknown action %q: want start, continue or abort", req.Action))
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// CAStatusReport answers GET /v1/ca/status (`sds-server ca status`).
type CAStatusReport struct {
	CA       CAStatus        `json:"ca"`
	Bundle   BundleRollout   `json:"bundle"`
	Rotation *RotationStatus `json:"rotation"`
}

// CAStatus reports the CA, the trust bundle's rollout and the rotation.
func (s *Server) CAStatus() CAStatusReport {
	rep := CAStatusReport{CA: s.caStatus(), Bundle: s.BundleRollout()}
	if d := s.rotation.Load(); d != nil {
		rep.Rotation = d.Status()
	}
	return rep
}

func (s *Server) handleCAStatus(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.CAStatus())
}

// publishChange pushes what a rotation step changed: first the revocation
// lists, re-signed by every intermediate that may now have valid leaves (B's
// from phase 1 on, none of A's once complete), then the trust bundle, which
// carries them. Envoy refuses a leaf whose issuer has no list in the
// validation context, so every sidecar must hold B's intermediate's list
// before any leaf under it is served; publishing it first means the bundle
// whose ACKs gate phase 1 already carries it.
func (d *RotationDriver) publishChange(ctx context.Context) {
	if err := d.s.refreshCRL(ctx); err != nil {
		d.s.log.Warn("root rotation: could not re-sign the revocation lists; the CRL loop retries", "error", err)
	}
	if err := d.s.RefreshRoots(ctx); err != nil {
		d.s.log.Warn("root rotation: could not publish the trust bundle; retrying", "error", err)
	}
}
