package main

import (
	"bytes"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/sds"
)

// TestLimitsConfigLayering: every limits.* key has the library's default,
// and is read from the file and from SDS_LIMITS_* (env over file).
func TestLimitsConfigLayering(t *testing.T) {
	clearSDSEnv(t)
	def, err := loadVia(t, "serve")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := def.Limits.sds(), sds.DefaultLimits(); got != want {
		t.Fatalf("default limits %+v, want sds.DefaultLimits %+v", got, want)
	}
	file := writeFile(t, filepath.Join(t.TempDir(), "sds.yaml"), `
limits:
  handshake_timeout: 3s
  max_connections: 50
  node_retention: 48h
`)
	t.Setenv("SDS_LIMITS_MAX_CONNECTIONS", "70")
	t.Setenv("SDS_LIMITS_AUTH_FAILURE_RATE", "0.5")
	c, err := loadVia(t, "serve", "--config", file)
	if err != nil {
		t.Fatal(err)
	}
	l := c.Limits
	if l.HandshakeTimeout != 3*time.Second || l.MaxConnections != 70 || l.NodeRetention != 48*time.Hour || l.AuthFailureRate != 0.5 {
		t.Fatalf("limits %+v: want handshake 3s (file), max_connections 70 (env over file), retention 48h, rate 0.5 (env)", l)
	}
	if l.IdleTimeout != sds.DefaultLimits().IdleTimeout {
		t.Fatalf("idle_timeout %s, want the default %s", l.IdleTimeout, sds.DefaultLimits().IdleTimeout)
	}
	if err := c.validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
}

func TestLimitsConfigErrors(t *testing.T) {
	clearSDSEnv(t)
	t.Run("bad duration in env", func(t *testing.T) {
		t.Setenv("SDS_LIMITS_IDLE_TIMEOUT", "soon")
		if _, err := loadVia(t, "serve"); err == nil || !strings.Contains(err.Error(), "idle_timeout") {
			t.Fatalf("loadConfig: %v, want an error naming idle_timeout", err)
		}
	})
	t.Run("unknown limit in file", func(t *testing.T) {
		file := writeFile(t, filepath.Join(t.TempDir(), "sds.yaml"), "limits:\n  max_conections: 5\n")
		if _, err := loadVia(t, "serve", "--config", file); err == nil || !strings.Contains(err.Error(), "max_conections") {
			t.Fatalf("loadConfig: %v, want an error naming max_conections", err)
		}
	})
	def, err := loadVia(t, "serve")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		mod  func(*limitsConfig)
		want string
	}{
		{"zero handshake timeout", func(l *limitsConfig) { l.HandshakeTimeout = 0 }, "limits.handshake_timeout"},
		{"sub-second idle timeout", func(l *limitsConfig) { l.IdleTimeout = time.Millisecond }, "limits.idle_timeout"},
		{"short retention", func(l *limitsConfig) { l.NodeRetention = time.Minute }, "limits.node_retention"},
		{"no connections", func(l *limitsConfig) { l.MaxConnections = 0 }, "limits.max_connections"},
		{"too few streams for an Envoy", func(l *limitsConfig) { l.MaxStreamsPerNode = 1 }, "limits.max_streams_per_node"},
		{"negative names", func(l *limitsConfig) { l.MaxResourceNames = -1 }, "limits.max_resource_names"},
		{"names too short for a SPIFFE ID", func(l *limitsConfig) { l.MaxNameLength = 10 }, "limits.max_name_length"},
		{"request too small for Envoy", func(l *limitsConfig) { l.MaxRequestBytes = 100 }, "limits.max_request_bytes"},
		{"metadata too small for the token", func(l *limitsConfig) { l.MaxMetadataBytes = 100 }, "limits.max_metadata_bytes"},
		{"metadata over the ceiling", func(l *limitsConfig) { l.MaxMetadataBytes = 1 << 30 }, "limits.max_metadata_bytes"},
		{"zero rate", func(l *limitsConfig) { l.AuthFailureRate = 0 }, "limits.auth_failure_rate"},
		{"zero burst", func(l *limitsConfig) { l.AuthFailureBurst = 0 }, "limits.auth_failure_burst"},
		{"few sources", func(l *limitsConfig) { l.AuthFailureSources = 1 }, "limits.auth_failure_sources"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := *def
			tt.mod(&c.Limits)
			err := c.validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("validate: %v, want an error naming %s", err, tt.want)
			}
		})
	}
}

// TestFitConnections: the connection limit is lowered below the open-file
// limit, so a flood is refused by the limit before accept() fails for the
// admin socket and the metrics listener too.
func TestFitConnections(t *testing.T) {
	tests := []struct {
		max    int
		nofile uint64
		want   int
		warned bool
	}{
		{10000, 1 << 20, 10000, false},
		{10000, 10064, 10000, false},
		{10000, 1024, 1024 - fdReserve, true},
		{10000, 256, 256 - fdReserve, true},
		{10000, 100, 50, true},
		{300, 256, 256 - fdReserve, true},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		got := fitToFiles(tt.max, tt.nofile, slog.New(slog.NewTextHandler(&buf, nil)))
		if got != tt.want || (buf.Len() > 0) != tt.warned {
			t.Errorf("fitToFiles(%d, %d) = %d (warned %v), want %d (warned %v)", tt.max, tt.nofile, got, buf.Len() > 0, tt.want, tt.warned)
		}
	}
}
