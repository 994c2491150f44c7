// Command sds-load is a load harness for SDS servers: it opens many sidecar
// streams the way Envoy does and measures admission time, errors, the
// server's CPU and memory per sidecar and trust-bundle fan-out latency; its
// `baseline` subcommand is a bare server doing only the irreducible work per
// sidecar, to which those figures are compared (`sds-load table`).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `Usage: sds-load <command> [flags]

Commands:
  run       open N sidecar streams against a server and measure (default)
  baseline  a bare gRPC TLS server doing only the irreducible work per stream
  table     print the ratios of run results (-json files) to their baselines

"sds-load <command> -h" describes the flags of each.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches a command line and returns the exit code: 0 success, 1
// failure (or errors in the load), 2 bad usage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && (args[0] == "run" || args[0] == "baseline" || args[0] == "table") {
		cmd, args = args[0], args[1:]
	} else if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
		fmt.Fprint(stdout, usage)
		return 0
	}
	usageErr := func(err error) int {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "sds-load %s: %v\n", cmd, err)
		return 2
	}
	switch cmd {
	case "baseline":
		c, err := parseBaseline(args, stderr)
		if err != nil {
			return usageErr(err)
		}
		if err := runBaseline(ctx, c, stdout, stderr); err != nil {
			fmt.Fprintf(stderr, "sds-load baseline: %v\n", err)
			return 1
		}
		return 0
	case "table":
		if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
			fmt.Fprint(stderr, tableUsage)
			if len(args) == 0 {
				return 2
			}
			return 0
		}
		if err := printTable(stdout, args); err != nil {
			fmt.Fprintf(stderr, "sds-load table: %v\n", err)
			return 1
		}
		return 0
	}
	c, err := parseRun(args, stderr)
	if err != nil {
		return usageErr(err)
	}
	res, err := runLoad(ctx, c, stderr)
	if res != nil {
		printResult(stdout, res)
		if c.jsonOut != "" {
			if werr := writeJSON(c.jsonOut, res); werr != nil {
				fmt.Fprintf(stderr, "sds-load: %v\n", werr)
				return 1
			}
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "sds-load: %v\n", err)
		return 1
	}
	if res.Served < res.N || res.PushMissing > 0 {
		return 1
	}
	return 0
}
