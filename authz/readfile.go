package authz

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"syscall"
)

// MaxFileSize bounds an ACL file; a bigger one is an error, not a policy.
const MaxFileSize = 1 << 20

// ReadFile reads one ACL file the way the server does, so that neither the
// policy watcher nor `acl check` can be blocked or made to exhaust memory by
// what it is pointed at. Symbolic links are followed. Anything that is not a
// regular file (a directory, FIFO, device or socket) is refused before it is
// opened; the file is opened non-blocking (a FIFO swapped in meanwhile cannot
// block the open) and checked again once open; at most MaxFileSize bytes are
// read, a bigger file is an error.
//
// Errors do not repeat the path: callers name the file their own way (the
// server relative to policy_dir, `acl check` as given), usually with a
// *PathError.
func ReadFile(name string) ([]byte, error) {
	info, err := os.Stat(name)
	if err != nil {
		return nil, statError(name, err)
	}
	if err := regular(info); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, bare(err)
	}
	defer f.Close()
	if info, err = f.Stat(); err != nil {
		return nil, bare(err)
	}
	if err := regular(info); err != nil {
		return nil, err
	}
	// Sized from the open file, so that a poll reads each file in one go;
	// the limit holds even if the file grows meanwhile.
	data := make([]byte, 0, min(info.Size(), MaxFileSize)+1)
	for int64(len(data)) <= MaxFileSize {
		if len(data) == cap(data) {
			data = slices.Grow(data, min(2*cap(data), MaxFileSize+1)-len(data))
		}
		n, err := f.Read(data[len(data):min(cap(data), MaxFileSize+1)])
		data = data[:len(data)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, bare(err)
		}
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("larger than %d bytes", MaxFileSize)
	}
	return data, nil
}

// statError describes a failed os.Stat of name without repeating the path,
// and names the target when name is a symbolic link: a dangling link says
// "symbolic link to ..data/web.json: no such file or directory", a loop
// "symbolic link to b.json: too many levels of symbolic links".
func statError(name string, err error) error {
	err = bare(err)
	if target, lerr := os.Readlink(name); lerr == nil {
		return fmt.Errorf("symbolic link to %s: %w", target, err)
	}
	return err
}

// regular refuses what is not a regular file, saying what it is.
func regular(info fs.FileInfo) error {
	m := info.Mode()
	if m.IsRegular() {
		return nil
	}
	var kind string
	switch {
	case m.IsDir():
		kind = "a directory"
	case m&fs.ModeNamedPipe != 0:
		kind = "a named pipe (FIFO)"
	case m&fs.ModeSocket != 0:
		kind = "a socket"
	case m&fs.ModeCharDevice != 0:
		kind = "a character device"
	case m&fs.ModeDevice != 0:
		kind = "a block device"
	}
	if kind == "" {
		return errors.New("not a regular file")
	}
	return fmt.Errorf("%s, not a regular file", kind)
}

// bare drops the operation and path of an *fs.PathError ("open /a/b: x"
// becomes "x"), since the caller names the file.
func bare(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// LoadFile reads, parses and validates one ACL file exactly as the server
// loads each file of policy_dir (ReadFile, then Parse and Validate): the
// offline `acl check` uses it so that it accepts what the server accepts.
// name is used in errors as given; env is the destination's environment, or
// "" when unknown.
func LoadFile(name, env string) (ACL, error) {
	return loadFile(name, name, env)
}

// loadFile reads, parses and validates one ACL file; rel names it in errors.
func loadFile(file, rel, env string) (ACL, error) {
	data, err := ReadFile(file)
	if err != nil {
		return nil, &PathError{Path: rel, Err: err}
	}
	return parseFile(data, rel, env)
}

// parseFile parses and validates the content of one ACL file.
func parseFile(data []byte, rel, env string) (ACL, error) {
	acl, err := Parse(data, rel)
	if err != nil {
		return nil, err
	}
	if err := acl.Validate(rel, env); err != nil {
		return nil, err
	}
	return acl, nil
}
