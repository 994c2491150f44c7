package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// runConfig is the `sds-load run` flags.
type runConfig struct {
	addr, caFile, serverName, tokenFile string
	n, concurrency, conns               int
	sds, delta, ecds                    bool
	nodePrefix, cluster                 string
	timeout, deadline                   time.Duration
	serverPID                           int
	push                                bool
	pushCmd                             string
	pushTimeout                         time.Duration
	label, jsonOut, servedOut           string
	// pushFn, if set, replaces -push-cmd (tests).
	pushFn func() error
}

const runUsage = `Usage: sds-load run [flags]

Opens -n sidecar streams against an SDS server as Envoy does (distinct node
ids, one bearer token, ACKs), at most -concurrency opening at once, and
reports time to first secret (p50/p90/p99/max), time until all are served,
errors by gRPC code and, with -server-pid, the server's CPU and RSS per
sidecar. With -push it then waits for a trust-bundle (ROOTCA) change, runs
-push-cmd to cause it, and reports the fan-out latency to every sidecar.
The token should admit -n nodes: create it with
  sds-server token create --service load --uses 0 > token
Every wait is bounded (-timeout per sidecar, -deadline overall,
-push-timeout).

Flags:
`

func parseRun(args []string, stderr io.Writer) (*runConfig, error) {
	c := &runConfig{}
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, runUsage); fs.PrintDefaults() }
	fs.StringVar(&c.addr, "addr", "127.0.0.1:8443", "server address (host:port)")
	fs.StringVar(&c.caFile, "ca-file", "", "PEM root(s) the server's TLS certificate chains to (sds-server: <data-dir>/ca/root.crt) (required)")
	fs.StringVar(&c.serverName, "server-name", "localhost", "TLS server name to verify")
	fs.StringVar(&c.tokenFile, "token-file", "", "file holding the bootstrap token, sent as `authorization: Bearer` (required)")
	fs.IntVar(&c.n, "n", 1000, "number of sidecars")
	fs.IntVar(&c.concurrency, "concurrency", 100, "sidecars opening at once (a slot is held until the sidecar is served or fails)")
	fs.IntVar(&c.conns, "conns", 0, "share this many TLS connections among the sidecars (0: each sidecar its own connection, as Envoys do)")
	fs.BoolVar(&c.sds, "sds", false, "use SDS streams (one per secret, one for ECDS) instead of one ADS stream")
	fs.BoolVar(&c.delta, "delta", false, "use the incremental (Delta) protocol instead of state of the world")
	fs.BoolVar(&c.ecds, "ecds", false, "also subscribe to the ECDS filters (revoked, rbac)")
	fs.StringVar(&c.nodePrefix, "node-prefix", "load-", "node ids are this prefix followed by 0..n-1")
	fs.StringVar(&c.cluster, "cluster", "load", "node.cluster of every sidecar")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "a sidecar not served this long after it starts opening counts as DeadlineExceeded")
	fs.DurationVar(&c.deadline, "deadline", 15*time.Minute, "the whole run (opening, push) gives up after this long")
	fs.IntVar(&c.serverPID, "server-pid", 0, "PID of the server on this machine: report its CPU (utime+stime) and RSS per sidecar from /proc")
	fs.BoolVar(&c.push, "push", false, "after all are served, wait for a ROOTCA change and report its fan-out latency")
	fs.StringVar(&c.pushCmd, "push-cmd", "", "with -push: shell command that changes the trust bundle (empty: the operator does it by hand)")
	fs.DurationVar(&c.pushTimeout, "push-timeout", 2*time.Minute, "with -push: how long to wait for every sidecar to get the change")
	fs.StringVar(&c.label, "label", "", "name of this run in the report and the JSON (e.g. server, baseline)")
	fs.StringVar(&c.servedOut, "served-out", "", "append the node id of each sidecar to this file as soon as it is served (crash tests)")
	fs.StringVar(&c.jsonOut, "json", "", "also write the result as JSON to this file (read by `sds-load table`)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	switch {
	case fs.NArg() > 0:
		return nil, fmt.Errorf("unexpected argument %q (flags only)", fs.Arg(0))
	case c.caFile == "":
		return nil, errors.New("-ca-file is required (the server's root CA in PEM)")
	case c.tokenFile == "":
		return nil, errors.New("-token-file is required (create one with `sds-server token create --service load --uses 0`)")
	case c.n < 1 || c.n > 1_000_000:
		return nil, fmt.Errorf("-n %d: want 1 to 1000000", c.n)
	case c.concurrency < 1:
		return nil, fmt.Errorf("-concurrency %d: want at least 1", c.concurrency)
	case c.conns < 0:
		return nil, fmt.Errorf("-conns %d: want 0 (one per sidecar) or more", c.conns)
	case c.timeout <= 0 || c.deadline <= 0 || c.pushTimeout <= 0:
		return nil, errors.New("-timeout, -deadline and -push-timeout must be positive")
	case c.pushCmd != "" && !c.push:
		return nil, errors.New("-push-cmd needs -push")
	}
	return c, nil
}

// Result is what one run measured; `sds-load table` compares them.
type Result struct {
	Label       string         `json:"label"`
	Mode        string         `json:"mode"`
	N           int            `json:"n"`
	Concurrency int            `json:"concurrency"`
	Conns       int            `json:"conns"`
	Served      int            `json:"served"`
	Errors      map[string]int `json:"errors"`
	ErrorText   string         `json:"error_text"`
	Lost        int64          `json:"lost_after_served"`
	FirstSecret Percentiles    `json:"first_secret"`
	AllServed   time.Duration  `json:"all_served"`
	FileLimit   uint64         `json:"file_limit"`
	// Server figures (with -server-pid).
	ServerCPU        time.Duration `json:"server_cpu"`
	CPUPerSidecar    time.Duration `json:"cpu_per_sidecar"`
	RSSBeforeKiB     int64         `json:"rss_before_kib"`
	RSSAfterKiB      int64         `json:"rss_after_kib"`
	RSSPerSidecarKiB float64       `json:"rss_per_sidecar_kib"`
	Push             Percentiles   `json:"push"`
	PushMissing      int           `json:"push_missing"`
	LoadAvg          string        `json:"loadavg"`
}

func (c *runConfig) mode() string {
	m := "ADS"
	if c.sds {
		m = "SDS"
	}
	if c.delta {
		m += " delta"
	} else {
		m += " SotW"
	}
	if c.ecds {
		m += " +ECDS"
	}
	if c.conns > 0 {
		m += fmt.Sprintf(", %d shared conns", c.conns)
	} else {
		m += ", own conn each"
	}
	return m
}

// runLoad runs the load described by c and returns what it measured.
func runLoad(ctx context.Context, c *runConfig, logw io.Writer) (*Result, error) {
	ctx, cancel := context.WithTimeout(ctx, c.deadline)
	defer cancel()
	limit, err := raiseFileLimit()
	if err != nil {
		return nil, err
	}
	if need := uint64(c.n) + 64; c.conns == 0 && limit < need {
		fmt.Fprintf(logw, "warning: open-file limit %d < %d sidecars + 64: some will fail with Unavailable; raise the hard limit (ulimit -Hn) or use -conns\n", limit, c.n)
	}
	creds, token, err := c.credentials()
	if err != nil {
		return nil, err
	}
	dial := func() (*grpc.ClientConn, error) {
		cc, err := grpc.NewClient("passthrough:///"+c.addr, grpc.WithTransportCredentials(creds),
			// Small client buffers: the client's memory is not measured, but
			// 10,000 connections in one process must fit.
			grpc.WithReadBufferSize(8<<10), grpc.WithWriteBufferSize(8<<10))
		if err != nil {
			return nil, fmt.Errorf("connect to %s: %w", c.addr, err)
		}
		return cc, nil
	}
	var shared []*grpc.ClientConn
	for i := 0; i < c.conns; i++ {
		cc, err := dial()
		if err != nil {
			return nil, err
		}
		defer cc.Close()
		shared = append(shared, cc)
	}
	subs := subscriptions(!c.sds, c.delta, c.ecds)
	want := len(secretNames)
	if c.ecds {
		want += len(ecdsNames)
	}
	res := &Result{Label: c.label, Mode: c.mode(), N: c.n, Concurrency: c.concurrency, Conns: c.conns, FileLimit: limit}

	var before procSample
	if c.serverPID > 0 {
		if before, err = readProc(c.serverPID); err != nil {
			return nil, err
		}
	}
	var servedLog *os.File
	if c.servedOut != "" {
		if servedLog, err = os.OpenFile(c.servedOut, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644); err != nil {
			return nil, fmt.Errorf("-served-out: %w", err)
		}
		defer servedLog.Close()
	}
	streamCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	errs := newErrorCounter()
	var lost atomic.Int64
	var mu sync.Mutex
	var served []*sidecar
	var ttfs []time.Duration
	var last time.Time
	var wg sync.WaitGroup
	sem := make(chan struct{}, c.concurrency)
	start := time.Now()
	var owned []*grpc.ClientConn
	var ownedMu sync.Mutex
	defer func() {
		ownedMu.Lock()
		defer ownedMu.Unlock()
		for _, cc := range owned {
			cc.Close()
		}
	}()
launch:
	for i := 0; i < c.n; i++ {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break launch
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			sc := newSidecar(&core.Node{Id: fmt.Sprintf("%s%d", c.nodePrefix, i), Cluster: c.cluster}, want)
			sc.started = time.Now()
			var cc *grpc.ClientConn
			if len(shared) > 0 {
				cc = shared[i%len(shared)]
			} else {
				var err error
				if cc, err = dial(); err != nil {
					errs.add(err)
					return
				}
				ownedMu.Lock()
				owned = append(owned, cc)
				ownedMu.Unlock()
			}
			errc := make(chan error, 1)
			sc.run(streamCtx, cc, subs, errc)
			timer := time.NewTimer(c.timeout)
			defer timer.Stop()
			select {
			case <-sc.served:
				mu.Lock()
				served = append(served, sc)
				sc.mu.Lock()
				ttfs = append(ttfs, sc.first.Sub(sc.started))
				sc.mu.Unlock()
				if now := time.Now(); now.After(last) {
					last = now
				}
				if servedLog != nil {
					fmt.Fprintln(servedLog, sc.node.Id) // unbuffered: on disk before the next
				}
				mu.Unlock()
				go func() { // a stream that ends before the run does is lost
					select {
					case <-errc:
						if ctx.Err() == nil {
							lost.Add(1)
						}
					case <-ctx.Done():
					}
				}()
			case err := <-errc:
				errs.add(err)
			case <-timer.C:
				errs.add(errTimeout)
			case <-ctx.Done():
				errs.add(errTimeout)
			}
		}(i)
	}
	wg.Wait()
	res.Served, res.Errors, res.ErrorText = len(served), errs.snapshot(), errs.String()
	res.FirstSecret = percentiles(ttfs)
	if !last.IsZero() {
		res.AllServed = last.Sub(start)
	}
	if c.serverPID > 0 {
		after, err := readProc(c.serverPID)
		if err != nil {
			return nil, err
		}
		res.ServerCPU = after.CPU - before.CPU
		res.RSSBeforeKiB, res.RSSAfterKiB = before.RSSKiB, after.RSSKiB
		if res.Served > 0 {
			res.CPUPerSidecar = res.ServerCPU / time.Duration(res.Served)
			res.RSSPerSidecarKiB = float64(after.RSSKiB-before.RSSKiB) / float64(res.Served)
		}
	}
	fmt.Fprintf(logw, "served %d of %d in %s; first secret %s; errors: %s\n", res.Served, c.n, res.AllServed.Round(time.Millisecond), res.FirstSecret, res.ErrorText)
	if c.push && len(served) > 0 {
		if err := measurePush(ctx, c, served, res, logw); err != nil {
			return res, err
		}
	}
	res.Lost = lost.Load()
	res.LoadAvg = loadAvg()
	return res, nil
}

// measurePush arms every served sidecar, runs the push command and waits
// (bounded) until each got a new ROOTCA.
func measurePush(ctx context.Context, c *runConfig, served []*sidecar, res *Result, logw io.Writer) error {
	for _, sc := range served {
		sc.arm()
	}
	t0 := time.Now()
	if c.pushFn != nil {
		if err := c.pushFn(); err != nil {
			return fmt.Errorf("push: %w", err)
		}
	} else if c.pushCmd != "" {
		cctx, cancel := context.WithTimeout(ctx, c.pushTimeout)
		out, err := exec.CommandContext(cctx, "sh", "-c", c.pushCmd).CombinedOutput()
		cancel()
		if err != nil {
			return fmt.Errorf("-push-cmd %q: %w: %s", c.pushCmd, err, strings.TrimSpace(string(out)))
		}
	} else {
		fmt.Fprintf(logw, "waiting up to %s for a trust-bundle change (ROOTCA) to reach %d sidecars\n", c.pushTimeout, len(served))
	}
	deadline := time.NewTimer(c.pushTimeout)
	defer deadline.Stop()
	var lat []time.Duration
	missing := 0
	for _, sc := range served {
		select {
		case <-sc.pushed:
		case <-deadline.C:
			deadline.Reset(0) // expired: the rest are checked without waiting
		case <-ctx.Done():
		}
		sc.mu.Lock()
		if sc.pushAt.IsZero() {
			missing++
		} else {
			lat = append(lat, sc.pushAt.Sub(t0))
		}
		sc.mu.Unlock()
	}
	res.Push, res.PushMissing = percentiles(lat), missing
	fmt.Fprintf(logw, "push reached %d of %d: %s\n", len(lat), len(served), res.Push)
	return nil
}

// credentials reads the root CA and the token.
func (c *runConfig) credentials() (credentials.TransportCredentials, string, error) {
	pem, err := os.ReadFile(c.caFile)
	if err != nil {
		return nil, "", fmt.Errorf("read -ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, "", fmt.Errorf("-ca-file %s: no PEM certificate in it", c.caFile)
	}
	tok, err := os.ReadFile(c.tokenFile)
	if err != nil {
		return nil, "", fmt.Errorf("read -token-file: %w", err)
	}
	token := strings.TrimSpace(string(tok))
	if token == "" {
		return nil, "", fmt.Errorf("-token-file %s is empty", c.tokenFile)
	}
	conf := &tls.Config{RootCAs: pool, ServerName: c.serverName, MinVersion: tls.VersionTLS12}
	return credentials.NewTLS(conf), token, nil
}

// loadAvg is the first three fields of /proc/loadavg ("" if unreadable).
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// printResult writes the human report of r.
func printResult(w io.Writer, r *Result) {
	fmt.Fprintf(w, "%s (%s): %d sidecars, %d opening at once\n", orDash(r.Label), r.Mode, r.N, r.Concurrency)
	fmt.Fprintf(w, "  served           %d (errors: %s; lost after served: %d)\n", r.Served, formatCodes(r.Errors), r.Lost)
	fmt.Fprintf(w, "  all served in    %s\n", r.AllServed.Round(time.Millisecond))
	fmt.Fprintf(w, "  first secret     %s\n", r.FirstSecret)
	if r.RSSAfterKiB > 0 {
		fmt.Fprintf(w, "  server CPU       %s total, %.2f ms per sidecar\n", r.ServerCPU, float64(r.CPUPerSidecar)/float64(time.Millisecond))
		fmt.Fprintf(w, "  server RSS       %d -> %d KiB, %.1f KiB per sidecar\n", r.RSSBeforeKiB, r.RSSAfterKiB, r.RSSPerSidecarKiB)
	}
	if r.Push.N > 0 || r.PushMissing > 0 {
		fmt.Fprintf(w, "  push fan-out     %s; %d missing\n", r.Push, r.PushMissing)
	}
	fmt.Fprintf(w, "  load average     %s; open-file limit %d\n", r.LoadAvg, r.FileLimit)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func writeJSON(path string, r *Result) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write -json: %w", err)
	}
	return nil
}
