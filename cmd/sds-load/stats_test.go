package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func TestPercentiles(t *testing.T) {
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = ms(100 - i) // reversed: percentiles must sort
	}
	tests := []struct {
		name string
		in   []time.Duration
		want Percentiles
	}{
		{"none", nil, Percentiles{}},
		{"one", []time.Duration{ms(7)}, Percentiles{N: 1, P50: ms(7), P90: ms(7), P99: ms(7), Max: ms(7)}},
		{"1..100", hundred, Percentiles{N: 100, P50: ms(50), P90: ms(90), P99: ms(99), Max: ms(100)}},
		{"one outlier in ten", []time.Duration{ms(1), ms(1), ms(1), ms(1), ms(1), ms(1), ms(1), ms(1), ms(1), ms(500)},
			Percentiles{N: 10, P50: ms(1), P90: ms(1), P99: ms(500), Max: ms(500)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := append([]time.Duration(nil), tt.in...)
			if got := percentiles(tt.in); got != tt.want {
				t.Errorf("percentiles = %+v, want %+v", got, tt.want)
			}
			for i := range in {
				if in[i] != tt.in[i] {
					t.Fatalf("percentiles reordered its input")
				}
			}
		})
	}
}

func TestErrorCounter(t *testing.T) {
	c := newErrorCounter()
	errs := []error{
		nil,
		status.Error(codes.PermissionDenied, "node revoked"),
		fmt.Errorf("open stream: %w", status.Error(codes.PermissionDenied, "again")),
		status.Error(codes.Unavailable, "connection refused"),
		errTimeout,
		fmt.Errorf("sidecar 3: %w", errTimeout),
		errors.New("decode secret: bad bytes"),
		context.DeadlineExceeded, // gRPC's status.FromError maps it
	}
	for _, e := range errs {
		c.add(e)
	}
	want := map[string]int{"PermissionDenied": 2, "Unavailable": 1, "DeadlineExceeded": 3, "Unknown": 1}
	got := c.snapshot()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("counts = %v, want %v", got, want)
	}
	if c.total() != 7 {
		t.Errorf("total = %d, want 7", c.total())
	}
	if s := c.String(); !strings.Contains(s, "PermissionDenied: 2 (e.g. rpc error: code = PermissionDenied desc = node revoked)") {
		t.Errorf("String() = %q: want the first message of each code", s)
	}
	if got := newErrorCounter().String(); got != "none" {
		t.Errorf("empty counter String() = %q", got)
	}
	if got := formatCodes(want); got != "DeadlineExceeded=3, PermissionDenied=2, Unavailable=1, Unknown=1" {
		t.Errorf("formatCodes = %q", got)
	}
}

func TestParseProc(t *testing.T) {
	status := "Name:\tsds-server\nVmPeak:\t  900 kB\nVmRSS:\t   51234 kB\nThreads:\t9\n"
	if n, err := parseRSS(status); err != nil || n != 51234 {
		t.Errorf("parseRSS = %d, %v; want 51234", n, err)
	}
	if _, err := parseRSS("Name:\tkthreadd\n"); err == nil {
		t.Error("parseRSS without VmRSS: no error")
	}
	if _, err := parseRSS("VmRSS:\tlots kB\n"); err == nil {
		t.Error("parseRSS of a non-number: no error")
	}
	// Field 2 may hold spaces and ')'; utime=250 and stime=50 ticks.
	stat := "4242 (sds server) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 50 0 0 20 0 9 0 100 0 0"
	if d, err := parseCPU(stat); err != nil || d != 3*time.Second {
		t.Errorf("parseCPU = %s, %v; want 3s", d, err)
	}
	for _, bad := range []string{"4242 sds-server S 1", "4242 (x) S 1 2 3", "4242 (x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 ab 50"} {
		if _, err := parseCPU(bad); err == nil {
			t.Errorf("parseCPU(%q): no error", bad)
		}
	}
}
