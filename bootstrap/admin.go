package bootstrap

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
)

// AdminSocketMode is the mode Envoy gives its admin Unix socket: owner
// only. On Linux, connecting to a Unix socket needs write permission on it.
const AdminSocketMode = 0o600

// MaxSocketPath is the longest Unix socket path accepted, in bytes: the
// portable limit of sockaddr_un.sun_path (104 on macOS, 108 on Linux) less
// its terminating NUL on the smaller one.
const MaxSocketPath = 104

// ErrAdminNotLoopback is returned for a TCP admin address that is not a
// loopback address when that was not explicitly allowed.
var ErrAdminNotLoopback = errors.New("not a loopback address: whoever reaches Envoy's admin interface can read the bootstrap token in /config_dump and the node id in /server_info, and take this node's identity, private key included")

// CheckAdminSocket checks the path of Envoy's admin Unix socket: absolute
// (Envoy would resolve a relative one against its own working directory), a
// file system path (an abstract socket has no permissions), and short
// enough for a socket address.
func CheckAdminSocket(path string) error {
	switch {
	case path == "":
		return errors.New("admin socket path is empty")
	case !filepath.IsAbs(path):
		return fmt.Errorf("admin socket path %q is not absolute (Envoy would resolve it against its own working directory)", path)
	case len(path) > MaxSocketPath:
		return fmt.Errorf("admin socket path %s is %d bytes, longer than the %d a Unix socket path may have; choose a shorter path", path, len(path), MaxSocketPath)
	}
	for _, c := range path {
		if c < ' ' || c == 0x7f {
			return fmt.Errorf("admin socket path %q contains control characters", path)
		}
	}
	return nil
}

// CheckAdminAddr checks a TCP admin address HOST:PORT and returns its IP
// and port. HOST is an IP address or "localhost" (127.0.0.1: Envoy does
// not resolve names for its admin listener). Unless allowInsecure, it must
// be a loopback address (127.0.0.0/8, ::1); otherwise the error wraps
// ErrAdminNotLoopback.
func CheckAdminAddr(addr string, allowInsecure bool) (string, int, error) {
	if host, port, err := net.SplitHostPort(addr); err == nil && host == "localhost" {
		addr = net.JoinHostPort("127.0.0.1", port)
	}
	host, port, err := splitAddr("admin address", addr, true)
	if err != nil {
		return "", 0, err
	}
	if !allowInsecure && !net.ParseIP(host).IsLoopback() {
		return "", 0, fmt.Errorf("admin address %s: %w", addr, ErrAdminNotLoopback)
	}
	return host, port, nil
}
