// Package systemd holds the systemd units sds-server ships:
// sds-server.service (the server, hardened, with its data in a
// StateDirectory), its sysusers.d entry, an example config.yaml and
// environment file. The tests here parse the unit, check the settings the
// deployment relies on and that they agree with config.yaml, and run
// `systemd-analyze verify` on it where that tool exists. The agent's unit
// comes with the agent (issue 12).
package systemd
