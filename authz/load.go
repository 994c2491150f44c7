package authz

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/meshid/sds-server/issuer"
)

// MaxFileSize bounds an ACL file; a bigger one is an error, not a policy.
const MaxFileSize = 1 << 20

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
// LoadDir fails only when dir itself cannot be read.
func LoadDir(dir string) (*Dir, error) {
	top, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read policy directory: %w", err)
	}
	d := &Dir{Policies: map[Key]Result{}}
	stray := func(rel string, format string, args ...any) {
		d.Stray = append(d.Stray, &PathError{Path: rel, Err: fmt.Errorf(format, args...)})
	}
	files := map[Key][]string{}
	for _, te := range top {
		env := te.Name()
		if ignored(env) {
			continue
		}
		info, err := os.Stat(filepath.Join(dir, env))
		switch {
		case err != nil:
			stray(env, "%w", err)
			continue
		case !info.IsDir():
			stray(env, "an ACL file belongs in an environment directory, as <env>/<service>.json")
			continue
		}
		if err := issuer.ValidateName("environment", env); err != nil {
			stray(env+"/", "%w", err)
			continue
		}
		entries, err := os.ReadDir(filepath.Join(dir, env))
		if err != nil {
			stray(env+"/", "%w", err)
			continue
		}
		for _, fe := range entries {
			name := fe.Name()
			if ignored(name) {
				continue
			}
			rel := path.Join(env, name)
			info, err := os.Stat(filepath.Join(dir, env, name))
			switch {
			case err != nil:
				stray(rel, "%w", err)
				continue
			case info.IsDir():
				stray(rel+"/", "directories are not read inside an environment directory")
				continue
			case !info.Mode().IsRegular():
				stray(rel, "not a regular file")
				continue
			}
			if _, ok := FormatOf(name); !ok {
				stray(rel, "unsupported file extension: name ACL files <service>.json, .yaml or .yml")
				continue
			}
			svc := strings.TrimSuffix(name, filepath.Ext(name))
			if err := issuer.ValidateName("service", svc); err != nil {
				stray(rel, "%w", err)
				continue
			}
			k := Key{Env: env, Service: svc}
			files[k] = append(files[k], rel)
		}
	}
	slices.SortFunc(d.Stray, func(a, b error) int {
		return strings.Compare(a.(*PathError).Path, b.(*PathError).Path)
	})
	for k, paths := range files {
		if len(paths) > 1 {
			d.Policies[k] = Result{Path: paths[0], Err: fmt.Errorf("%s: the ACL of %s is defined by several files (%s); keep one",
				paths[0], k, strings.Join(paths, ", "))}
			continue
		}
		acl, err := loadFile(filepath.Join(dir, filepath.FromSlash(paths[0])), paths[0], k.Env)
		d.Policies[k] = Result{Path: paths[0], ACL: acl, Err: err}
	}
	return d, nil
}

// loadFile reads, parses and validates one ACL file; rel names it in errors.
func loadFile(file, rel, env string) (ACL, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, &PathError{Path: rel, Err: err}
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, &PathError{Path: rel, Err: err}
	}
	if len(data) > MaxFileSize {
		return nil, &PathError{Path: rel, Err: fmt.Errorf("larger than %d bytes", MaxFileSize)}
	}
	acl, err := Parse(data, rel)
	if err != nil {
		return nil, err
	}
	if err := acl.Validate(rel, env); err != nil {
		return nil, err
	}
	return acl, nil
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
