package bootstrap

import (
	"strings"
	"testing"

	filelogv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	downstreamconnsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
)

func TestRenderEnvoyOverloadManager(t *testing.T) {
	for _, c := range []struct {
		name string
		set  int64
		want int64
	}{
		{"default", 0, DefaultMaxDownstreamConnections},
		{"custom", 250, 250},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newEnvoyFixture(t)
			f.opts.MaxDownstreamConnections = c.set
			out, err := RenderEnvoy(f.opts)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := parseBootstrap(t, out)
			mons := b.GetOverloadManager().GetResourceMonitors()
			if len(mons) != 1 || mons[0].GetName() != DownstreamConnectionsMonitor {
				t.Fatalf("resource monitors %v, want one %s", mons, DownstreamConnectionsMonitor)
			}
			cfg := unpack(t, mons[0].GetTypedConfig(), &downstreamconnsv3.DownstreamConnectionsConfig{})
			if cfg.GetMaxActiveDownstreamConnections() != c.want {
				t.Errorf("max_active_downstream_connections %d, want %d", cfg.GetMaxActiveDownstreamConnections(), c.want)
			}
		})
	}
}

// hcmOf returns the HTTP connection manager of a generated listener.
func hcmOf(t *testing.T, out []byte, listener string) *hcmv3.HttpConnectionManager {
	t.Helper()
	b, _ := parseBootstrap(t, out)
	l := findListener(t, b, listener)
	return unpack(t, l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig(), &hcmv3.HttpConnectionManager{})
}

func TestRenderEnvoyAccessLog(t *testing.T) {
	listeners := []string{InboundListenerName, OutboundListenerName("api"), OutboundListenerName("db")}
	t.Run("off by default", func(t *testing.T) {
		f := newEnvoyFixture(t)
		out, err := RenderEnvoy(f.opts)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range listeners {
			if logs := hcmOf(t, out, l).GetAccessLog(); len(logs) != 0 {
				t.Errorf("%s: access log %v without AccessLog", l, logs)
			}
		}
	})
	t.Run("on every listener", func(t *testing.T) {
		f := newEnvoyFixture(t)
		f.opts.AccessLog = "/var/log/envoy/web-1.access.log"
		out, err := RenderEnvoy(f.opts)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range listeners {
			logs := hcmOf(t, out, l).GetAccessLog()
			if len(logs) != 1 || logs[0].GetName() != fileAccessLogName {
				t.Fatalf("%s: access logs %v, want one %s", l, logs, fileAccessLogName)
			}
			fl := unpack(t, logs[0].GetTypedConfig(), &filelogv3.FileAccessLog{})
			if fl.GetPath() != f.opts.AccessLog {
				t.Errorf("%s: path %q", l, fl.GetPath())
			}
			format := fl.GetLogFormat().GetTextFormatSource().GetInlineString()
			peer := "peer=%UPSTREAM_PEER_URI_SAN%"
			if l == InboundListenerName {
				peer = "peer=%DOWNSTREAM_PEER_URI_SAN%"
			}
			for _, want := range []string{"] " + l + ` "`, "%RESPONSE_CODE%", "flags=%RESPONSE_FLAGS%",
				"details=%RESPONSE_CODE_DETAILS%", peer, "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"} {
				if !strings.Contains(format, want) {
					t.Errorf("%s: format %q lacks %q", l, format, want)
				}
			}
			if !strings.HasSuffix(format, "\n") {
				t.Errorf("%s: format %q does not end in a newline", l, format)
			}
		}
	})
}
