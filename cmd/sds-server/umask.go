package main

import "syscall"

// syscallUmask sets the process umask and returns the previous one; used so
// the admin socket is created 0600 with no window where it is wider.
func syscallUmask(mask int) int { return syscall.Umask(mask) }
