package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshid/sds-server/bootstrap"
)

func TestBootstrapEnvoyErrors(t *testing.T) {
	// A well-formed token (nothing listens for it): digest and secret in
	// range, lower-case base36.
	digest := strings.Repeat("1", bootstrap.DigestLen)
	secret := "s3cr3t" + strings.Repeat("7", bootstrap.SecretLen-6)
	good := bootstrap.TokenPrefix + "-" + bootstrap.TokenVersion + "-" + digest + "-" + secret
	if _, err := bootstrap.Parse(good); err != nil {
		t.Fatalf("test token does not parse: %v", err)
	}

	// A loopback port with nothing listening.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()

	base := func(over map[string]string, drop ...string) []string {
		flags := map[string]string{"--server": closed, "--token": good, "--service-port": "8080", "--listen": "15001", "--timeout": "3s"}
		for _, d := range drop {
			delete(flags, d)
		}
		for k, v := range over {
			flags[k] = v
		}
		args := []string{"bootstrap", "envoy"}
		for k, v := range flags {
			args = append(args, k, v)
		}
		return args
	}
	output := filepath.Join(t.TempDir(), "envoy.yaml")

	tests := []struct {
		name   string
		args   []string
		code   int
		want   []string // in the first stderr line
		secret string   // must not appear anywhere in the output
	}{
		{name: "missing --server", args: base(nil, "--server"), code: 2, want: []string{"--server"}},
		{name: "missing --token", args: base(nil, "--token"), code: 2, want: []string{"--token"}},
		{name: "missing --service-port", args: base(nil, "--service-port"), code: 2, want: []string{"--service-port"}},
		{name: "missing --listen", args: base(nil, "--listen"), code: 2, want: []string{"--listen"}},
		{name: "non-numeric --service-port", args: base(map[string]string{"--service-port": "http"}), code: 2, want: []string{"--service-port"}},
		{name: "extra argument", args: append(base(nil), "extra"), code: 2, want: []string{`"extra"`}},

		{
			name: "token with a short secret", code: 1, want: []string{"--token", "secret"}, secret: "s3cr3t77",
			args: base(map[string]string{"--token": bootstrap.TokenPrefix + "-1-" + digest + "-s3cr3t77"}),
		},
		{
			name: "token secret with upper case", code: 1, want: []string{"--token"}, secret: strings.ToUpper(secret),
			args: base(map[string]string{"--token": bootstrap.TokenPrefix + "-1-" + digest + "-" + strings.ToUpper(secret)}),
		},
		{
			name: "token with an extra part", code: 1, want: []string{"--token"}, secret: secret,
			args: base(map[string]string{"--token": good + "-" + secret}),
		},
		{
			name: "token with a multi-line secret", code: 1, want: []string{"--token"}, secret: "hunter2",
			args: base(map[string]string{"--token": bootstrap.TokenPrefix + "-1-" + digest + "-hunter2\nhunter2"}),
		},
		{
			name: "not a token at all", code: 1, want: []string{"--token"}, secret: "correct-horse-battery-staple",
			args: base(map[string]string{"--token": "correct-horse-battery-staple"}),
		},
		{
			name: "upstream without a local port", code: 1, want: []string{"--upstream", "LOCAL_PORT"}, secret: secret,
			args: append(base(nil), "--upstream", "api=api@10.0.0.1:8443"),
		},
		{
			name: "upstream with a bad name", code: 1, want: []string{"--upstream"}, secret: secret,
			args: append(base(nil), "--upstream", "API!=api@10.0.0.1:8443,9001"),
		},
		{
			name: "upstream with a bad port", code: 1, want: []string{"--upstream", "port"}, secret: secret,
			args: append(base(nil), "--upstream", "api=api@10.0.0.1:99999,9001"),
		},
		{
			name: "no server listening", code: 1, want: []string{closed}, secret: secret,
			args: base(map[string]string{"--output": output}),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearSDSEnv(t)
			r := runCLI(t, tt.args...)
			if tt.code == 1 {
				checkOneLineError(t, r)
			} else {
				checkUsageError(t, r)
			}
			first := strings.SplitN(r.stderr, "\n", 2)[0]
			for _, w := range tt.want {
				if !strings.Contains(first, w) {
					t.Errorf("stderr %q does not mention %q", first, w)
				}
			}
			if tt.secret != "" && (strings.Contains(r.stderr, tt.secret) || strings.Contains(r.stdout, tt.secret)) {
				t.Errorf("output repeats the token secret %q: stderr %q", tt.secret, r.stderr)
			}
			if _, err := os.Stat(output); !os.IsNotExist(err) {
				t.Errorf("a failed bootstrap wrote %s (stat: %v)", output, err)
			}
		})
	}
}

func TestBootstrapEnvoyTokenFromEnv(t *testing.T) {
	clearSDSEnv(t)
	t.Setenv("SDS_TOKEN", "SDSTKN-1-not-valid")
	// With the token from SDS_TOKEN, --token is not missing (no usage
	// error): the token itself is checked.
	r := runCLI(t, "bootstrap", "envoy", "--server", "127.0.0.1:1", "--service-port", "8080", "--listen", "15001")
	checkOneLineError(t, r)
	if !strings.Contains(r.stderr, "--token") || strings.Contains(r.stderr, "not-valid") {
		t.Errorf("stderr %q: want a --token error that does not echo the token", r.stderr)
	}
}
