package main

import (
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/meshid/sds-server/sds"
)

func newTokenCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Create, list and revoke bootstrap tokens (through the running server's admin API)",
		Args:  cobra.NoArgs,
	}
	create := &cobra.Command{
		Use:   "create --service S [--env E] [--ttl D] [--uses N]",
		Short: "Create a bootstrap token; prints the token alone on stdout, details on stderr",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			service, _ := cmd.Flags().GetString("service")
			env, _ := cmd.Flags().GetString("env")
			ttl, _ := cmd.Flags().GetDuration("ttl")
			uses, _ := cmd.Flags().GetInt("uses")
			if service == "" {
				return usageError{fmt.Errorf("--service is required")}
			}
			// `token create > FILE`: FILE holds the token; make it 0600
			// before a token exists.
			if err := privateStdout(cmd.OutOrStdout()); err != nil {
				return err
			}
			var out sds.TokenCreateResponse
			req := sds.TokenCreateRequest{Service: service, Env: env, TTL: ttl.String(), Uses: &uses}
			if err := callAdmin(cmd, "POST", "/v1/tokens", req, &out); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), out.Token)
			uses2 := "unlimited uses"
			if out.Info.MaxUses > 0 {
				uses2 = fmt.Sprintf("%d use(s)", out.Info.MaxUses)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "token %s for %s/%s, expires %s, %s; it is shown only this once\n",
				out.Info.ID, out.Info.Env, out.Info.Service, out.Info.ExpiresAt.Format(time.RFC3339), uses2)
			return nil
		},
	}
	create.Flags().String("service", "", "service the token admits nodes as (required)")
	create.Flags().String("env", "default", "environment of the service")
	create.Flags().Duration("ttl", sds.DefaultTokenTTL, "how long the token admits new nodes")
	create.Flags().Int("uses", sds.DefaultTokenUses, "how many nodes the token may admit (one per node.id; a node away until its certificate expired takes another when it returns); 0 = unlimited")

	list := &cobra.Command{
		Use:   "list [-o table|json|yaml]",
		Short: "List bootstrap tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			var out sds.TokenList
			if err := callAdmin(cmd, "GET", "/v1/tokens", nil, &out); err != nil {
				return err
			}
			return writeOutput(cmd.OutOrStdout(), format, out, func(w io.Writer) error {
				tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tIDENTITY\tSTATUS\tUSES\tEXPIRES")
				for _, t := range out.Tokens {
					uses := fmt.Sprintf("%d/unlimited", t.Uses)
					if t.MaxUses > 0 {
						uses = fmt.Sprintf("%d/%d", t.Uses, t.MaxUses)
					}
					fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\n", t.ID, t.Env, t.Service, t.Status, uses, t.ExpiresAt.Format(time.RFC3339))
				}
				return tw.Flush()
			})
		},
	}
	addOutputFlag(list, outputTable)
	revoke := &cobra.Command{
		Use:   "revoke ID [--revoke-nodes]",
		Short: "Revoke a bootstrap token: it admits no node and authenticates no stream from now on",
		Long: `Revoke a bootstrap token. From now on it admits no node and authenticates no
stream; the open streams of every node it admitted end at once and those nodes
get no further certificate (they cannot reconnect). The certificates they hold
stay valid until they expire, unless --revoke-nodes also revokes the nodes:
then their certificates go on the revocation list at once.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			withNodes, _ := cmd.Flags().GetBool("revoke-nodes")
			path := "/v1/tokens/" + url.PathEscape(args[0]) + "/revoke"
			if withNodes {
				path += "?revoke_nodes=true"
			}
			var out sds.TokenRevokeResponse
			if err := callAdmin(cmd, "POST", path, nil, &out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "token %s (%s/%s) revoked", out.ID, out.Env, out.Service)
			if withNodes {
				fmt.Fprintf(cmd.ErrOrStderr(), ", with %d node(s)", len(out.RevokedNodes))
			}
			fmt.Fprintln(cmd.ErrOrStderr())
			return nil
		},
	}
	revoke.Flags().Bool("revoke-nodes", false, "also revoke every node the token admitted: their certificates go on the CRL at once")
	cmd.AddCommand(create, list, revoke)
	return cmd
}

func newNodeCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Inspect admitted nodes (through the running server's admin API)",
		Args:  cobra.NoArgs,
	}
	list := &cobra.Command{
		Use:   "list [-o table|json|yaml]",
		Short: "List nodes: id, identity, claimed node.id, mode, state (connected, disconnected, revoked), streams, certificate expiry, last seen",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			var out sds.NodeList
			if err := callAdmin(cmd, "GET", "/v1/nodes", nil, &out); err != nil {
				return err
			}
			return writeOutput(cmd.OutOrStdout(), format, out, func(w io.Writer) error {
				tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tIDENTITY\tNODE.ID\tMODE\tSTATUS\tSTREAMS\tCERT EXPIRES IN\tLAST SEEN")
				now := time.Now()
				for _, n := range out.Nodes {
					fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\t%d\t%s\t%s\n", n.ID, n.Env, n.Service, printable(n.ClaimedID),
						n.Mode, n.State, n.Streams, expiresIn(n.IssuedNotAfter, now), timeOrDash(n.LastSeen))
				}
				return tw.Flush()
			})
		},
	}
	addOutputFlag(list, outputTable)
	show := &cobra.Command{
		Use:   "show ID [-o json|yaml|table]",
		Short: "Show one node: identity, state, issued and serving certificate, renewal state, open connections (JSON by default)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			var n sds.NodeInfo
			if err := callAdmin(cmd, "GET", "/v1/nodes/"+url.PathEscape(args[0]), nil, &n); err != nil {
				return err
			}
			return writeOutput(cmd.OutOrStdout(), format, n, func(w io.Writer) error { return nodeTable(w, n, time.Now()) })
		},
	}
	// JSON stays the default: `node show` printed JSON before -o existed.
	addOutputFlag(show, outputJSON)
	revoke := &cobra.Command{
		Use:   "revoke ID [--reason R] [--keep-token | --revoke-token]",
		Short: "Revoke a node: its streams end, it gets no more certificates, its certificates go on the CRL, and its token admits no replacement",
		Long: `Revoke a node: its streams end, it gets no more certificates, and its
certificates go on the revocation list.

The bootstrap token that admitted it must not admit a replacement: a
single-use token (--uses 1, the default) is revoked with the node. For a
multi-use or unlimited token that can still admit nodes the command refuses
and revokes nothing unless you choose:
  --revoke-token  revoke the token too: the streams of its other nodes end and
                  they cannot reconnect (their certificates stay valid until
                  they expire);
  --keep-token    revoke only the node: the token keeps admitting nodes.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			reason, _ := cmd.Flags().GetString("reason")
			keep, _ := cmd.Flags().GetBool("keep-token")
			revokeTok, _ := cmd.Flags().GetBool("revoke-token")
			if keep && revokeTok {
				return usageError{fmt.Errorf("--keep-token and --revoke-token exclude each other: choose one")}
			}
			path := "/v1/nodes/" + url.PathEscape(args[0]) + "/revoke"
			switch {
			case keep:
				path += "?keep_token=true"
			case revokeTok:
				path += "?revoke_token=true"
			}
			var out sds.NodeRevokeResponse
			if err := callAdmin(cmd, "POST", path, sds.NodeRevokeRequest{Reason: reason}, &out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "node %s (%s/%s) revoked", out.ID, out.Env, out.Service)
			if out.TokenNote != "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "; %s", out.TokenNote)
			}
			fmt.Fprintln(cmd.ErrOrStderr())
			return nil
		},
	}
	revoke.Flags().String("reason", "", "why, recorded with the revocation")
	revoke.Flags().Bool("keep-token", false, "revoke only the node; its multi-use token keeps admitting nodes")
	revoke.Flags().Bool("revoke-token", false, "revoke the node's token too, whatever its use limit (the streams of its other nodes end)")
	cmd.AddCommand(list, show, revoke)
	return cmd
}

// nodeTable prints one node as "key: value" lines.
func nodeTable(w io.Writer, n sds.NodeInfo, now time.Time) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("ID", n.ID)
	row("IDENTITY", n.Env+"/"+n.Service)
	row("NODE.ID", printable(n.ClaimedID))
	row("TOKEN", n.TokenID)
	row("MODE", n.Mode)
	row("STATUS", n.State)
	row("STREAMS", fmt.Sprint(n.Streams))
	if len(n.Connections) > 0 {
		row("CONNECTIONS", strings.Join(n.Connections, ", "))
	}
	row("FIRST SEEN", timeOrDash(n.FirstSeen))
	row("LAST SEEN", timeOrDash(n.LastSeen))
	row("ISSUED", dashIfEmpty(n.IssuedSerial)+" (expires in "+expiresIn(n.IssuedNotAfter, now)+")")
	row("SERVING", dashIfEmpty(n.ServingSerial)+" (expires in "+expiresIn(n.ServingNotAfter, now)+")")
	row("RENEW AT", timeOrDash(n.RenewAt))
	if n.RenewalFailures > 0 {
		row("RENEWAL FAILURES", fmt.Sprintf("%d: %s", n.RenewalFailures, oneLine(n.LastError)))
	}
	if n.SharedEvents > 0 {
		row("SHARED EVENTS", fmt.Sprint(n.SharedEvents))
	}
	if !n.RevokedAt.IsZero() {
		row("REVOKED", timeOrDash(n.RevokedAt)+" "+printable(n.RevokeReason))
	}
	return tw.Flush()
}

// expiresIn is how long until t, "-" for the zero time.
func expiresIn(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Sub(now).Round(time.Second).String()
}

func timeOrDash(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format(time.RFC3339)
}

func dashIfEmpty(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printable returns s for a table cell: quoted when it holds spaces or
// characters that are not printable (a sidecar chooses its node.id), so a
// cell cannot shift columns or send terminal escapes.
func printable(s string) string {
	if s == "" {
		return "-"
	}
	for _, r := range s {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return strconv.Quote(s)
		}
	}
	return s
}
