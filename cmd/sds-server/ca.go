package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/sds-server/sds"
)

func newCACommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Show the CA and its trust-bundle rollout; rotate the built-in CA's root",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newCARotateCommand(), newCAStatusCommand())
	return cmd
}

func newCARotateCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rotate [--renew-over 10m] | --continue [--force] | --abort",
		Short: "Rotate the built-in CA's root through a cross-signed intermediate, each phase gated on every sidecar's ACK",
		Long: `Start a root rotation of the built-in CA (admin API POST /v1/ca/rotate). A new
root B, its intermediate and B cross-signed by the current root A are made and
stored; then the server walks three phases on its own, each persisted:

  1. trust_both: the trust bundle {A, B} goes to every sidecar; waits until every
     connected sidecar ACKed it.
  2. reissue: every certificate is re-issued from B's intermediate (chain: leaf,
     B's intermediate, B cross-signed by A), spread over --renew-over; waits until
     every connected sidecar serves one.
  3. trust_new: the bundle {B} alone; waits until every connected sidecar ACKed
     it. Then the rotation is complete and A's key is deleted.

Follow it with 'sds-server ca status'. --abort (phases 1 and 2) returns to A
alone and re-issues every certificate from A's intermediate. --continue advances
now if the phase's goal is met; with --force, past the sidecars that are not
done, which it names.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cont, _ := cmd.Flags().GetBool("continue")
			force, _ := cmd.Flags().GetBool("force")
			abort, _ := cmd.Flags().GetBool("abort")
			over, _ := cmd.Flags().GetDuration("renew-over")
			req := map[string]any{"action": "start"}
			switch {
			case cont && abort:
				return usageError{errors.New("--continue and --abort exclude each other")}
			case force && !cont:
				return usageError{errors.New("--force goes with --continue")}
			case cont:
				req = map[string]any{"action": "continue", "force": force}
			case abort:
				req = map[string]any{"action": "abort"}
			default:
				if over <= 0 {
					return usageError{fmt.Errorf("--renew-over %s: want a positive duration", over)}
				}
				req["renew_over"] = over.String()
			}
			var res sds.RotateResult
			if err := callAdmin(cmd, "POST", "/v1/ca/rotate", req, &res); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			switch {
			case abort:
				fmt.Fprintln(out, "rotation aborted: the trust bundle is the old root alone; certificates are re-issued from its intermediate")
			case cont:
				fmt.Fprintf(out, "rotation advanced to phase %s\n", res.Phase)
				for _, l := range res.Forced {
					fmt.Fprintf(out, "forced past node %s (%s/%s), not done\n", l.NodeID, l.Env, l.Service)
				}
			default:
				fmt.Fprintf(out, "rotation started: phase %s; follow it with: sds-server ca status\n", res.Phase)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.Duration("renew-over", sds.DefaultRenewOver, "spread the re-issue of phase 2 over this long")
	f.Bool("continue", false, "advance to the next phase now (its goal must be met, or --force)")
	f.Bool("force", false, "with --continue: advance past sidecars that are not done (named)")
	f.Bool("abort", false, "before phase 3: return to the old root alone")
	return cmd
}

func newCAStatusCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status [-o table|json|yaml]",
		Short: "The roots and intermediate with their expiry, the trust bundle's rollout, the rotation phase and its laggards",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			var rep sds.CAStatusReport
			if err := callAdmin(cmd, "GET", "/v1/ca/status", nil, &rep); err != nil {
				return err
			}
			return writeOutput(cmd.OutOrStdout(), format, rep, func(w io.Writer) error { return caStatusTable(w, rep, time.Now()) })
		},
	}
	addOutputFlag(cmd, outputTable)
	return cmd
}

// caStatusTable prints a CA status report for people.
func caStatusTable(w io.Writer, r sds.CAStatusReport, now time.Time) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	row := func(k, format string, a ...any) { fmt.Fprintf(tw, "%s:\t"+format+"\n", append([]any{k}, a...)...) }
	for _, c := range r.CA.Roots {
		row("ROOT", "%s", certLine(c, now))
	}
	if c := r.CA.Intermediate; c != nil {
		row("INTERMEDIATE", "%s", certLine(*c, now))
	}
	b := r.Bundle
	row("BUNDLE", "%s: %d of %d sidecars ACKed", b.Version, b.Acked, b.Connected)
	rot := r.Rotation
	if rot == nil || rot.Phase == "none" {
		row("ROTATION", "none")
	} else {
		row("ROTATION", "phase %s since %s; waiting for %s", rot.Phase, rot.PhaseStartedAt.Format(time.RFC3339), rot.Waiting)
		row("SIDECARS", "%d of %d done", rot.Done, rot.Total)
		if rot.RenewBy != nil {
			row("RENEW BY", "%s", rot.RenewBy.Format(time.RFC3339))
		}
		for _, l := range rot.Laggards {
			has := l.Has
			if has == "" {
				has = "nothing yet"
			}
			row("  LAGGARD", "%s (%s/%s): has %s", l.NodeID, l.Env, l.Service, has)
		}
	}
	if rot != nil {
		for _, h := range rot.History {
			forced := ""
			if len(h.Forced) > 0 {
				forced = ", forced past " + strings.Join(h.Forced, ",")
			}
			row("  HISTORY", "%s %s (%d of %d done%s)", h.At.Format(time.RFC3339Nano), h.Phase, h.Done, h.Total, forced)
		}
	}
	return tw.Flush()
}
