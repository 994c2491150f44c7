// Command demo brings up the emojivoto demo mesh on this machine, as local
// processes on 127.0.0.1: sds-server on its embedded defaults (built-in CA,
// a temporary data dir, a 60 s certificate lifetime so rotations show), and
// four services (web, emoji, voting, vote-bot; examples/emojivoto/app), each
// behind its own real Envoy sidecar joined with a bootstrap token. The ACLs
// in examples/emojivoto/policies allow what the app needs and nothing else.
//
// It prints when every sidecar serves, shows one denial (vote-bot calling
// voting directly is refused with 403), then every few seconds each
// sidecar's identity, certificate serial and time to expiry and the requests
// allowed and denied on each edge, and a line each time a certificate
// rotates. Ctrl-C (or -duration) stops every process it started.
//
//	make demo                      # builds everything, then runs this
//	go run ./examples/emojivoto/demo -duration 2m
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/meshid/sds-server/internal/freeport"
)

// service is one node of the demo mesh.
type service struct {
	name      string
	upstreams []string // services it calls through its sidecar
	appPort   int
	inPort    int            // the sidecar's inbound mTLS listener
	adminPort int            // the sidecar's admin
	outPorts  map[string]int // the sidecar's local outbound listener per upstream
	token     string
	config    string // the Envoy bootstrap
	app       *child
	envoy     *child
	serial    string // last certificate serial seen
}

// The mesh: vote-bot -> web -> {emoji, voting}. vote-bot also gets an
// outbound listener to voting, on purpose: the scripted denial goes through
// it, so it is voting's sidecar and its ACL that refuse it, not a missing
// route.
func newMesh() []*service {
	return []*service{
		{name: "emoji"},
		{name: "voting"},
		{name: "web", upstreams: []string{"emoji", "voting"}},
		{name: "vote-bot", upstreams: []string{"web", "voting"}},
	}
}

// edge is a caller -> callee pair whose counts come from the caller
// sidecar's cluster stats.
type edge struct{ from, to string }

var edges = []edge{{"vote-bot", "web"}, {"web", "emoji"}, {"web", "voting"}, {"vote-bot", "voting"}}

type options struct {
	root, serverBin, envoyBin, appBin, policyDir string
	certTTL, duration, every                     time.Duration
	validate, keep                               bool
}

func main() {
	root := repoRoot()
	o := options{root: root}
	flag.StringVar(&o.serverBin, "server-bin", filepath.Join(root, "bin", "sds-server"), "sds-server binary (make build)")
	flag.StringVar(&o.envoyBin, "envoy-bin", filepath.Join(root, ".tools", "bin", "envoy"), "Envoy binary (make tools)")
	flag.StringVar(&o.appBin, "app-bin", "", "emojivoto app binary (default: bin/emojivoto if present, else built from examples/emojivoto/app)")
	flag.StringVar(&o.policyDir, "policy-dir", filepath.Join(root, "examples", "emojivoto", "policies"), "ACL policy directory")
	flag.DurationVar(&o.certTTL, "cert-ttl", 60*time.Second, "workload certificate lifetime (short, so that rotations show)")
	flag.DurationVar(&o.duration, "duration", 0, "stop after this long (0: run until Ctrl-C)")
	flag.DurationVar(&o.every, "status-every", 3*time.Second, "how often to print the status table")
	flag.BoolVar(&o.validate, "validate", true, "check each generated bootstrap with `envoy --mode validate` first")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary directory (data, bootstraps, logs) on exit")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "demo: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	os.Exit(run(ctx, o))
}

// repoRoot finds the sds-server module root above the working directory,
// so the defaults work from anywhere in the repository.
func repoRoot() string {
	wd, err := os.Getwd()
	if err != nil {
		return "."
	}
	for d := wd; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/meshid/sds-server\n")) {
			return d
		}
		if filepath.Dir(d) == d {
			return wd
		}
	}
}

// demo is one run: its children, its directory, its output.
type demo struct {
	o        options
	ctx      context.Context
	dir      string
	start    time.Time
	out      io.Writer
	mu       sync.Mutex
	children []*child
	server   *child
	sdsAddr  string
	metrics  string
	mesh     []*service
	byName   map[string]*service
}

func (d *demo) say(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fmt.Fprintf(d.out, format+"\n", args...)
}

func (d *demo) since() string { return fmt.Sprintf("+%.1fs", time.Since(d.start).Seconds()) }

func run(ctx context.Context, o options) int {
	d := &demo{o: o, start: time.Now(), out: os.Stdout, mesh: newMesh(), byName: map[string]*service{}}
	for _, s := range d.mesh {
		d.byName[s.name] = s
	}
	dir, err := os.MkdirTemp("", "sds-demo-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		return 1
	}
	d.dir = dir
	code := d.run(ctx)
	d.shutdown()
	if o.keep {
		d.say("kept %s (data, bootstraps, logs)", dir)
	} else if err := os.RemoveAll(dir); err != nil {
		d.say("demo: remove %s: %v", dir, err)
	} else {
		d.say("removed %s", dir)
	}
	return code
}

// fail reports why the demo cannot go on; after Ctrl-C that is not a
// failure.
func (d *demo) fail(format string, args ...any) int {
	if d.ctx.Err() != nil {
		d.say("interrupted while starting: stopping")
		return 0
	}
	d.say("demo: FAILED: "+format, args...)
	return 1
}

func (d *demo) run(ctx context.Context) int {
	d.ctx = ctx
	o := d.o
	for _, p := range []struct{ what, path string }{{"sds-server (make build)", o.serverBin}, {"envoy (make tools)", o.envoyBin}, {"policy dir", o.policyDir}} {
		if _, err := os.Stat(p.path); err != nil {
			return d.fail("%s not found: %v", p.what, err)
		}
	}
	d.say("sds-server demo: an emojivoto-shaped mesh of real Envoy sidecars on 127.0.0.1")
	d.say("data dir: %s (temporary: removed on exit)", d.dir)
	d.say("certificates: lifetime %s (--cert-ttl %s --allow-short-ttl: a demo setting so that rotations show within a minute; the default is 1h)", seconds(o.certTTL), seconds(o.certTTL))
	d.say("policies: %s (vote-bot -> web; web -> emoji list/find; web -> voting vote/results; nothing else)", o.policyDir)
	for _, sub := range []string{"logs", "envoy"} {
		if err := os.MkdirAll(filepath.Join(d.dir, sub), 0o700); err != nil {
			return d.fail("%v", err)
		}
	}
	appBin, err := d.appBinary(ctx)
	if err != nil {
		return d.fail("%v", err)
	}
	if err := d.allocatePorts(); err != nil {
		return d.fail("%v", err)
	}

	// 1. sds-server on its embedded defaults, but in the temp dir, on
	// loopback ports, with a short certificate lifetime.
	if err := d.startServer(ctx); err != nil {
		return d.fail("%v", err)
	}
	// 2. One bootstrap token per service, through the admin socket.
	for _, s := range d.mesh {
		tok, err := d.cli(ctx, "token", "create", "--service", s.name, "--ttl", "10m", "--uses", "1", "--data-dir", filepath.Join(d.dir, "data"))
		if err != nil {
			return d.fail("token create --service %s: %v", s.name, err)
		}
		s.token = strings.TrimSpace(tok)
	}
	d.say("tokens: created one single-use token per service (%d)", len(d.mesh))
	// 3. The apps, on loopback.
	for _, s := range d.mesh {
		if s.app, err = d.spawn(s.name+" app", appBin, d.appArgs(s)...); err != nil {
			return d.fail("%v", err)
		}
	}
	// 4. Bootstraps, checked against the token's root digest by the CLI,
	// and by Envoy itself.
	if err := d.bootstraps(ctx); err != nil {
		return d.fail("%v", err)
	}
	// 5. The sidecars.
	for _, s := range d.mesh {
		if s.envoy, err = d.spawn(s.name+" envoy", o.envoyBin, "-c", s.config, "--use-dynamic-base-id",
			"-l", "warning", "--drain-time-s", "1"); err != nil {
			return d.fail("%v", err)
		}
	}
	d.say("ports: %s", d.portsLine())
	for _, c := range d.children {
		d.say("started: %s pid=%d", c.name, c.cmd.Process.Pid)
	}

	// 6. Every sidecar LIVE, and a first vote-bot -> web request through the
	// mesh answered.
	if code, ok := d.waitServing(ctx); !ok {
		return code
	}
	d.say("all sidecars serving (%s after start)", d.since())

	// 7. The scripted denial.
	d.denial(ctx)

	// 8. Status until Ctrl-C or -duration.
	return d.watch(ctx)
}

// appBinary returns the emojivoto app binary, building it into the temp dir
// when there is none.
func (d *demo) appBinary(ctx context.Context) (string, error) {
	if d.o.appBin != "" {
		if _, err := os.Stat(d.o.appBin); err != nil {
			return "", fmt.Errorf("-app-bin: %w", err)
		}
		return d.o.appBin, nil
	}
	if p := filepath.Join(d.o.root, "bin", "emojivoto"); fileExists(p) {
		return p, nil
	}
	bin := filepath.Join(d.dir, "emojivoto")
	d.say("building the emojivoto app (go build ./examples/emojivoto/app)")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./examples/emojivoto/app")
	cmd.Dir = d.o.root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./examples/emojivoto/app: %v\n%s", err, out)
	}
	return bin, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// allocatePorts picks distinct free loopback ports for every listener,
// holding them all until every one is chosen.
func (d *demo) allocatePorts() error {
	var held []net.Listener
	defer func() {
		for _, l := range held {
			_ = l.Close()
		}
	}()
	// Ports outside the ephemeral range, held until all are chosen: an
	// outgoing connection cannot take one before its process binds it.
	var picker freeport.Picker
	port := func() (int, error) {
		p, err := picker.Pick()
		if err != nil {
			return 0, fmt.Errorf("find a free port: %w", err)
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return 0, fmt.Errorf("find a free port: %w", err)
		}
		held = append(held, l)
		return p, nil
	}
	p, err := port()
	if err != nil {
		return err
	}
	d.metrics = fmt.Sprintf("127.0.0.1:%d", p)
	if p, err = port(); err != nil {
		return err
	}
	d.sdsAddr = fmt.Sprintf("127.0.0.1:%d", p)
	for _, s := range d.mesh {
		s.outPorts = map[string]int{}
		for _, dst := range []*int{&s.appPort, &s.inPort, &s.adminPort} {
			if *dst, err = port(); err != nil {
				return err
			}
		}
		for _, u := range s.upstreams {
			if s.outPorts[u], err = port(); err != nil {
				return err
			}
		}
	}
	return nil
}

// portsLine lists every address the demo's processes listen on, as
// name=host:port fields: the test checks that none answers after exit.
func (d *demo) portsLine() string {
	f := []string{"sds-server=" + d.sdsAddr, "metrics=" + d.metrics}
	for _, s := range d.mesh {
		f = append(f, fmt.Sprintf("%s.app=127.0.0.1:%d", s.name, s.appPort),
			fmt.Sprintf("%s.inbound=127.0.0.1:%d", s.name, s.inPort),
			fmt.Sprintf("%s.admin=127.0.0.1:%d", s.name, s.adminPort))
		for _, u := range s.upstreams {
			f = append(f, fmt.Sprintf("%s.out.%s=127.0.0.1:%d", s.name, u, s.outPorts[u]))
		}
	}
	return strings.Join(f, " ")
}

func (d *demo) appArgs(s *service) []string {
	args := []string{"-mode", s.name, "-listen", fmt.Sprintf("127.0.0.1:%d", s.appPort)}
	for _, u := range s.upstreams {
		args = append(args, "-"+u, fmt.Sprintf("http://127.0.0.1:%d", s.outPorts[u]))
	}
	return args
}

var sdsLineRE = regexp.MustCompile(`(?m)^\s+sds:\s+(\S+)`)

func (d *demo) startServer(ctx context.Context) error {
	var stdout syncBuffer
	c, err := d.spawnTo(&stdout, "sds-server", d.o.serverBin, "serve",
		"--data-dir", filepath.Join(d.dir, "data"),
		"--listen-addr", d.sdsAddr,
		"--metrics-addr", d.metrics,
		"--cert-ttl", seconds(d.o.certTTL), "--allow-short-ttl",
		"--policy-dir", d.o.policyDir, "--default-policy", "deny")
	if err != nil {
		return err
	}
	d.server = c
	err = poll(ctx, 15*time.Second, func() (bool, error) {
		if !c.alive() {
			return false, fmt.Errorf("sds-server exited: %s", c.logTail())
		}
		if m := sdsLineRE.FindStringSubmatch(stdout.String()); m != nil {
			d.sdsAddr = m[1] // the same, as the server reports it
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("sds-server did not start: %w", err)
	}
	d.say("sds-server: SDS on %s, metrics on http://%s/metrics, admin on %s (log: %s)", d.sdsAddr, d.metrics,
		filepath.Join(d.dir, "data", "admin.sock"), c.logPath)
	return nil
}

// bootstraps writes every sidecar's bootstrap with `sds-server bootstrap
// envoy` and, with -validate, checks each with `envoy --mode validate`.
func (d *demo) bootstraps(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, len(d.mesh))
	for i, s := range d.mesh {
		s.config = filepath.Join(d.dir, "envoy", s.name+".yaml")
		// The token goes in SDS_TOKEN, not on the command line (where every
		// local user could read it); the admin is on loopback TCP because
		// the demo reads /ready, /certs and /stats there.
		args := []string{"bootstrap", "envoy", "--server", d.sdsAddr,
			"--service-port", strconv.Itoa(s.appPort), "--listen", fmt.Sprintf("127.0.0.1:%d", s.inPort),
			"--admin", fmt.Sprintf("127.0.0.1:%d", s.adminPort), "--node-id", s.name + "-1", "-o", s.config}
		for _, u := range s.upstreams {
			args = append(args, "--upstream", fmt.Sprintf("%s=%s@127.0.0.1:%d,%d", u, u, d.byName[u].inPort, s.outPorts[u]))
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := d.cliEnv(ctx, []string{"SDS_TOKEN=" + s.token}, args...); err != nil {
				errs[i] = fmt.Errorf("bootstrap envoy for %s: %w", s.name, err)
				return
			}
			if d.o.validate {
				vctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				defer cancel()
				if out, err := exec.CommandContext(vctx, d.o.envoyBin, "--mode", "validate", "-c", s.config).CombinedOutput(); err != nil {
					errs[i] = fmt.Errorf("envoy --mode validate %s: %v\n%s", s.config, err, tail(string(out), 10))
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	what := "written"
	if d.o.validate {
		what = "written and checked with envoy --mode validate"
	}
	d.say("bootstraps: %s (%s)", filepath.Join(d.dir, "envoy", "*.yaml"), what)
	return nil
}

// cli runs an sds-server subcommand and returns its stdout.
func (d *demo) cli(ctx context.Context, args ...string) (string, error) {
	return d.cliEnv(ctx, nil, args...)
}

// cliEnv is cli with extra environment variables (NAME=VALUE).
func (d *demo) cliEnv(ctx context.Context, env []string, args ...string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(cctx, d.o.serverBin, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// waitServing waits, at most 60 s from the start, until every Envoy is LIVE
// and vote-bot has had a first answer from web through the mesh.
func (d *demo) waitServing(ctx context.Context) (int, bool) {
	deadline := d.start.Add(60 * time.Second)
	err := poll(ctx, time.Until(deadline), func() (bool, error) {
		if c := d.deadChild(); c != nil {
			return false, fmt.Errorf("%s exited: %s", c.name, c.logTail())
		}
		for _, s := range d.mesh {
			if body, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/ready", s.adminPort)); err != nil || strings.TrimSpace(body) != "LIVE" {
				return false, nil
			}
		}
		st, err := d.stats(d.byName["vote-bot"])
		return err == nil && st["web"].allowed > 0, nil
	})
	if err != nil {
		return d.fail("the mesh did not come up within 60 s: %v", err), false
	}
	return 0, true
}

// denial has vote-bot call voting directly: its sidecar has a route there,
// voting's ACL lets only web vote, so voting's sidecar answers 403.
func (d *demo) denial(ctx context.Context) {
	bot := d.byName["vote-bot"]
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(rctx, "POST", fmt.Sprintf("http://127.0.0.1:%d/direct-vote?choice=%s", bot.appPort, url.QueryEscape(":doughnut:")), nil)
	resp, err := plainClient.Do(req)
	if err != nil {
		d.say("scripted: vote-bot -> voting POST /vote: no answer: %v", err)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	note := "refused by voting's sidecar: its ACL lets only web vote"
	if resp.StatusCode != http.StatusForbidden {
		note = "UNEXPECTED: the ACL should refuse it"
	}
	d.say("scripted: vote-bot -> voting POST /vote: %d %s (%s)", resp.StatusCode, strings.TrimSpace(string(b)), note)
}

// watch prints a rotation line whenever a sidecar's certificate changes and
// the status table every -status-every, until ctx ends or -duration passes.
func (d *demo) watch(ctx context.Context) int {
	var timeout <-chan time.Time
	if d.o.duration > 0 {
		timeout = time.After(time.Until(d.start.Add(d.o.duration)))
		d.say("running for %s (-duration); Ctrl-C stops earlier", d.o.duration)
	} else {
		d.say("running until Ctrl-C")
	}
	// Certificates are polled every second, for the rotation lines; the
	// table has its own ticker, so it comes every -status-every exactly
	// (comparing the time since the last table at each poll made it late by
	// one poll whenever a poll took less time than the one before).
	poll := time.NewTicker(time.Second)
	defer poll.Stop()
	table := time.NewTicker(d.o.every)
	defer table.Stop()
	d.table(d.poll())
	for {
		select {
		case <-ctx.Done():
			d.say("interrupted: stopping")
			return 0
		case <-timeout:
			d.say("-duration %s reached: stopping", d.o.duration)
			return 0
		case <-poll.C:
			d.poll()
		case <-table.C:
			d.table(d.poll())
		}
		if c := d.deadChild(); c != nil {
			return d.fail("%s exited unexpectedly: %s", c.name, c.logTail())
		}
	}
}

// poll reads every sidecar's certificate, prints a rotation line for each
// one that changed, and returns what it read.
func (d *demo) poll() map[string]certView {
	views := map[string]certView{}
	for _, s := range d.mesh {
		v, err := d.certs(s)
		if err != nil {
			continue
		}
		views[s.name] = v
		if v.serial != "" && v.serial != s.serial {
			if s.serial != "" {
				d.say("rotated: %s %s -> %s (%s; expires in %s)", s.name, s.serial, v.serial, d.since(), until(v.expires))
			}
			s.serial = v.serial
		}
	}
	return views
}

// seconds writes d as the demo's flags do: 60s, not 1m0s.
func seconds(d time.Duration) string { return fmt.Sprintf("%gs", d.Seconds()) }

func until(t time.Time) string {
	if t.IsZero() {
		return "?"
	}
	return time.Until(t).Round(time.Second).String()
}

func (d *demo) table(views map[string]certView) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "---- %s (%s) ----\n", time.Now().Format("15:04:05"), d.since())
	tw := tabwriter.NewWriter(&b, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SIDECAR\tIDENTITY\tSERIAL\tEXPIRES IN")
	for _, s := range d.mesh {
		v, ok := views[s.name]
		if !ok {
			fmt.Fprintf(tw, "%s\t?\t?\t?\n", s.name)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", s.name, v.identity, v.serial, until(v.expires))
	}
	_ = tw.Flush()
	fmt.Fprintf(&b, "%-20s  %7s  %6s   (counted by the caller's sidecar)\n", "EDGE", "ALLOWED", "DENIED")
	stats := map[string]map[string]counts{}
	for _, e := range edges {
		st, ok := stats[e.from]
		if !ok {
			st, _ = d.stats(d.byName[e.from])
			stats[e.from] = st
		}
		c := st[e.to]
		fmt.Fprintf(&b, "%-20s  %7d  %6d\n", e.from+" -> "+e.to, c.allowed, c.denied)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	_, _ = d.out.Write(b.Bytes())
}

// certView is a sidecar's current workload certificate, from Envoy's /certs.
type certView struct {
	identity, serial string
	expires          time.Time
}

// certs reads a sidecar's admin /certs: among the leaf certificates of its
// TLS contexts (inbound and every upstream), the current one is the one that
// expires last.
func (d *demo) certs(s *service) (certView, error) {
	body, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/certs", s.adminPort))
	if err != nil {
		return certView{}, err
	}
	var v struct {
		Certificates []struct {
			CertChain []struct {
				SerialNumber   string    `json:"serial_number"`
				ExpirationTime time.Time `json:"expiration_time"`
				SANs           []struct {
					URI string `json:"uri"`
				} `json:"subject_alt_names"`
			} `json:"cert_chain"`
		} `json:"certificates"`
	}
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		return certView{}, err
	}
	var cur certView
	for _, c := range v.Certificates {
		if len(c.CertChain) == 0 {
			continue
		}
		leaf := c.CertChain[0]
		if leaf.ExpirationTime.After(cur.expires) {
			cur = certView{serial: leaf.SerialNumber, expires: leaf.ExpirationTime}
			for _, san := range leaf.SANs {
				if strings.HasPrefix(san.URI, "spiffe://") {
					cur.identity = san.URI
				}
			}
		}
	}
	return cur, nil
}

type counts struct{ allowed, denied int }

var statLineRE = regexp.MustCompile(`^cluster\.out_(.+)\.upstream_rq_(2xx|403): (\d+)$`)

// stats reads, from a caller's sidecar, the answers per upstream: 2xx
// (allowed) and 403 (denied by the callee's RBAC).
func (d *demo) stats(s *service) (map[string]counts, error) {
	body, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/stats?filter=%s", s.adminPort,
		url.QueryEscape(`^cluster\.out_.*\.upstream_rq_(2xx|403)$`)))
	if err != nil {
		return nil, err
	}
	out := map[string]counts{}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		m := statLineRE.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		n, _ := strconv.Atoi(m[3])
		c := out[m[1]]
		if m[2] == "2xx" {
			c.allowed = n
		} else {
			c.denied = n
		}
		out[m[1]] = c
	}
	return out, nil
}

var plainClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func httpGet(u string) (string, error) {
	resp, err := plainClient.Get(u)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return string(b), err
}

// poll calls cond every 200 ms until it is done, fails, ctx ends or timeout
// passes.
func poll(ctx context.Context, timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s", timeout.Round(time.Second))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// child is a process the demo started, in its own process group, logging to
// a file in the temp dir.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
}

func (d *demo) spawn(name, bin string, args ...string) (*child, error) {
	return d.spawnTo(nil, name, bin, args...)
}

// spawnTo starts bin; its stdout also goes to extra when not nil.
func (d *demo) spawnTo(extra io.Writer, name, bin string, args ...string) (*child, error) {
	logPath := filepath.Join(d.dir, "logs", strings.ReplaceAll(name, " ", "-")+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if extra != nil {
		cmd.Stdout = io.MultiWriter(f, extra)
	}
	// A process group of its own: Ctrl-C reaches the demo only, which then
	// stops every child in order, and a child's own children go with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(c.done)
	}()
	d.mu.Lock()
	d.children = append(d.children, c)
	d.mu.Unlock()
	return c, nil
}

func (c *child) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

func (c *child) logTail() string {
	b, _ := os.ReadFile(c.logPath)
	return fmt.Sprintf("%s (log %s):\n%s", c.cmd.ProcessState, c.logPath, tail(string(b), 15))
}

func (d *demo) deadChild() *child {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.children {
		if !c.alive() {
			return c
		}
	}
	return nil
}

// shutdown stops every child: SIGTERM to each process group, SIGKILL to
// those still there after 5 s, and waits for all of them.
func (d *demo) shutdown() {
	d.mu.Lock()
	children := slices.Clone(d.children)
	d.mu.Unlock()
	if len(children) == 0 {
		return
	}
	for _, c := range children {
		_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGTERM)
	}
	deadline := time.After(5 * time.Second)
	killed := 0
	for _, c := range children {
		select {
		case <-c.done:
		case <-deadline:
			// Past the deadline every receive is ready: kill what is left.
			deadline = closedTimeChan()
			_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
			killed++
			<-c.done
		}
		// The leader is gone; make sure nothing of its group stays.
		_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	}
	msg := fmt.Sprintf("stopped %d processes (%d sds-server, %d apps, %d Envoy sidecars)", len(children),
		len(children)-countSuffix(children, " app")-countSuffix(children, " envoy"), countSuffix(children, " app"), countSuffix(children, " envoy"))
	if killed > 0 {
		msg += fmt.Sprintf("; %d needed SIGKILL", killed)
	}
	d.say("%s; nothing left running", msg)
}

func countSuffix(cs []*child, suffix string) int {
	n := 0
	for _, c := range cs {
		if strings.HasSuffix(c.name, suffix) {
			n++
		}
	}
	return n
}

func closedTimeChan() <-chan time.Time {
	ch := make(chan time.Time)
	close(ch)
	return ch
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// syncBuffer is a goroutine-safe buffer for a child's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
