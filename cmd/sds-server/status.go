package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/sds-server/sds"
)

func newStatusCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status [-o table|json|yaml]",
		Short: "Is the running server ready, and why not: nodes, renewals, CA and CRL expiry, policy errors; exit 1 when not ready",
		Long: `Ask the running server (admin API GET /v1/status) whether it is ready — what its
/readyz says — and why not, with what an operator checks first: nodes connected,
renewals failing, nodes serving stale certificates, the CA root and intermediate
expiry, the CRL's next update, policy errors and the CA root rotation phase
("rotation" is null when none happened since start; 'ca status' has the detail).

Exit status: 0 ready; 1 not ready (the reasons on stderr, the report on stdout)
or the server cannot be reached; 2 a usage error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			var rep sds.StatusReport
			if err := callAdmin(cmd, "GET", "/v1/status", nil, &rep); err != nil {
				return err
			}
			if err := writeOutput(cmd.OutOrStdout(), format, rep, func(w io.Writer) error { return statusTable(w, rep) }); err != nil {
				return err
			}
			return rep.NotReadyError()
		},
	}
	addOutputFlag(cmd, outputTable)
	return cmd
}

// statusTable prints a status report for people.
func statusTable(w io.Writer, r sds.StatusReport) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	row := func(k, format string, a ...any) { fmt.Fprintf(tw, "%s:\t"+format+"\n", append([]any{k}, a...)...) }
	if r.Ready {
		row("READY", "yes")
	} else {
		row("READY", "no: %s", oneLine(strings.Join(r.Reasons, "; ")))
	}
	for _, wn := range r.Warnings {
		row("WARNING", "%s", oneLine(wn))
	}
	row("TRUST DOMAIN", "%s", r.TrustDomain)
	n := r.Nodes
	row("NODES", "%d connected (%d streams), %d known, %d revoked", n.Connected, n.Streams, n.Total, n.Revoked)
	row("RENEWALS FAILING", "%d (%d within 10%% of expiry)", n.RenewalFailing, n.AtRisk)
	row("SERVING STALE", "%d", n.ServingStale)
	for _, c := range r.CA.Roots {
		row("ROOT", "%s", certLine(c, r.Time))
	}
	if c := r.CA.Intermediate; c != nil {
		row("INTERMEDIATE", "%s", certLine(*c, r.Time))
	} else {
		row("INTERMEDIATE", "unknown until a certificate is issued")
	}
	if c := r.CA.CRL; c != nil {
		row("CRL", "next update %s (in %s), this update %s", c.NextUpdate.Format(time.RFC3339),
			c.NextUpdate.Sub(r.Time).Round(time.Second), c.ThisUpdate.Format(time.RFC3339))
	} else {
		row("CRL", "none")
	}
	p := r.Policy
	if p.Dir == "" {
		row("POLICY", "no policy_dir watched")
	} else {
		row("POLICY", "%s: %d invalid, %d stray", p.Dir, p.Invalid, len(p.Stray))
		for _, f := range p.InvalidFiles {
			row("  INVALID", "%s", f)
		}
		for _, f := range p.Stray {
			row("  STRAY", "%s", oneLine(f))
		}
	}
	if r.Rotation != nil {
		row("ROTATION", "%s: %d of %d sidecars done", r.Rotation.Phase, r.Rotation.Done, r.Rotation.Total)
	} else {
		row("ROTATION", "none")
	}
	return tw.Flush()
}

// certLine describes a CA certificate and its expiry, relative to now.
func certLine(c sds.CertExpiry, now time.Time) string {
	return fmt.Sprintf("%s, expires %s (in %s)", c.Subject, c.NotAfter.Format(time.RFC3339), days(c.NotAfter.Sub(now)))
}

// days renders a long duration in days, a short one as is.
func days(d time.Duration) string {
	if d >= 48*time.Hour || d <= -48*time.Hour {
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	}
	return d.Round(time.Second).String()
}
