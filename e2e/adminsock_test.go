package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// TestAdminSocket is issue 11, finding 1 (bootstrap side) with a real
// Envoy: a bootstrap generated with the default admin setting puts Envoy's
// admin interface on a Unix socket with mode 0600 and on no TCP port. The
// owner reaches /config_dump (which shows the token: the reason for the
// mode) through the socket; another user is refused by the socket's mode;
// Envoy's only TCP listeners are the ones the bootstrap configures. It
// also writes the same bootstrap through stdout redirected to a 0644 file,
// which must end up 0600 (finding 10).
func TestAdminSocket(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	srv := startServer(t, bin)
	tok := strings.TrimSpace(srv.cli(t, "token", "create", "--service", "web"))

	// A short directory: the socket path must fit in a sockaddr_un.
	dir, err := os.MkdirTemp("", "sds-adm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	tokFile := filepath.Join(dir, "web.token")
	if err := os.WriteFile(tokFile, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	app := startApp(t, "web")
	in, out := freePort(t), freePort(t)
	cfg := filepath.Join(dir, "web.yaml")
	sock := filepath.Join(dir, "web.admin.sock")
	args := []string{"bootstrap", "envoy", "--server", srv.addr, "--service-port", fmt.Sprint(app.port),
		"--listen", fmt.Sprintf("127.0.0.1:%d", in), "--node-id", "web-1",
		"--upstream", fmt.Sprintf("api=api@127.0.0.1:%d,%d", freePort(t), out)}
	srv.cli(t, append(args, "--token-file", tokFile, "-o", cfg)...)

	// The same command through stdout redirected to a 0644 file, the token
	// in SDS_TOKEN.
	redirected := filepath.Join(dir, "stdout.yaml")
	if err := os.WriteFile(redirected, []byte("old\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(redirected, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(redirected, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "SDS_TOKEN="+tok)
	var stderr syncBuffer
	cmd.Stdout, cmd.Stderr = f, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("bootstrap envoy > %s: %v: %s", redirected, err, stderr.String())
	}
	f.Close()

	for _, p := range []string{cfg, redirected} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %04o, want 0600 (it holds the token)", p, fi.Mode().Perm())
		}
		b, _ := os.ReadFile(p)
		if !strings.Contains(string(b), tok) {
			t.Errorf("%s does not hold the bootstrap", p)
		}
	}
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var boot struct {
		Admin struct {
			Address map[string]any `json:"address"`
		} `json:"admin"`
	}
	if err := yaml.Unmarshal(b, &boot); err != nil {
		t.Fatal(err)
	}
	pipe, _ := boot.Admin.Address["pipe"].(map[string]any)
	if len(boot.Admin.Address) != 1 || pipe["path"] != sock || pipe["mode"] != float64(0o600) {
		t.Fatalf("default admin %v, want only pipe {path: %s, mode: 384}", boot.Admin.Address, sock)
	}
	if o, err := runCmd(envoyBin, "--mode", "validate", "-c", cfg); err != nil {
		t.Fatalf("envoy --mode validate: %v\n%s", err, tail(o, 20))
	}

	envoy := start(t, "envoy web", exec.Command(envoyBin, "-c", cfg, "--use-dynamic-base-id", "-l", "info"))
	admin := unixClient(sock)
	eventually(t, 30*time.Second, "envoy LIVE on its admin socket", func() error {
		if !envoy.alive() {
			t.Fatalf("envoy exited:\n%s", tail(envoy.out.String(), 40))
		}
		body, err := unixGet(admin, "/ready")
		if err != nil {
			return err
		}
		if strings.TrimSpace(body) != "LIVE" {
			return fmt.Errorf("state %q", strings.TrimSpace(body))
		}
		return nil
	})

	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("admin socket %s: mode %v, want a socket with mode 0600", sock, fi.Mode())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		t.Errorf("admin socket owned by uid %d, want %d", st.Uid, os.Geteuid())
	}
	dump, err := unixGet(admin, "/config_dump")
	if err != nil {
		t.Fatalf("config_dump over the admin socket: %v", err)
	}
	if !strings.Contains(dump, tok) {
		t.Errorf("config_dump does not show the token: the socket's mode is what keeps it private; has it changed?")
	}

	t.Run("no TCP admin listener", func(t *testing.T) {
		ports, err := listeningTCPPorts(envoy.pid())
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(ports)
		ports = slices.Compact(ports)
		want := []int{in, out}
		slices.Sort(want)
		if !slices.Equal(ports, want) {
			t.Errorf("envoy listens on TCP ports %v, want exactly its inbound and upstream listeners %v", ports, want)
		}
	})

	t.Run("another user is refused", func(t *testing.T) {
		curl, err := exec.LookPath("curl")
		if err != nil || os.Geteuid() != 0 {
			t.Skip("needs root and curl to connect as another user")
		}
		// Let others reach the socket's path, so that only its own mode
		// stands between them and the admin interface.
		if err := os.Chmod(dir, 0o711); err != nil {
			t.Fatal(err)
		}
		// curl -v says why a connect failed (stderr); the body is stdout.
		asNobody := func() (stdout, stderr string, err error) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c := exec.CommandContext(ctx, curl, "-v", "-sS", "--max-time", "5", "--unix-socket", sock, "http://envoy/ready")
			c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			var o, e syncBuffer
			c.Stdout, c.Stderr = &o, &e
			err = c.Run()
			return o.String(), e.String(), err
		}
		o, e, err := asNobody()
		if err == nil || !strings.Contains(e, "Permission denied") || o != "" {
			t.Errorf("uid 65534 through the 0600 admin socket: %v, stdout %q, stderr %q; want permission denied", err, o, e)
		}
		// The control: with the socket opened up, the same request works.
		if err := os.Chmod(sock, 0o666); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(sock, 0o600)
		if o, e, err := asNobody(); err != nil || strings.TrimSpace(o) != "LIVE" {
			t.Errorf("control: uid 65534 through a 0666 socket: %v, stdout %q, stderr %q; want LIVE", err, o, e)
		}
	})
}

// unixClient is an HTTP client of the admin interface on a Unix socket.
func unixClient(sock string) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

func unixGet(c *http.Client, path string) (string, error) {
	resp, err := c.Get("http://envoy" + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return string(b), err
}

// listeningTCPPorts returns the TCP ports process pid listens on (IPv4
// and IPv6), from its socket descriptors and /proc/net/tcp{,6}.
func listeningTCPPorts(pid int) ([]int, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	var ports []int
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// sl local_address rem_address st ... uid timeout inode
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" || !inodes[fields[9]] { // 0A: LISTEN
				continue
			}
			_, hexPort, _ := strings.Cut(fields[1], ":")
			p, err := strconv.ParseInt(hexPort, 16, 32)
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("%s: bad local address %q", table, fields[1])
			}
			ports = append(ports, int(p))
		}
		err = sc.Err()
		f.Close()
		if err != nil {
			return nil, err
		}
	}
	return ports, nil
}
