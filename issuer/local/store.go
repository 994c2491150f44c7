package local

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// StateFile names the CA's state file: which roots and intermediate
// generations the CA holds and what each is doing. It is written last, by
// rename, after every file it names is complete on disk, so it is the
// commit point of every lifecycle change. A CA directory without it is the
// first layout (RootCertFile, RootKeyFile, IntermediateCertFile,
// IntermediateKeyFile alone), read as generation 1; the file appears with
// the first intermediate renewal. See docs/ca-lifecycle.md.
const StateFile = "state.json"

// stateFormat is the newest version of the state file this code reads and
// writes. A change that older code would misread must bump it; older code
// refuses a format it does not know rather than guess. Format 2 adds root
// rotation (root statuses other than active, cross-signed roots, the
// rotation object, incoming intermediates); a state using none of it is
// still written as format 1, so a downgrade works until a rotation starts.
const stateFormat = 2

// stateFormatV1 is the first format: one active root, no rotation.
const stateFormatV1 = 1

// Statuses of an intermediate generation in the state file.
const (
	// statusStaged: made and published (its CRL reaches the sidecars), not
	// yet signing certificates.
	statusStaged = "staged"
	// statusActive: signs every new certificate; exactly one.
	statusActive = "active"
	// statusRetired: replaced; signs only revocation lists, until it expires
	// (the certificates it signed expire no later than it does).
	statusRetired = "retired"
	// statusIncoming: the new root's intermediate during the first phase of
	// a root rotation: signs revocation lists (and the SDS listener's
	// certificate), not workload certificates yet. Never activated by the
	// renewal loop, only by the rotation.
	statusIncoming = "incoming"
)

// Statuses of a root in the state file (format 2 for all but active).
const (
	// rootStatusActive: the root of the active intermediate; in the bundle.
	rootStatusActive = "active"
	// rootStatusIncoming: the new root of a rotation's first phase: in
	// the bundle, not yet over the active intermediate.
	rootStatusIncoming = "incoming"
	// rootStatusOutgoing: the old root of a rotation's second phase: in
	// the bundle, over no active intermediate.
	rootStatusOutgoing = "outgoing"
	// rootStatusRetired: out of the bundle; kept (without its key once a
	// rotation completes) because an intermediate or a cross-signed root
	// in the file is signed by it.
	rootStatusRetired = "retired"
)

// stateFile is the JSON document of StateFile. File names are relative to
// the CA directory and plain names (no directories).
type stateFile struct {
	Format        int          `json:"format"`
	Roots         []rootEntry  `json:"roots"`
	Intermediates []interEntry `json:"intermediates"`
	// Rotation is the root rotation in progress (format 2); nil when none.
	Rotation *rotationEntry `json:"rotation,omitempty"`
}

// rootEntry is one root of the state file.
type rootEntry struct {
	Name   string `json:"name"`
	Cert   string `json:"cert"`
	Key    string `json:"key,omitempty"`
	Status string `json:"status"`
	// Cross is a certificate with this root's subject and key signed by
	// the root named CrossBy (format 2): it lets a peer trusting only
	// CrossBy verify what this root signed.
	Cross   string `json:"cross,omitempty"`
	CrossBy string `json:"cross_by,omitempty"`
}

// rotationEntry is a root rotation in progress.
type rotationEntry struct {
	// Phase is one of PhaseTrustBoth, PhaseReissue, PhaseTrustNew.
	Phase          string    `json:"phase"`
	StartedAt      time.Time `json:"started_at"`
	PhaseStartedAt time.Time `json:"phase_started_at"`
	OldRoot        string    `json:"old_root"`
	NewRoot        string    `json:"new_root"`
	// RenewOverSeconds is how long the operator asked the re-issue of
	// phase 2 to be spread over (kept for the SDS server across restarts).
	RenewOverSeconds float64 `json:"renew_over_seconds,omitempty"`
}

// interEntry is one intermediate generation of the state file.
type interEntry struct {
	Generation int       `json:"generation"`
	Cert       string    `json:"cert"`
	Key        string    `json:"key"`
	Root       string    `json:"root"`
	Status     string    `json:"status"`
	StagedAt   time.Time `json:"staged_at,omitzero"`
}

// legacyRootName is the name of the root of the first layout.
const legacyRootName = "root"

// intermediateFiles returns the certificate and key file names of an
// intermediate generation; generation 1 is the first layout's.
func intermediateFiles(gen int) (cert, key string) {
	if gen == 1 {
		return IntermediateCertFile, IntermediateKeyFile
	}
	g := strconv.Itoa(gen)
	return "intermediate-" + g + ".crt", "intermediate-" + g + ".key"
}

// readState reads dir's state file; ok is false if there is none (the
// first layout).
func readState(dir string) (st *stateFile, ok bool, err error) {
	path := filepath.Join(dir, StateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("load CA: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var s stateFile
	if err := dec.Decode(&s); err != nil {
		return nil, false, fmt.Errorf("load CA: %s: corrupt state file: %w (restore it from a backup)", path, err)
	}
	if s.Format != stateFormat && s.Format != stateFormatV1 {
		return nil, false, fmt.Errorf("load CA: %s: format %d, this sds-server reads format %d: it was written by a newer version; run that version", path, s.Format, stateFormat)
	}
	if err := s.check(); err != nil {
		return nil, false, fmt.Errorf("load CA: %s: %w", path, err)
	}
	return &s, true, nil
}

// check validates the structure of a state file (not the files it names).
func (s *stateFile) check() error {
	roots := map[string]string{} // name -> status
	count := map[string]int{}
	for _, r := range s.Roots {
		if _, dup := roots[r.Name]; r.Name == "" || dup {
			return fmt.Errorf("root name %q is empty or repeated", r.Name)
		}
		if err := plainName(r.Cert); err != nil {
			return err
		}
		for _, f := range []string{r.Key, r.Cross} {
			if f != "" {
				if err := plainName(f); err != nil {
					return err
				}
			}
		}
		switch r.Status {
		case rootStatusActive:
		case rootStatusIncoming, rootStatusOutgoing, rootStatusRetired:
			if s.Format < stateFormat {
				return fmt.Errorf("root %q: status %q needs format %d", r.Name, r.Status, stateFormat)
			}
		default:
			return fmt.Errorf("root %q: unknown status %q", r.Name, r.Status)
		}
		if (r.Cross == "") != (r.CrossBy == "") {
			return fmt.Errorf("root %q: cross and cross_by go together", r.Name)
		}
		roots[r.Name] = r.Status
		count[r.Status]++
	}
	for _, r := range s.Roots {
		if r.CrossBy != "" {
			if _, ok := roots[r.CrossBy]; !ok || r.CrossBy == r.Name {
				return fmt.Errorf("root %q is cross-signed by %q, which is not another root in the file", r.Name, r.CrossBy)
			}
		}
	}
	if count[rootStatusActive] != 1 || count[rootStatusIncoming] > 1 || count[rootStatusOutgoing] > 1 {
		return fmt.Errorf("%d active, %d incoming and %d outgoing roots, want exactly one active and at most one of the others",
			count[rootStatusActive], count[rootStatusIncoming], count[rootStatusOutgoing])
	}
	if err := s.checkRotation(roots, count); err != nil {
		return err
	}
	gens := map[int]bool{}
	staged, incoming, active := 0, 0, 0
	for _, in := range s.Intermediates {
		if in.Generation < 1 || gens[in.Generation] {
			return fmt.Errorf("intermediate generation %d is invalid or repeated", in.Generation)
		}
		gens[in.Generation] = true
		if err := plainName(in.Cert); err != nil {
			return err
		}
		if err := plainName(in.Key); err != nil {
			return err
		}
		rs, ok := roots[in.Root]
		if !ok {
			return fmt.Errorf("intermediate generation %d names root %q, which is not in the file", in.Generation, in.Root)
		}
		switch in.Status {
		case statusActive:
			active++
			if rs != rootStatusActive {
				return fmt.Errorf("the active intermediate generation %d is under root %q, which is %s, not active", in.Generation, in.Root, rs)
			}
		case statusStaged:
			staged++
		case statusIncoming:
			incoming++
			if rs != rootStatusIncoming {
				return fmt.Errorf("the incoming intermediate generation %d is under root %q, which is %s, not incoming", in.Generation, in.Root, rs)
			}
		case statusRetired:
		default:
			return fmt.Errorf("intermediate generation %d: unknown status %q", in.Generation, in.Status)
		}
	}
	if active != 1 || staged > 1 {
		return fmt.Errorf("%d active and %d staged intermediates, want exactly one active and at most one staged", active, staged)
	}
	if incoming != count[rootStatusIncoming] {
		return fmt.Errorf("%d incoming intermediates for %d incoming roots, want one each", incoming, count[rootStatusIncoming])
	}
	return nil
}

// checkRotation checks that the rotation object and the root statuses
// agree.
func (s *stateFile) checkRotation(roots map[string]string, count map[string]int) error {
	r := s.Rotation
	if r == nil {
		if count[rootStatusIncoming]+count[rootStatusOutgoing] > 0 {
			return errors.New("incoming or outgoing root without a rotation")
		}
		return nil
	}
	if s.Format < stateFormat {
		return fmt.Errorf("a rotation needs format %d", stateFormat)
	}
	want := map[string][2]string{ // phase -> status of old root, new root
		PhaseTrustBoth: {rootStatusActive, rootStatusIncoming},
		PhaseReissue:   {rootStatusOutgoing, rootStatusActive},
		PhaseTrustNew:  {rootStatusRetired, rootStatusActive},
	}
	w, ok := want[r.Phase]
	if !ok {
		return fmt.Errorf("rotation: unknown phase %q", r.Phase)
	}
	if roots[r.OldRoot] != w[0] || roots[r.NewRoot] != w[1] || r.OldRoot == r.NewRoot {
		return fmt.Errorf("rotation phase %s wants old root %q %s and new root %q %s; they are %q and %q",
			r.Phase, r.OldRoot, w[0], r.NewRoot, w[1], roots[r.OldRoot], roots[r.NewRoot])
	}
	return nil
}

// plainName refuses a file name that is not a plain name inside the CA
// directory.
func plainName(name string) error {
	if name == "" || name == "." || name == ".." || filepath.Base(name) != name || name == StateFile {
		return fmt.Errorf("file name %q is not a plain file name", name)
	}
	return nil
}

// diskWriter makes the CA's lifecycle changes durable. Every file is
// written whole to a temporary file, fsynced, renamed into place and the
// directory fsynced; the state file goes last. hook, when set (tests), is
// called after each step and stops the change there if it returns an
// error, as a crash would.
type diskWriter struct {
	dir  string
	hook func(step string) error
}

func (w diskWriter) step(name string) error {
	if w.hook == nil {
		return nil
	}
	return w.hook(name)
}

// writeFiles stores files: all written and synced to temporary files, then
// renamed, then the directory synced. Each may replace an orphan of an
// earlier, interrupted change (nothing in the state file names it).
func (w diskWriter) writeFiles(files []file) error {
	return writeFilesHook(w.dir, files, w.step)
}

// writeState replaces the state file, the commit point of a change.
func (w diskWriter) writeState(s *stateFile) error {
	s.Format = s.neededFormat()
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	tmp, err := writeTemp(w.dir, StateFile, data, 0o600)
	if err != nil {
		return err
	}
	if err := w.step("write " + StateFile); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, filepath.Join(w.dir, StateFile)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", filepath.Join(w.dir, StateFile), err)
	}
	if err := w.step("rename " + StateFile); err != nil {
		return err
	}
	if err := syncDir(w.dir); err != nil {
		return fmt.Errorf("sync %s: %w", w.dir, err)
	}
	return w.step("sync dir after " + StateFile)
}

// removeFiles deletes files the state file no longer names; a crash
// leaves them behind, unused.
func (w diskWriter) removeFiles(names []string) error {
	for _, n := range names {
		if err := os.Remove(filepath.Join(w.dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err := w.step("remove " + n); err != nil {
			return err
		}
	}
	return syncDir(w.dir)
}

// neededFormat is the oldest format that can express s: format 1 unless
// a rotation feature is in use.
func (s *stateFile) neededFormat() int {
	if s.Rotation != nil {
		return stateFormat
	}
	for _, r := range s.Roots {
		if r.Status != rootStatusActive || r.Cross != "" {
			return stateFormat
		}
	}
	for _, in := range s.Intermediates {
		if in.Status == statusIncoming {
			return stateFormat
		}
	}
	return stateFormatV1
}
