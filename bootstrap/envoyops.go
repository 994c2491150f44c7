package bootstrap

import (
	"fmt"
	"path/filepath"
	"strings"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	overloadv3 "github.com/envoyproxy/go-control-plane/envoy/config/overload/v3"
	filelogv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	downstreamconnsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
)

// Operability parts of the generated bootstrap: the overload manager's
// connection limit and the optional file access log.

const (
	// DefaultMaxDownstreamConnections is the sidecar's default limit on
	// active downstream connections (inbound from peers plus outbound from
	// the local app). Without a limit Envoy warns at every start, and a
	// connection flood could exhaust the sidecar's file descriptors.
	DefaultMaxDownstreamConnections = 10000

	// DownstreamConnectionsMonitor is the resource monitor Envoy asks for
	// when no connection limit is configured.
	DownstreamConnectionsMonitor = "envoy.resource_monitors.global_downstream_max_connections"

	fileAccessLogName = "envoy.access_loggers.file"
)

// accessLogFormat is one line per request. peer is the verified URI SAN of
// the other side: the caller on the inbound listener, the callee on an
// outbound one. details is %RESPONSE_CODE_DETAILS%, which names the RBAC
// decision of a 403 (rbac_access_denied_matched_policy[...]). The listener
// name is filled in per listener.
const accessLogFormat = `[%START_TIME%] {listener} "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" ` +
	`%RESPONSE_CODE% flags=%RESPONSE_FLAGS% details=%RESPONSE_CODE_DETAILS% peer={peer} ` +
	`upstream=%UPSTREAM_HOST% duration_ms=%DURATION% request_id=%REQ(X-REQUEST-ID)%` + "\n"

// checkAccessLogPath accepts an absolute file path (Envoy resolves a
// relative one against its working directory, which is rarely what the
// person who wrote the bootstrap meant).
func checkAccessLogPath(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("access log path %q is not absolute", path)
	}
	if strings.ContainsAny(path, "\x00\n") {
		return fmt.Errorf("access log path %q contains a NUL or newline", path)
	}
	return nil
}

// accessLogs returns the access log of listener, whose peer identity is the
// downstream's (inbound) or the upstream's (outbound) certificate; nil when
// no access log is configured.
func (p *envoyPlan) accessLogs(listener string, inbound bool) ([]*accesslogv3.AccessLog, error) {
	if p.AccessLog == "" {
		return nil, nil
	}
	peer := "%UPSTREAM_PEER_URI_SAN%"
	if inbound {
		peer = "%DOWNSTREAM_PEER_URI_SAN%"
	}
	format := strings.NewReplacer("{listener}", listener, "{peer}", peer).Replace(accessLogFormat)
	a, err := pack(&filelogv3.FileAccessLog{
		Path: p.AccessLog,
		AccessLogFormat: &filelogv3.FileAccessLog_LogFormat{LogFormat: &corev3.SubstitutionFormatString{
			Format: &corev3.SubstitutionFormatString_TextFormatSource{TextFormatSource: &corev3.DataSource{
				Specifier: &corev3.DataSource_InlineString{InlineString: format},
			}},
		}},
	})
	if err != nil {
		return nil, err
	}
	return []*accesslogv3.AccessLog{{Name: fileAccessLogName, ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: a}}}, nil
}

// overloadManager limits the sidecar's active downstream connections;
// beyond the limit Envoy refuses new connections.
func (p *envoyPlan) overloadManager() (*overloadv3.OverloadManager, error) {
	a, err := pack(&downstreamconnsv3.DownstreamConnectionsConfig{MaxActiveDownstreamConnections: p.MaxDownstreamConnections})
	if err != nil {
		return nil, err
	}
	return &overloadv3.OverloadManager{ResourceMonitors: []*overloadv3.ResourceMonitor{{
		Name:       DownstreamConnectionsMonitor,
		ConfigType: &overloadv3.ResourceMonitor_TypedConfig{TypedConfig: a},
	}}}, nil
}
