package systemd

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// unit is a parsed systemd unit file: section -> key -> values, in order
// (a key may be given several times).
type unit map[string]map[string][]string

// get returns the last value of key in section (systemd's rule for
// single-valued settings) and whether it is set.
func (u unit) get(section, key string) (string, bool) {
	v := u[section][key]
	if len(v) == 0 {
		return "", false
	}
	return v[len(v)-1], true
}

// parseUnit reads the subset of systemd's unit syntax the shipped units use:
// [Section] headers, Key=Value lines, # and ; comments, blank lines. Line
// continuations and anything else are errors, so a typo cannot hide.
func parseUnit(path string) (unit, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
			continue
		case strings.HasSuffix(line, "\\"):
			return nil, fmt.Errorf("%s:%d: line continuation not supported here", path, n)
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if _, dup := u[section]; dup {
				return nil, fmt.Errorf("%s:%d: section [%s] given twice", path, n, section)
			}
			u[section] = map[string][]string{}
			continue
		}
		if section == "" {
			return nil, fmt.Errorf("%s:%d: %q before any [Section]", path, n, line)
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.TrimSpace(k) == "" {
			return nil, fmt.Errorf("%s:%d: %q is not Key=Value", path, n, line)
		}
		k = strings.TrimSpace(k)
		u[section][k] = append(u[section][k], strings.TrimSpace(v))
	}
	return u, sc.Err()
}

// repeatable are the settings systemd accumulates; any other key given
// twice is a mistake (the first value would be silently overridden).
var repeatable = map[string]bool{"SystemCallFilter": true, "ReadWritePaths": true, "Environment": true, "EnvironmentFile": true, "Wants": true, "After": true}

func TestServerUnit(t *testing.T) {
	u, err := parseUnit("sds-server.service")
	if err != nil {
		t.Fatal(err)
	}
	for section, keys := range u {
		for k, vs := range keys {
			if len(vs) > 1 && !repeatable[k] {
				t.Errorf("[%s] %s is set %d times: %q", section, k, len(vs), vs)
			}
		}
	}
	want := []struct{ section, key, value string }{
		{"Unit", "Wants", "network-online.target"},
		{"Unit", "After", "network-online.target"},
		{"Service", "Type", "exec"},
		{"Service", "User", "sds-server"},
		{"Service", "Group", "sds-server"},
		{"Service", "ExecStart", "/usr/local/bin/sds-server serve --config /etc/sds-server/config.yaml"},
		{"Service", "EnvironmentFile", "-/etc/sds-server/sds-server.env"},
		{"Service", "Restart", "on-failure"},
		// The data dir: serve insists on 0700.
		{"Service", "StateDirectory", "sds-server"},
		{"Service", "StateDirectoryMode", "0700"},
		{"Service", "ReadWritePaths", "/var/lib/sds-server"},
		{"Service", "UMask", "0077"},
		// Hardening.
		{"Service", "NoNewPrivileges", "yes"},
		{"Service", "CapabilityBoundingSet", ""},
		{"Service", "AmbientCapabilities", ""},
		{"Service", "ProtectSystem", "strict"},
		{"Service", "ProtectHome", "yes"},
		{"Service", "PrivateTmp", "yes"},
		{"Service", "PrivateDevices", "yes"},
		{"Service", "RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"},
		{"Service", "RestrictNamespaces", "yes"},
		{"Service", "RestrictSUIDSGID", "yes"},
		{"Service", "MemoryDenyWriteExecute", "yes"},
		{"Service", "LockPersonality", "yes"},
		{"Service", "SystemCallArchitectures", "native"},
		{"Service", "SystemCallErrorNumber", "EPERM"},
		{"Install", "WantedBy", "multi-user.target"},
	}
	for _, w := range want {
		if !slices.Contains(u[w.section][w.key], w.value) {
			t.Errorf("[%s] %s=%q missing (have %q)", w.section, w.key, w.value, u[w.section][w.key])
		}
	}
	if got := u["Service"]["SystemCallFilter"]; !slices.Equal(got, []string{"@system-service", "~@privileged"}) {
		t.Errorf("SystemCallFilter %q, want @system-service then ~@privileged", got)
	}
	// serve lowers limits.max_connections (default 10000) to the open-file
	// limit minus 64.
	nofile, _ := u.get("Service", "LimitNOFILE")
	if n, err := strconv.Atoi(nofile); err != nil || n < 10000+64 {
		t.Errorf("LimitNOFILE %q: want at least 10064, or serve lowers the default connection limit", nofile)
	}
	// No unit-level Environment= may carry a secret; the env file is
	// optional and root's.
	if env := u["Service"]["Environment"]; len(env) != 0 {
		t.Errorf("Environment=%q in the unit; put SDS_* in the EnvironmentFile", env)
	}
}

// TestServerUnitMatchesConfig checks that config.yaml and the unit agree:
// the data dir is the StateDirectory, the policies are under the read-only
// /etc/sds-server, the ports need no capability, and the sysusers entry
// creates the unit's user.
func TestServerUnitMatchesConfig(t *testing.T) {
	u, err := parseUnit("sds-server.service")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		t.Fatalf("config.yaml: %v", err)
	}
	state, _ := u.get("Service", "StateDirectory")
	if cfg["data_dir"] != "/var/lib/"+state {
		t.Errorf("config.yaml data_dir %v, want /var/lib/%s (the unit's StateDirectory)", cfg["data_dir"], state)
	}
	if wd, _ := u.get("Service", "WorkingDirectory"); wd != "/var/lib/"+state {
		t.Errorf("WorkingDirectory %q, want the state directory", wd)
	}
	if pd, _ := cfg["policy_dir"].(string); !strings.HasPrefix(pd, "/etc/sds-server/") {
		t.Errorf("config.yaml policy_dir %q, want under /etc/sds-server (installed by root, read by the server)", pd)
	}
	for _, key := range []string{"listen_addr", "metrics_addr"} {
		s, _ := cfg[key].(string)
		_, port, err := net.SplitHostPort(s)
		if err != nil {
			t.Errorf("config.yaml %s %q: %v", key, s, err)
			continue
		}
		if n, _ := strconv.Atoi(port); n < 1024 {
			t.Errorf("config.yaml %s port %d needs CAP_NET_BIND_SERVICE, which the unit does not grant", key, n)
		}
	}
	sysusers, err := os.ReadFile("sds-server.sysusers")
	if err != nil {
		t.Fatal(err)
	}
	user, _ := u.get("Service", "User")
	if !regexp.MustCompile(`(?m)^u ` + regexp.QuoteMeta(user) + ` - `).Match(sysusers) {
		t.Errorf("sds-server.sysusers does not create user %q:\n%s", user, sysusers)
	}
	env, err := os.ReadFile("sds-server.env")
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range strings.Split(string(env), "\n") {
		l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "#"))
		if l != "" && strings.Contains(l, "=") && !regexp.MustCompile(`^SDS_[A-Z_]+=`).MatchString(l) {
			t.Errorf("sds-server.env:%d: %q is not an SDS_* setting", i+1, l)
		}
	}
}

// TestSystemdAnalyzeVerify runs `systemd-analyze verify` on each unit, with
// ExecStart pointed at an existing executable (verify refuses a missing
// binary), where the tool exists. Any output fails: verify reports unknown
// keys on stderr with exit status 0.
func TestSystemdAnalyzeVerify(t *testing.T) {
	tool, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	units, err := filepath.Glob("*.service")
	if err != nil || len(units) == 0 {
		t.Fatalf("no units: %v", err)
	}
	for _, name := range units {
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			text := strings.ReplaceAll(string(b), "/usr/local/bin/sds-server", self)
			path := filepath.Join(t.TempDir(), name)
			if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(tool, "verify", path).CombinedOutput()
			if err != nil || len(strings.TrimSpace(string(out))) != 0 {
				t.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
			}
		})
	}
}
