package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

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
	dir := t.TempDir()
	output := filepath.Join(dir, "envoy.yaml")
	tokFile := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	goodFile := tokFile("good.token", good+"\n")
	emptyFile := tokFile("empty.token", " \n")
	bigFile := tokFile("big.token", good+strings.Repeat(" ", 5000))
	badFile := tokFile("bad.token", bootstrap.TokenPrefix+"-1-"+digest+"-hunter2\n")
	fifo := filepath.Join(dir, "token.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	longOutput := filepath.Join(dir, strings.Repeat("d", 100)+".yaml")

	tests := []struct {
		name    string
		args    []string
		env     string // SDS_TOKEN
		code    int
		want    []string // in the first stderr line
		secret  string   // must not appear anywhere in the output
		outFile string   // must not be written, besides output
	}{
		{name: "missing --server", args: base(nil, "--server"), code: 2, want: []string{"--server"}},
		{name: "no token at all", args: base(nil, "--token"), code: 2, want: []string{"no bootstrap token", "--token-file", "SDS_TOKEN"}},
		{name: "empty --token", args: base(map[string]string{"--token": ""}), code: 2, want: []string{"--token is empty"}},
		{name: "empty --token-file", args: base(map[string]string{"--token-file": ""}, "--token"), code: 2, want: []string{"--token-file is empty"}},
		{
			name: "--token and --token-file", code: 2, want: []string{"2 times", "--token, --token-file"}, secret: secret,
			args: base(map[string]string{"--token-file": goodFile}),
		},
		{name: "--token and SDS_TOKEN", code: 2, env: good, want: []string{"2 times", "--token, SDS_TOKEN"}, secret: secret, args: base(nil)},
		{
			name: "all three sources", code: 2, env: good, want: []string{"3 times"}, secret: secret,
			args: base(map[string]string{"--token-file": goodFile}),
		},
		{name: "empty SDS_TOKEN is no token", code: 2, env: "", want: []string{"no bootstrap token"}, args: base(nil, "--token")},
		{
			name: "missing token file", code: 1, want: []string{"--token-file " + filepath.Join(dir, "nope")},
			args: base(map[string]string{"--token-file": filepath.Join(dir, "nope")}, "--token"),
		},
		{name: "token file is a directory", code: 1, want: []string{"a directory"}, args: base(map[string]string{"--token-file": dir}, "--token")},
		{name: "token file is a device", code: 1, want: []string{"/dev/zero", "a device"}, args: base(map[string]string{"--token-file": "/dev/zero"}, "--token")},
		{name: "empty token file", code: 1, want: []string{emptyFile, "holds no token"}, args: base(map[string]string{"--token-file": emptyFile}, "--token")},
		{name: "FIFO without a writer", code: 1, want: []string{fifo, "holds no token"}, args: base(map[string]string{"--token-file": fifo}, "--token")},
		{name: "token file too large", code: 1, want: []string{bigFile, "too large"}, secret: secret, args: base(map[string]string{"--token-file": bigFile}, "--token")},
		{
			name: "bad token in the file", code: 1, want: []string{"--token-file " + badFile, "secret"}, secret: "hunter2",
			args: base(map[string]string{"--token-file": badFile}, "--token"),
		},
		{name: "bad token in SDS_TOKEN", code: 1, env: "SDSTKN-1-not-valid", want: []string{"SDS_TOKEN"}, secret: "not-valid", args: base(nil, "--token")},

		{
			name: "admin on all addresses", code: 1, want: []string{"--admin", "0.0.0.0:15000", "not a loopback address", "/config_dump", "--admin-insecure"}, secret: secret,
			args: base(map[string]string{"--admin": "0.0.0.0:15000", "--output": output}),
		},
		{
			name: "admin on a LAN address", code: 1, want: []string{"10.1.2.3:15000", "not a loopback address"}, secret: secret,
			args: base(map[string]string{"--admin": "10.1.2.3:15000", "--output": output}),
		},
		{
			name: "admin on all IPv6 addresses", code: 1, want: []string{"not a loopback address"}, secret: secret,
			args: base(map[string]string{"--admin": "[::]:15000", "--output": output}),
		},
		{
			// Past the admin check, the command fails only at the server.
			name: "admin on all addresses, insecure allowed", code: 1, want: []string{closed}, secret: secret,
			args: append(base(map[string]string{"--admin": "0.0.0.0:15000", "--output": output}), "--admin-insecure"),
		},
		{
			name: "admin socket relative", code: 1, want: []string{"--admin", "not absolute"}, secret: secret,
			args: base(map[string]string{"--admin": "unix:admin.sock", "--output": output}),
		},
		{
			name: "admin garbage", code: 1, want: []string{"--admin", "want unix:/ABS/PATH, IP:PORT or none"}, secret: secret,
			args: base(map[string]string{"--admin": "everywhere", "--output": output}),
		},
		{
			name: "default admin socket too long", code: 1, want: []string{"default admin socket", "longer than the 104", "--admin unix:PATH"}, secret: secret,
			args: base(map[string]string{"--output": longOutput}), outFile: longOutput,
		},
		{name: "missing --service-port", args: base(nil, "--service-port"), code: 2, want: []string{"--service-port"}},
		{name: "missing --listen", args: base(nil, "--listen"), code: 2, want: []string{"--listen"}},
		{name: "non-numeric --service-port", args: base(map[string]string{"--service-port": "http"}), code: 2, want: []string{"--service-port"}},
		{name: "extra argument", args: append(base(nil), "extra"), code: 2, want: []string{`"extra"`}},
		{
			name: "zero connection limit", code: 2, want: []string{"--max-downstream-connections 0", "at least 1"},
			args: base(map[string]string{"--max-downstream-connections": "0", "--output": output}),
		},
		{
			name: "non-numeric connection limit", code: 2, want: []string{"--max-downstream-connections"},
			args: base(map[string]string{"--max-downstream-connections": "lots", "--output": output}),
		},
		{
			// A relative --access-log is made absolute; past it the command
			// fails only at the server.
			name: "relative access log accepted", code: 1, want: []string{closed}, secret: secret,
			args: base(map[string]string{"--access-log": "access.log", "--output": output}),
		},

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
			t.Setenv("SDS_TOKEN", tt.env)
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
			for _, o := range []string{output, tt.outFile} {
				if _, err := os.Stat(o); o != "" && !os.IsNotExist(err) {
					t.Errorf("a failed bootstrap wrote %s (stat: %v)", o, err)
				}
			}
		})
	}
}

// adminOf returns the admin address of a rendered bootstrap, as YAML maps.
func adminOf(t *testing.T, out []byte) map[string]any {
	t.Helper()
	var b struct {
		Admin struct {
			Address map[string]any `json:"address"`
		} `json:"admin"`
	}
	if err := yaml.Unmarshal(out, &b); err != nil {
		t.Fatalf("bootstrap is not YAML: %v\n%s", err, out)
	}
	return b.Admin.Address
}

// checkAdminSocket checks that a bootstrap puts Envoy's admin on the Unix
// socket path with mode 0600, and nowhere else.
func checkAdminSocket(t *testing.T, out []byte, path string) {
	t.Helper()
	addr := adminOf(t, out)
	pipe, _ := addr["pipe"].(map[string]any)
	if pipe == nil || pipe["path"] != path || pipe["mode"] != float64(0o600) || len(addr) != 1 {
		t.Errorf("admin address %v, want only pipe {path: %s, mode: 384 (0600)}", addr, path)
	}
}

func checkMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != want {
		t.Errorf("%s has mode %04o, want %04o", path, fi.Mode().Perm(), want)
	}
}

// TestBootstrapEnvoyOutputIsPrivate runs bootstrap envoy against a live
// server with the token from a file and from SDS_TOKEN, and checks that
// every file the bootstrap lands in ends up 0600, whether written with -o
// over an existing 0644 file or through stdout redirected to one, and that
// Envoy's admin is on a 0600 Unix socket beside the output by default.
func TestBootstrapEnvoyOutputIsPrivate(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	s := startServe(t, dataDir)
	m := sdsAddrRE.FindStringSubmatch(s.stdout.String())
	if m == nil {
		t.Fatalf("no sds address in %q", s.stdout)
	}
	addr := m[1]
	cr := runCLI(t, "token", "create", "--service", "web", "--uses", "0", "--data-dir", dataDir)
	if cr.code != 0 {
		t.Fatalf("token create: exit %d: %s", cr.code, cr.stderr)
	}
	tok := strings.TrimSpace(cr.stdout)
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "web.token")
	if err := os.WriteFile(tokFile, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cwd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	args := func(extra ...string) []string {
		return append([]string{"bootstrap", "envoy", "--server", addr, "--service-port", "8080", "--listen", "15001", "--timeout", "5s"}, extra...)
	}
	// stdout redirected to a file the shell created 0644 (`> FILE`).
	redirected := func(t *testing.T, name string, mode os.FileMode, flag int) (*os.File, string) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("old content\n"), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		f, err := os.OpenFile(p, os.O_WRONLY|flag, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f, p
	}
	runTo := func(t *testing.T, stdout *os.File, a ...string) result {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		var errb syncBuffer
		code := run(ctx, a, stdout, &errb)
		return result{code: code, stderr: errb.String()}
	}

	t.Run("stdout redirected to a 0644 file, token file", func(t *testing.T) {
		f, p := redirected(t, "out.yaml", 0o644, os.O_TRUNC)
		if r := runTo(t, f, args("--token-file", tokFile)...); r.code != 0 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		checkMode(t, p, 0o600)
		out, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out), tok) {
			t.Fatalf("the redirected file does not hold the bootstrap:\n%s", out)
		}
		checkAdminSocket(t, out, filepath.Join(cwd, "envoy.admin.sock"))
	})
	t.Run("stdout appended to a 0640 file, SDS_TOKEN", func(t *testing.T) {
		t.Setenv("SDS_TOKEN", tok)
		f, p := redirected(t, "append.yaml", 0o640, os.O_APPEND)
		if r := runTo(t, f, args("--admin", "127.0.0.1:15000")...); r.code != 0 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		checkMode(t, p, 0o600)
		out, _ := os.ReadFile(p)
		if a := adminOf(t, out[len("old content\n"):]); a["socket_address"] == nil {
			t.Errorf("admin %v, want the loopback TCP address given", a)
		}
	})
	t.Run("-o over a 0644 file", func(t *testing.T) {
		p := filepath.Join(dir, "web.yaml")
		if err := os.WriteFile(p, []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
		if r := runCLI(t, args("--token-file", tokFile, "-o", p)...); r.code != 0 || r.stdout != "" {
			t.Fatalf("exit %d, stdout %q: %s", r.code, r.stdout, r.stderr)
		}
		checkMode(t, p, 0o600)
		out, _ := os.ReadFile(p)
		checkAdminSocket(t, out, filepath.Join(dir, "web.admin.sock"))
	})
	t.Run("access log made absolute, connection limit", func(t *testing.T) {
		r := runCLI(t, args("--token-file", tokFile, "--admin", "none", "--access-log", "logs/web.log", "--max-downstream-connections", "77")...)
		if r.code != 0 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		for _, want := range []string{"path: " + filepath.Join(cwd, "logs", "web.log") + "\n", `max_active_downstream_connections: "77"`} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("bootstrap lacks %q", want)
			}
		}
	})
	t.Run("stdout not a file, admin none", func(t *testing.T) {
		r := runCLI(t, args("--token-file", tokFile, "--admin", "none")...)
		if r.code != 0 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		if a := adminOf(t, []byte(r.stdout)); a != nil {
			t.Errorf("--admin none: admin address %v", a)
		}
	})
}

// TestBootstrapEnvoyRefusesStdoutItCannotMakePrivate redirects stdout to a
// regular file whose mode cannot be changed (a procfs file: chmod fails
// even for root) and checks the command refuses and writes nothing.
func TestBootstrapEnvoyRefusesStdoutItCannotMakePrivate(t *testing.T) {
	clearSDSEnv(t)
	const procFile = "/proc/self/comm"
	before, err := os.ReadFile(procFile)
	if err != nil {
		t.Skipf("no %s: %v", procFile, err)
	}
	f, err := os.OpenFile(procFile, os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("open %s: %v", procFile, err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o044 == 0 {
		t.Skipf("%s is not a regular file readable by others: %v, %v", procFile, fi.Mode(), err)
	}
	if err := f.Chmod(0o600); err == nil {
		t.Skipf("chmod %s works here", procFile)
	}
	digest := strings.Repeat("1", bootstrap.DigestLen)
	good := bootstrap.TokenPrefix + "-" + bootstrap.TokenVersion + "-" + digest + "-" + strings.Repeat("7", bootstrap.SecretLen)
	t.Setenv("SDS_TOKEN", good)
	var errb syncBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	code := run(ctx, []string{"bootstrap", "envoy", "--server", "127.0.0.1:1", "--service-port", "8080", "--listen", "15001"}, f, &errb)
	checkOneLineError(t, result{code: code, stderr: errb.String()})
	for _, w := range []string{"/proc/", "mode 0644", "cannot be made private", "nothing was written", "-o FILE"} {
		if !strings.Contains(errb.String(), w) {
			t.Errorf("stderr %q does not say %q", errb.String(), w)
		}
	}
	if after, _ := os.ReadFile(procFile); string(after) != string(before) {
		t.Errorf("%s changed from %q to %q: something was written", procFile, before, after)
	}
}
