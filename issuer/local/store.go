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

// stateFormat is the version of the state file this code reads and writes.
// A change that older code would misread must bump it; older code refuses a
// format it does not know rather than guess.
const stateFormat = 1

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
)

// rootStatusActive is the status of a root that signs new intermediates and
// is in the trust bundle. Root rotation adds other statuses (see
// docs/ca-lifecycle.md).
const rootStatusActive = "active"

// stateFile is the JSON document of StateFile. File names are relative to
// the CA directory and plain names (no directories).
type stateFile struct {
	Format        int          `json:"format"`
	Roots         []rootEntry  `json:"roots"`
	Intermediates []interEntry `json:"intermediates"`
}

// rootEntry is one root of the state file.
type rootEntry struct {
	Name   string `json:"name"`
	Cert   string `json:"cert"`
	Key    string `json:"key,omitempty"`
	Status string `json:"status"`
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
	if s.Format != stateFormat {
		return nil, false, fmt.Errorf("load CA: %s: format %d, this sds-server reads format %d: it was written by a newer version; run that version", path, s.Format, stateFormat)
	}
	if err := s.check(); err != nil {
		return nil, false, fmt.Errorf("load CA: %s: %w", path, err)
	}
	return &s, true, nil
}

// check validates the structure of a state file (not the files it names).
func (s *stateFile) check() error {
	roots := map[string]bool{}
	active := 0
	for _, r := range s.Roots {
		if r.Name == "" || roots[r.Name] {
			return fmt.Errorf("root name %q is empty or repeated", r.Name)
		}
		if err := plainName(r.Cert); err != nil {
			return err
		}
		if r.Key != "" {
			if err := plainName(r.Key); err != nil {
				return err
			}
		}
		if r.Status != rootStatusActive {
			return fmt.Errorf("root %q: unknown status %q", r.Name, r.Status)
		}
		roots[r.Name] = true
	}
	if len(roots) != 1 {
		return fmt.Errorf("%d roots, want exactly one", len(roots))
	}
	gens := map[int]bool{}
	staged := 0
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
		if !roots[in.Root] {
			return fmt.Errorf("intermediate generation %d names root %q, which is not in the file", in.Generation, in.Root)
		}
		switch in.Status {
		case statusActive:
			active++
		case statusStaged:
			staged++
		case statusRetired:
		default:
			return fmt.Errorf("intermediate generation %d: unknown status %q", in.Generation, in.Status)
		}
	}
	if active != 1 || staged > 1 {
		return fmt.Errorf("%d active and %d staged intermediates, want exactly one active and at most one staged", active, staged)
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
	s.Format = stateFormat
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
