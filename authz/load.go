package authz

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/meshid/sds-server/issuer"
)

// Key names the destination service an ACL file is for.
type Key struct {
	Env     string
	Service string
}

// String returns env/service.
func (k Key) String() string { return k.Env + "/" + k.Service }

// Result is what LoadDir found for one destination: a valid ACL, or why
// there is none.
type Result struct {
	// Path is the file, relative to the directory and slash-separated
	// (the first file when several claim the destination).
	Path string
	// ACL is the parsed and validated ACL; meaningful only when Err is nil.
	ACL ACL
	// Err says why the destination has no usable ACL: a read, parse or
	// validation error (*ParseError, *ValidationError, wrapped), or
	// several files for the destination.
	Err error
}

// PathError reports a path in a policy directory that names no destination
// (a file outside an environment directory, a bad name, an unknown
// extension) or that could not be read.
type PathError struct {
	Path string // relative to the directory, slash-separated
	Err  error
}

func (e *PathError) Error() string { return e.Path + ": " + e.Err.Error() }

func (e *PathError) Unwrap() error { return e.Err }

// Dir is the content of a policy directory.
type Dir struct {
	// Policies has one Result per destination that has a file, usable or
	// not. A destination without a file is absent.
	Policies map[Key]Result
	// Stray lists, sorted by path, the *PathError of every path that does
	// not name a destination. These are reported rather than skipped, so a
	// misnamed file (prod/Web.json, prod/web.jsn) does not silently leave
	// its service on the default policy.
	Stray []error
	// Unreadable maps the environment directories that exist but could not
	// be read (a dangling or looping symbolic link, no permission) to why.
	// Their services are unknown, so a caller keeping last good policies
	// keeps those of these environments. Each is also in Stray.
	Unreadable map[string]error
}

// Err joins every problem of the directory (stray paths, then unusable
// destinations in key order), or returns nil when every file is a valid ACL.
func (d *Dir) Err() error {
	errs := slices.Clone(d.Stray)
	keys := make([]Key, 0, len(d.Policies))
	for k := range d.Policies {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b Key) int { return strings.Compare(a.String(), b.String()) })
	for _, k := range keys {
		if err := d.Policies[k].Err; err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// LoadDir reads a policy directory laid out as <dir>/<env>/<service>.json
// (or .yaml, .yml), one ACL file per destination service. Each file is
// parsed and validated on its own, so one bad file does not affect the
// others: the caller keeps the last good ACL of a destination whose Result
// has an error. Editor leftovers are ignored: names starting with "." or "#"
// (dotfiles, Kubernetes ..data links, Emacs locks), ending with "~", ".swp",
// ".swx", ".tmp" or "___jb_tmp___"/"___jb_old___", and Vim's "4913".
// Everything else that does not fit the layout is listed in Dir.Stray.
//
// Symbolic links are followed, for environment directories and for files
// (a Kubernetes ConfigMap volume is made of them). A file whose name claims
// a destination but that cannot be read (a dangling or looping link, a FIFO,
// too large) is an error of that destination, and an environment directory
// that cannot be read is listed in Dir.Unreadable, so that the caller keeps
// their last good policies rather than dropping them.
//
// LoadDir fails only when dir itself cannot be read. It is ReadDir, then
// Snapshot.Load.
func LoadDir(dir string) (*Dir, error) {
	s, err := ReadDir(dir)
	if err != nil {
		return nil, err
	}
	return s.Load(), nil
}

// Snapshot is what ReadDir read of a policy directory: the layout it found
// and the bytes of every ACL file, before parsing. Its Sum identifies that
// content, so a poller can tell whether what it would load changed, wherever
// symbolic links lead and whatever the timestamps say.
type Snapshot struct {
	files      map[Key][]readFile
	stray      []error
	unreadable map[string]error
	sum        [sha256.Size]byte
}

// readFile is one file that claims a destination, as read.
type readFile struct {
	rel  string
	data []byte
	err  error // a *PathError: why the file could not be read
}

// ReadDir reads the layout and the files of a policy directory (see LoadDir)
// without parsing them. Each file is read with ReadFile: bounded in size,
// never blocking. It fails only when dir itself cannot be read.
func ReadDir(dir string) (*Snapshot, error) {
	top, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read policy directory: %w", err)
	}
	s := &Snapshot{files: map[Key][]readFile{}, unreadable: map[string]error{}}
	h := sha256.New()
	stray := func(rel string, err error) {
		s.stray = append(s.stray, &PathError{Path: rel, Err: err})
		fmt.Fprintf(h, "stray %q %v\n", rel, err)
	}
	for _, te := range top {
		env := te.Name()
		if ignored(env) {
			continue
		}
		envDir := filepath.Join(dir, env)
		nameErr := issuer.ValidateName("environment", env)
		info, err := os.Stat(envDir)
		switch {
		case err != nil && nameErr == nil:
			// Named like an environment but unreadable: the last good
			// policies of its services are kept.
			err = statError(envDir, err)
			s.unreadable[env] = &PathError{Path: env + "/", Err: err}
			stray(env+"/", err)
			continue
		case err != nil:
			stray(env, statError(envDir, err))
			continue
		case !info.IsDir():
			stray(env, errors.New("an ACL file belongs in an environment directory, as <env>/<service>.json"))
			continue
		case nameErr != nil:
			stray(env+"/", nameErr)
			continue
		}
		entries, err := os.ReadDir(envDir)
		if err != nil {
			s.unreadable[env] = &PathError{Path: env + "/", Err: bare(err)}
			stray(env+"/", bare(err))
			continue
		}
		for _, fe := range entries {
			name := fe.Name()
			if ignored(name) {
				continue
			}
			rel := path.Join(env, name)
			full := filepath.Join(envDir, name)
			svc, err := serviceOf(name)
			if err != nil {
				if info, serr := os.Stat(full); serr == nil && info.IsDir() {
					stray(rel+"/", errors.New("directories are not read inside an environment directory"))
				} else {
					stray(rel, err)
				}
				continue
			}
			f := readFile{rel: rel}
			if f.data, err = ReadFile(full); err != nil {
				f.err = &PathError{Path: rel, Err: err}
			}
			fmt.Fprintf(h, "file %q %d %v\n", rel, len(f.data), f.err)
			h.Write(f.data)
			k := Key{Env: env, Service: svc}
			s.files[k] = append(s.files[k], f)
		}
	}
	slices.SortFunc(s.stray, func(a, b error) int {
		return strings.Compare(a.(*PathError).Path, b.(*PathError).Path)
	})
	h.Sum(s.sum[:0])
	return s, nil
}

// serviceOf returns the service an ACL file name is for, or why the name
// names none.
func serviceOf(name string) (string, error) {
	if _, ok := FormatOf(name); !ok {
		return "", errors.New("unsupported file extension: name ACL files <service>.json, .yaml or .yml")
	}
	svc := strings.TrimSuffix(name, filepath.Ext(name))
	if err := issuer.ValidateName("service", svc); err != nil {
		return "", err
	}
	return svc, nil
}

// Sum is a SHA-256 of everything the snapshot holds: the layout, the
// problems found and the bytes of every file. Two snapshots with the same
// Sum load the same policies.
func (s *Snapshot) Sum() [sha256.Size]byte { return s.sum }

// Load parses and validates the files of the snapshot.
func (s *Snapshot) Load() *Dir {
	d := &Dir{Policies: map[Key]Result{}, Stray: slices.Clone(s.stray), Unreadable: maps.Clone(s.unreadable)}
	for k, files := range s.files {
		f := files[0]
		switch {
		case len(files) > 1:
			paths := make([]string, len(files))
			for i, f := range files {
				paths[i] = f.rel
			}
			d.Policies[k] = Result{Path: f.rel, Err: fmt.Errorf("%s: the ACL of %s is defined by several files (%s); keep one",
				f.rel, k, strings.Join(paths, ", "))}
		case f.err != nil:
			d.Policies[k] = Result{Path: f.rel, Err: f.err}
		default:
			acl, err := parseFile(f.data, f.rel, k.Env)
			d.Policies[k] = Result{Path: f.rel, ACL: acl, Err: err}
		}
	}
	return d
}

// ignored reports editor and tooling leftovers that LoadDir skips silently.
func ignored(name string) bool {
	if strings.HasPrefix(name, ".") || strings.HasPrefix(name, "#") || name == "4913" {
		return true
	}
	for _, suffix := range []string{"~", ".swp", ".swx", ".tmp", "___jb_tmp___", "___jb_old___"} {
		if strings.HasSuffix(name, suffix) {
			return true
		}
	}
	return false
}
