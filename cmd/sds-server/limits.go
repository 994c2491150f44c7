package main

import (
	"fmt"
	"log/slog"
	"syscall"
	"time"

	"github.com/meshid/sds-server/sds"
)

// limitsConfig is the limits.* keys (env SDS_LIMITS_*): what any client can
// make the server hold. See sds.Limits and the README's "Limits".
type limitsConfig struct {
	HandshakeTimeout   time.Duration `mapstructure:"handshake_timeout"`
	IdleTimeout        time.Duration `mapstructure:"idle_timeout"`
	MaxConnections     int           `mapstructure:"max_connections"`
	MaxStreamsPerNode  int           `mapstructure:"max_streams_per_node"`
	MaxResourceNames   int           `mapstructure:"max_resource_names"`
	MaxNameLength      int           `mapstructure:"max_name_length"`
	MaxRequestBytes    int           `mapstructure:"max_request_bytes"`
	MaxMetadataBytes   int           `mapstructure:"max_metadata_bytes"`
	AuthFailureRate    float64       `mapstructure:"auth_failure_rate"`
	AuthFailureBurst   int           `mapstructure:"auth_failure_burst"`
	AuthFailureSources int           `mapstructure:"auth_failure_sources"`
	NodeRetention      time.Duration `mapstructure:"node_retention"`
}

// limitDefaults are the limits.* defaults, from sds.DefaultLimits so the
// library and the command agree.
func limitDefaults() map[string]any {
	d := sds.DefaultLimits()
	return map[string]any{
		"limits.handshake_timeout":    d.HandshakeTimeout,
		"limits.idle_timeout":         d.IdleTimeout,
		"limits.max_connections":      d.MaxConnections,
		"limits.max_streams_per_node": d.MaxStreamsPerNode,
		"limits.max_resource_names":   d.MaxResourceNames,
		"limits.max_name_length":      d.MaxNameLength,
		"limits.max_request_bytes":    d.MaxRequestBytes,
		"limits.max_metadata_bytes":   d.MaxMetadataBytes,
		"limits.auth_failure_rate":    d.AuthFailureRate,
		"limits.auth_failure_burst":   d.AuthFailureBurst,
		"limits.auth_failure_sources": d.AuthFailureSources,
		"limits.node_retention":       d.NodeRetention,
	}
}

// validate checks each limit against a floor below which a real Envoy would
// be refused (or a ceiling past which the limit protects nothing).
func (l *limitsConfig) validate() error {
	durs := []struct {
		key      string
		v, floor time.Duration
	}{
		{"limits.handshake_timeout", l.HandshakeTimeout, time.Second},
		{"limits.idle_timeout", l.IdleTimeout, time.Second},
		{"limits.node_retention", l.NodeRetention, time.Hour},
	}
	for _, d := range durs {
		if d.v < d.floor {
			return fmt.Errorf("%s %s: want at least %s", d.key, d.v, d.floor)
		}
	}
	ints := []struct {
		key            string
		v, floor, ceil int
		why            string
	}{
		{"limits.max_connections", l.MaxConnections, 1, 1 << 20, ""},
		{"limits.max_streams_per_node", l.MaxStreamsPerNode, 4, 1 << 16, " (an Envoy opens one SDS stream per secret and two ECDS streams)"},
		{"limits.max_resource_names", l.MaxResourceNames, 4, 1 << 16, ""},
		{"limits.max_name_length", l.MaxNameLength, 64, 1 << 20, " (names hold SPIFFE IDs)"},
		{"limits.max_request_bytes", l.MaxRequestBytes, 16 << 10, 64 << 20, " (Envoy's requests carry its node metadata)"},
		{"limits.max_metadata_bytes", l.MaxMetadataBytes, 4 << 10, 1 << 24, " (the bearer token travels in it)"},
		{"limits.auth_failure_burst", l.AuthFailureBurst, 1, 1 << 20, ""},
		{"limits.auth_failure_sources", l.AuthFailureSources, 16, 1 << 24, ""},
	}
	for _, i := range ints {
		if i.v < i.floor || i.v > i.ceil {
			return fmt.Errorf("%s %d: want %d to %d%s", i.key, i.v, i.floor, i.ceil, i.why)
		}
	}
	if !(l.AuthFailureRate > 0) {
		return fmt.Errorf("limits.auth_failure_rate %g: want failures per second per source above 0", l.AuthFailureRate)
	}
	return nil
}

// sds returns the limits for sds.Config.
func (l *limitsConfig) sds() sds.Limits {
	return sds.Limits{
		HandshakeTimeout: l.HandshakeTimeout, IdleTimeout: l.IdleTimeout, MaxConnections: l.MaxConnections,
		MaxStreamsPerNode: l.MaxStreamsPerNode, MaxResourceNames: l.MaxResourceNames, MaxNameLength: l.MaxNameLength,
		MaxRequestBytes: l.MaxRequestBytes, MaxMetadataBytes: l.MaxMetadataBytes,
		AuthFailureRate: l.AuthFailureRate, AuthFailureBurst: l.AuthFailureBurst, AuthFailureSources: l.AuthFailureSources,
		NodeRetention: l.NodeRetention,
	}
}

// fdReserve is the file descriptors kept out of limits.max_connections for
// the admin socket, the metrics listener, the state file and the CA.
const fdReserve = 64

// fitConnections lowers maxConns to what the open-file limit leaves after
// fdReserve, with a warning, so the connection limit refuses a flood before
// accept() starts failing for every listener (admin and metrics included).
func fitConnections(maxConns int, log *slog.Logger) int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return maxConns
	}
	return fitToFiles(maxConns, rl.Cur, log)
}

func fitToFiles(maxConns int, nofile uint64, log *slog.Logger) int {
	if nofile > uint64(1<<40) || uint64(maxConns)+fdReserve <= nofile {
		return maxConns
	}
	fit := 1
	if nofile > 2*fdReserve {
		fit = int(nofile - fdReserve)
	} else if nofile > 1 {
		fit = int(nofile / 2)
	}
	log.Warn("limits.max_connections lowered to fit the open-file limit; raise `ulimit -n` to allow more",
		"configured", maxConns, "open_file_limit", nofile, "effective", fit)
	return fit
}
