package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"text/tabwriter"
	"time"

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
		Use:   "list",
		Short: "List bootstrap tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var out struct {
				Tokens []sds.TokenInfo `json:"tokens"`
			}
			if err := callAdmin(cmd, "GET", "/v1/tokens", nil, &out); err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tIDENTITY\tSTATUS\tUSES\tEXPIRES")
			for _, t := range out.Tokens {
				uses := fmt.Sprintf("%d/unlimited", t.Uses)
				if t.MaxUses > 0 {
					uses = fmt.Sprintf("%d/%d", t.Uses, t.MaxUses)
				}
				fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\n", t.ID, t.Env, t.Service, t.Status, uses, t.ExpiresAt.Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
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
		Use:   "list",
		Short: "List nodes: id, identity, status, certificate expiry, last seen",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var out struct {
				Nodes []sds.NodeInfo `json:"nodes"`
			}
			if err := callAdmin(cmd, "GET", "/v1/nodes", nil, &out); err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tIDENTITY\tSTATUS\tCERT EXPIRES IN\tLAST SEEN")
			now := time.Now()
			for _, n := range out.Nodes {
				exp := "-"
				if !n.IssuedNotAfter.IsZero() {
					exp = n.IssuedNotAfter.Sub(now).Round(time.Second).String()
				}
				fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\n", n.ID, n.Env, n.Service, n.Status, exp, n.LastSeen.Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show one node as JSON: identity, issued and serving certificate, renewal state, open connections",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var out json.RawMessage
			if err := callAdmin(cmd, "GET", "/v1/nodes/"+url.PathEscape(args[0]), nil, &out); err != nil {
				return err
			}
			var buf bytes.Buffer
			if err := json.Indent(&buf, out, "", "  "); err != nil {
				return err
			}
			buf.WriteByte('\n')
			_, err := cmd.OutOrStdout().Write(buf.Bytes())
			return err
		},
	}
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
