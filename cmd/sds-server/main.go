// Command sds-server is a sidecar identity server for Envoy: it admits
// sidecars with bootstrap tokens, mints short-lived workload certificates and
// serves them over SDS. Subcommands other than serve are thin clients of the
// running server's admin API, or offline helpers (bootstrap envoy, version).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// usageError marks a command-line usage mistake: exit code 2, and a pointer
// to the --help of the command that was run.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes the CLI and returns the process exit code: 0 success, 1 a user
// error (one line on stderr saying what and why), 2 a usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCommand(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "sds-server: "+oneLine(err.Error()))
	var ue usageError
	if errors.As(err, &ue) {
		path := root.CommandPath()
		if cmd != nil {
			path = cmd.CommandPath()
		}
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", path)
		return 2
	}
	return 1
}

func oneLine(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == '\n' || c == '\r' {
			b[i] = ' '
		}
	}
	return string(b)
}

func newRootCommand(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "sds-server",
		Short:         "Sidecar identity server for Envoy: bootstrap tokens, short-lived mTLS certificates over SDS",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	addGlobalFlags(root)
	root.AddCommand(
		newServeCommand(),
		newTokenCommand(),
		newNodeCommand(),
		newBootstrapCommand(),
		newACLCommand(),
		newStatusCommand(),
		newCACommand(),
	)
	addVersion(root)
	// Argument-count mistakes are usage errors too.
	for _, c := range allCommands(root) {
		// Cobra skips the Args check of a command that cannot run and
		// prints its help with status 0, so `sds-server frobnicate` used to
		// "succeed". Command groups run to show their help, and an unknown
		// subcommand fails their NoArgs check below: a usage error.
		if !c.Runnable() {
			c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
		}
		if c.Args != nil {
			args := c.Args
			c.Args = func(cmd *cobra.Command, a []string) error {
				if err := args(cmd, a); err != nil {
					return usageError{err}
				}
				return nil
			}
		}
	}
	return root
}

func allCommands(c *cobra.Command) []*cobra.Command {
	out := []*cobra.Command{c}
	for _, sub := range c.Commands() {
		out = append(out, allCommands(sub)...)
	}
	return out
}
