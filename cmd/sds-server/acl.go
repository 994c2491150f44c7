package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshid/sds-server/authz"
	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/sds"
)

func newACLCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "acl",
		Short: "Check, compile and inspect per-service ACLs ({method, resource, allow})",
		Args:  cobra.NoArgs,
	}
	check := &cobra.Command{
		Use:   "check FILE...",
		Short: "Validate ACL files offline with the server's loader; prints file:entry N: reason for every problem",
		Long: `Validate ACL files offline, exactly as the server loads each file of policy_dir:
the same size limit (1 MiB), parser and validation. Symbolic links are followed;
directories, FIFOs, devices and sockets are refused without being read. The
environment of a file is taken from its directory (policy_dir/<env>/<service>.json).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// The root command's context ends on SIGINT/SIGTERM.
			ctx := cmd.Context()
			bad := 0
			for i, f := range args {
				err := checkACL(ctx, f)
				if ctx.Err() != nil {
					return fmt.Errorf("acl check interrupted after %d of %d file(s)", i, len(args))
				}
				if err != nil {
					fmt.Fprintln(cmd.OutOrStdout(), err)
					bad++
				}
			}
			if bad > 0 {
				return fmt.Errorf("%d of %d ACL file(s) invalid", bad, len(args))
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "%d ACL file(s) OK\n", len(args))
			return nil
		},
	}
	compile := &cobra.Command{
		Use:   "compile --service S [--env E] FILE",
		Short: "Print the Envoy RBAC filter config (JSON) an ACL file compiles to",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			service, _ := cmd.Flags().GetString("service")
			env, _ := cmd.Flags().GetString("env")
			if service == "" {
				return usageError{errors.New("--service is required")}
			}
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			acl, err := loadACL(args[0], env)
			if err != nil {
				return err
			}
			rbac, err := authz.Compile(acl, authz.Identity{TrustDomain: cfg.TrustDomain, Env: env, Service: service})
			if err != nil {
				return err
			}
			out, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true}.Marshal(rbac)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), string(out))
			return err
		},
	}
	compile.Flags().String("service", "", "destination service the ACL protects (required)")
	compile.Flags().String("env", "default", "environment of the destination service")
	status := &cobra.Command{
		Use:   "status [-o table|json|yaml]",
		Short: "List the policy in force per service on the running server, and files that failed to load; exit 1 if any did",
		Long: `List the policy in force per service on the running server (policy_dir), and
the files that failed to load. Exits 1, naming them on stderr, when a file is
invalid (its service keeps its last good policy: "stale"), a file is stray
(names no service, or cannot be read) or policy_dir cannot be read; 0 otherwise.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			var rep sds.PolicyReport
			if err := callAdmin(cmd, "GET", "/v1/acl", nil, &rep); err != nil {
				return err
			}
			if err := writeOutput(cmd.OutOrStdout(), format, rep, func(w io.Writer) error { return policyTable(w, rep) }); err != nil {
				return err
			}
			return policyProblems(rep)
		},
	}
	addOutputFlag(status, outputTable)
	cmd.AddCommand(check, compile, status)
	return cmd
}

// loadACL reads, parses and validates one ACL file for a destination in env
// ("" when unknown), with the server's loader.
func loadACL(path, env string) (authz.ACL, error) {
	return authz.LoadFile(path, env)
}

// checkACL loads one file as the server would and returns why it is invalid
// (nil when valid), or ctx's error when ctx ends first. The load cannot
// block on what the file is (authz.ReadFile refuses FIFOs and devices), but
// a slow filesystem could, so it is not waited for once ctx ends.
func checkACL(ctx context.Context, path string) error {
	done := make(chan error, 1)
	go func() {
		_, err := loadACL(path, envOfPath(path))
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// envOfPath guesses the destination's environment from the policy_dir
// layout <env>/<service>.json, or "".
func envOfPath(path string) string {
	env := filepath.Base(filepath.Dir(path))
	if issuer.ValidateName("environment", env) != nil {
		return ""
	}
	return env
}

// policyTable prints a policy report for people.
func policyTable(w io.Writer, rep sds.PolicyReport) error {
	fmt.Fprintf(w, "policy_dir %s, default policy %s\n", rep.Dir, rep.DefaultPolicy)
	if rep.Error != "" {
		fmt.Fprintf(w, "policy_dir unreadable, the policies below stay in force: %s\n", oneLine(rep.Error))
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tFILE\tSTATE\tENTRIES\tLOADED\tERROR")
	for _, s := range rep.Services {
		state, loaded := "inactive", "-"
		if s.Active {
			state, loaded = "active", s.LoadedAt.Format(time.RFC3339)
		}
		errText := "-"
		if s.Error != "" {
			errText = oneLine(s.Error)
			if s.Active {
				state = "stale" // last good policy kept
			}
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%d\t%s\t%s\n", s.Env, s.Service, s.File, state, s.Entries, loaded, errText)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, s := range rep.Stray {
		fmt.Fprintln(w, "stray:", oneLine(s))
	}
	return nil
}

// policyProblems is the error that makes `acl status` exit 1: the invalid
// and stray files, or an unreadable policy_dir; nil when there is none.
func policyProblems(rep sds.PolicyReport) error {
	var invalid []string
	for _, s := range rep.Services {
		if s.Error != "" {
			invalid = append(invalid, s.File)
		}
	}
	var stray []string
	for _, s := range rep.Stray {
		name, _, _ := strings.Cut(s, ": ")
		stray = append(stray, name)
	}
	var parts []string
	if rep.Error != "" {
		parts = append(parts, "policy_dir unreadable: "+rep.Error)
	}
	if len(invalid) > 0 {
		parts = append(parts, fmt.Sprintf("%d invalid ACL file(s): %s", len(invalid), strings.Join(invalid, ", ")))
	}
	if len(stray) > 0 {
		parts = append(parts, fmt.Sprintf("%d stray file(s): %s", len(stray), strings.Join(stray, ", ")))
	}
	if len(parts) == 0 {
		return nil
	}
	return errors.New(strings.Join(parts, "; "))
}
