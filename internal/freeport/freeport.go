// Package freeport picks loopback TCP ports for child processes (Envoy,
// sds-server) that must be told their port before they start: the e2e tests
// and the demo runner.
//
// A port found by listening on port 0 comes from the kernel's ephemeral
// range, the same range the kernel draws from for the source port of every
// outgoing connection. Between closing the probe and the child binding it,
// any outgoing connection on the machine (an Envoy dialling sds-server, an
// HTTP client) can take it, and the child fails with "Address already in
// use". Ports below the ephemeral range are never handed out that way, so
// Pick draws from there and only has to step around other listeners.
package freeport

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Picker hands out distinct free loopback ports outside the ephemeral range.
// The zero value is ready to use; it is safe for concurrent use.
type Picker struct {
	mu     sync.Mutex
	issued map[int]bool
}

// lowest is the lowest port Pick draws from: above the well-known and most
// registered service ports.
const lowest = 10000

// rangeFile is where Linux keeps the ephemeral port range.
const rangeFile = "/proc/sys/net/ipv4/ip_local_port_range"

// ephemeralStart returns the first port of the kernel's ephemeral range, or
// the Linux default (32768) when it cannot be read.
func ephemeralStart() int {
	b, err := os.ReadFile(rangeFile)
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n <= lowest+1000 {
		return 32768
	}
	return n
}

// Pick returns a loopback port that no listener held a moment ago, that is
// outside the kernel's ephemeral range and that this Picker has not returned
// before.
func (p *Picker) Pick() (int, error) {
	hi := ephemeralStart()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.issued == nil {
		p.issued = map[int]bool{}
	}
	var lastErr error
	for range 200 {
		port := lowest + rand.IntN(hi-lowest)
		if p.issued[port] {
			continue
		}
		if err := probe(port); err != nil {
			lastErr = err
			continue
		}
		p.issued[port] = true
		return port, nil
	}
	if lastErr == nil {
		lastErr = errors.New("every port tried was already handed out")
	}
	return 0, fmt.Errorf("no free loopback port in %d-%d after 200 tries: %w", lowest, hi-1, lastErr)
}

// probe checks that port is free on 127.0.0.1 (and on ::1 where IPv6 is up,
// since a child may bind either).
func probe(port int) error {
	l, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return err
	}
	defer l.Close()
	if l6, err := net.Listen("tcp6", net.JoinHostPort("::1", strconv.Itoa(port))); err == nil {
		l6.Close()
	} else if !isUnavailable(err) {
		return err
	}
	return nil
}

// isUnavailable reports an IPv6 loopback that does not exist on this
// machine (no error of ours), as opposed to a port in use.
func isUnavailable(err error) bool {
	s := err.Error()
	return strings.Contains(s, "cannot assign requested address") || strings.Contains(s, "address family not supported")
}
