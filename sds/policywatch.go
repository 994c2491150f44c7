package sds

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"

	"github.com/meshid/sds-server/authz"
)

// PolicyStatus is what the admin API reports of one service's ACL.
type PolicyStatus struct {
	Env     string `json:"env"`
	Service string `json:"service"`
	// File is the ACL file, relative to policy_dir.
	File string `json:"file"`
	// Active tells whether a policy from this file is in force: the
	// current content, or the last good one when Error is set.
	Active bool `json:"active"`
	// Entries is the number of ACL entries in force.
	Entries int `json:"entries"`
	// LoadedAt is when the policy in force was loaded.
	LoadedAt time.Time `json:"loaded_at,omitzero"`
	// Error is why the file's current content is not in force.
	Error string `json:"error,omitempty"`
}

// PolicyReport is the admin API's view of policy_dir.
type PolicyReport struct {
	Dir           string         `json:"dir"`
	DefaultPolicy string         `json:"default_policy"`
	Services      []PolicyStatus `json:"services"`
	// Stray lists files that name no service (misplaced or misnamed) or
	// that could not be read.
	Stray []string `json:"stray,omitempty"`
	// Error is why policy_dir itself could not be read at the last poll;
	// the policies in force are the last ones read.
	Error string `json:"error,omitempty"`
}

// policyWatcher keeps the server's ACL filters in step with policy_dir. A
// valid change is compiled and pushed at the next poll; an invalid file
// keeps the last good policy of its service, is logged once and counted,
// and is reported by the admin API.
type policyWatcher struct {
	s       *Server
	dir     string
	defName string
	def     *rbacv3.RBAC

	mu       sync.Mutex
	sum      [sha256.Size]byte
	good     map[authz.Key]goodPolicy
	status   map[authz.Key]PolicyStatus
	stray    []string
	reported map[string]bool // problems already logged, so each is logged once
	dirErr   string          // why policy_dir itself could not be read at the last poll
}

type goodPolicy struct {
	rbac     *rbacv3.RBAC
	entries  int
	loadedAt time.Time
}

// WatchPolicies loads policy_dir now (a missing directory is created: no
// policies yet) and then polls it every interval until ctx ends. defName
// names the default policy in reports ("deny" or "allow").
func (s *Server) WatchPolicies(ctx context.Context, dir, defName string, interval time.Duration) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("policy_dir %s: %w", dir, err)
	}
	w := &policyWatcher{s: s, dir: dir, defName: defName, def: s.cfg.DefaultPolicy,
		good: map[authz.Key]goodPolicy{}, status: map[authz.Key]PolicyStatus{}, reported: map[string]bool{}}
	if err := w.scan(true); err != nil {
		return err
	}
	s.policyWatch.Store(w)
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := w.scan(false); err != nil {
					s.log.Error("policy reload failed; keeping the current policies", "policy_dir", dir, "error", err)
				}
			}
		}
	}()
	return nil
}

// scan reloads the directory if what it would load changed, and pushes what
// changed. Every poll reads the files (each bounded by authz.MaxFileSize and
// never blocking) and compares a hash of their bytes with the last one, so
// an edit is seen wherever symbolic links lead: a symlinked file or
// environment directory, a Kubernetes ConfigMap's ..data swap. Comparing
// names, sizes and timestamps of the links themselves missed those.
func (w *policyWatcher) scan(force bool) error {
	snap, err := authz.ReadDir(w.dir)
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case err != nil && force:
		return err
	case err != nil:
		// Logged once per reason, reported by the admin API until it
		// passes: the policies in force stay.
		if w.dirErr != err.Error() {
			w.s.log.Error("policy_dir unreadable; keeping the current policies", "policy_dir", w.dir, "error", err)
		}
		w.dirErr = err.Error()
		return nil
	case w.dirErr != "":
		w.s.log.Info("policy_dir readable again", "policy_dir", w.dir)
		w.dirErr = ""
	}
	sum := snap.Sum()
	if !force && sum == w.sum {
		return nil
	}
	d := snap.Load()
	now := w.s.now().UTC()
	m := w.s.cfg.Metrics
	status := map[authz.Key]PolicyStatus{}
	good := map[authz.Key]goodPolicy{}
	seen := map[string]bool{}
	report := func(key string, err error) {
		seen[key+"\x00"+err.Error()] = true
		if w.reported[key+"\x00"+err.Error()] {
			return
		}
		m.policyErrors.Inc()
		w.s.log.Error("invalid policy file; keeping the last good policy", "file", key, "reason", oneLine(err.Error()))
	}
	for k, r := range d.Policies {
		st := PolicyStatus{Env: k.Env, Service: k.Service, File: r.Path}
		rbac, cerr := (*rbacv3.RBAC)(nil), r.Err
		if cerr == nil {
			rbac, cerr = authz.Compile(r.ACL, authz.Identity{TrustDomain: w.s.cfg.TrustDomain, Env: k.Env, Service: k.Service})
		}
		if cerr == nil {
			g := goodPolicy{rbac: rbac, entries: len(r.ACL), loadedAt: now}
			if old, ok := w.good[k]; ok && samePolicy(old.rbac, rbac) {
				g.loadedAt = old.loadedAt
			}
			good[k] = g
		} else {
			report(filepath.ToSlash(filepath.Join(filepath.Base(w.dir), r.Path)), cerr)
			st.Error = cerr.Error()
			if old, ok := w.good[k]; ok {
				good[k] = old
			}
		}
		if g, ok := good[k]; ok {
			st.Active, st.Entries, st.LoadedAt = true, g.entries, g.loadedAt
		}
		status[k] = st
	}
	// An environment directory that cannot be read (a dangling or looping
	// link, no permission) says nothing of its services: keep what they had.
	for k, old := range w.status {
		envErr, ok := d.Unreadable[k.Env]
		if _, seen := status[k]; seen || !ok {
			continue
		}
		st := old
		st.Error = envErr.Error()
		if g, ok := w.good[k]; ok {
			good[k] = g
		}
		status[k] = st
	}
	var stray []string
	for _, e := range d.Stray {
		stray = append(stray, e.Error())
		var pe *authz.PathError
		key := e.Error()
		if errors.As(e, &pe) {
			key = pe.Path
		}
		report(key, e)
	}
	w.reported = seen
	m.policyInvalid.Set(float64(len(stray) + countErrors(status)))

	byKey := make(map[ServiceKey]*rbacv3.RBAC, len(good))
	for k, g := range good {
		byKey[ServiceKey{Env: k.Env, Service: k.Service}] = g.rbac
	}
	if err := w.s.SetPolicies(byKey, w.def); err != nil {
		return err
	}
	for k, g := range good {
		if old, ok := w.good[k]; !ok || g.loadedAt != old.loadedAt {
			w.s.log.Info("policy loaded", "env", k.Env, "service", k.Service, "entries", g.entries)
		}
	}
	for k := range w.good {
		if _, ok := good[k]; !ok {
			w.s.log.Info("policy removed; the default policy applies", "env", k.Env, "service", k.Service, "default_policy", w.defName)
		}
	}
	w.good, w.status, w.stray, w.sum = good, status, stray, sum
	return nil
}

func countErrors(st map[authz.Key]PolicyStatus) int {
	n := 0
	for _, s := range st {
		if s.Error != "" {
			n++
		}
	}
	return n
}

func samePolicy(a, b *rbacv3.RBAC) bool {
	ra, err1 := extensionResource("x", a)
	rb, err2 := extensionResource("x", b)
	return err1 == nil && err2 == nil && ra.version == rb.version
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", "; ") }

// report returns the admin API's view of the policies.
func (w *policyWatcher) report() PolicyReport {
	w.mu.Lock()
	defer w.mu.Unlock()
	r := PolicyReport{Dir: w.dir, DefaultPolicy: w.defName, Stray: append([]string(nil), w.stray...), Error: w.dirErr}
	for _, st := range w.status {
		r.Services = append(r.Services, st)
	}
	sort.Slice(r.Services, func(i, j int) bool {
		a, b := r.Services[i], r.Services[j]
		return a.Env+"/"+a.Service < b.Env+"/"+b.Service
	})
	return r
}
