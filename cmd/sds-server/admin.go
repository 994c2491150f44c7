package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/sds-server/sds"
)

// adminClient talks to the running server's admin API over its Unix socket.
type adminClient struct {
	socket string
	http   *http.Client
}

func newAdminClient(cmd *cobra.Command) (*adminClient, error) {
	cfg, err := loadConfig(cmd)
	if err != nil {
		return nil, err
	}
	sock := cfg.AdminSocket
	return &adminClient{
		socket: sock,
		http: &http.Client{
			Timeout: 30 * time.Second,
			Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			}},
		},
	}, nil
}

// callAdmin sends one request to the running server's admin API and
// decodes the JSON answer into out (if not nil).
func callAdmin(cmd *cobra.Command, method, path string, in, out any) error {
	c, err := newAdminClient(cmd)
	if err != nil {
		return err
	}
	return c.do(cmd.Context(), method, path, in, out)
}

// do sends a request and decodes a JSON answer into out. Errors carry the
// server's message, or say how to reach the server.
func (c *adminClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://sds-server"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var ne *net.OpError
		if errors.As(err, &ne) {
			return fmt.Errorf("cannot reach the admin API at %s: is `sds-server serve` running with this data dir? (%v)", c.socket, ne.Err)
		}
		return fmt.Errorf("admin API %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("admin API: read answer: %w", err)
	}
	if resp.StatusCode >= 300 {
		var e sds.ErrorResponse
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("admin API: %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("admin API: decode answer: %w", err)
	}
	return nil
}
