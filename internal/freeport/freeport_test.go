package freeport

import (
	"net"
	"strconv"
	"testing"
)

func TestPickOutsideEphemeralRangeAndDistinct(t *testing.T) {
	var p Picker
	hi := ephemeralStart()
	seen := map[int]bool{}
	for range 50 {
		port, err := p.Pick()
		if err != nil {
			t.Fatal(err)
		}
		if port < lowest || port >= hi {
			t.Fatalf("port %d outside [%d, %d): it could collide with an outgoing connection's source port", port, lowest, hi)
		}
		if seen[port] {
			t.Fatalf("port %d handed out twice", port)
		}
		seen[port] = true
	}
}

func TestPickSkipsPortsInUse(t *testing.T) {
	var p Picker
	// Hold every port the picker returns, so later picks must step around
	// listeners that are really bound.
	for range 20 {
		port, err := p.Pick()
		if err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			t.Fatalf("picked port %d is not free: %v", port, err)
		}
		defer l.Close()
		if err := probe(port); err == nil {
			t.Fatalf("probe says port %d is free while it is bound", port)
		}
	}
}
