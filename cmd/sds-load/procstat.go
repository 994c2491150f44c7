package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It
// is 100 on every Linux architecture Go supports (the kernel exports the
// same value to user space whatever CONFIG_HZ is).
const clockTicks = 100

// procSample is a server process's resident memory and CPU time so far.
type procSample struct {
	RSSKiB int64         // VmRSS from /proc/PID/status
	CPU    time.Duration // utime + stime from /proc/PID/stat
}

// readProc samples process pid from /proc.
func readProc(pid int) (procSample, error) {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return procSample{}, fmt.Errorf("read server memory (is --server-pid %d a running process on this machine?): %w", pid, err)
	}
	rss, err := parseRSS(string(st))
	if err != nil {
		return procSample{}, fmt.Errorf("/proc/%d/status: %w", pid, err)
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procSample{}, fmt.Errorf("read server CPU time: %w", err)
	}
	cpu, err := parseCPU(string(stat))
	if err != nil {
		return procSample{}, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return procSample{RSSKiB: rss, CPU: cpu}, nil
}

// parseRSS returns the VmRSS line of a /proc/PID/status text, in KiB.
func parseRSS(status string) (int64, error) {
	for _, l := range strings.Split(status, "\n") {
		v, ok := strings.CutPrefix(l, "VmRSS:")
		if !ok {
			continue
		}
		v = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("VmRSS %q: %w", v, err)
		}
		return n, nil
	}
	return 0, fmt.Errorf("no VmRSS line (a kernel thread or a zombie?)")
}

// parseCPU returns utime+stime of a /proc/PID/stat line. The command name
// (field 2) is in parentheses and may hold spaces and parentheses itself, so
// fields are counted from the last ')'.
func parseCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("no ')' after the command name")
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("%d fields after the command name, want at least 13", len(f))
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("CPU ticks %q: not a count", s)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// raiseFileLimit sets this process's soft RLIMIT_NOFILE to its hard limit
// (each sidecar on its own connection costs one descriptor) and returns the
// limit now in force.
func raiseFileLimit() (uint64, error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0, fmt.Errorf("read the open-file limit: %w", err)
	}
	if r.Cur < r.Max {
		r.Cur = r.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
			return 0, fmt.Errorf("raise the open-file limit to %d: %w", r.Max, err)
		}
	}
	return r.Cur, nil
}
