package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
)

// tokenEnv is the environment variable a command reads the token from when
// neither --token nor --token-file is given.
const tokenEnv = "SDS_TOKEN"

// maxTokenFile bounds what --token-file reads: a token is under 100 bytes.
const maxTokenFile = 4096

// tokenFileTimeout bounds the wait for a pipe (--token-file <(...)) to
// deliver the token.
const tokenFileTimeout = 10 * time.Second

// addTokenFlags adds --token and --token-file to cmd; readToken reads them.
func addTokenFlags(cmd *cobra.Command) {
	cmd.Flags().String("token", "", "bootstrap token; visible to every local user in the process list: prefer --token-file or "+tokenEnv)
	cmd.Flags().String("token-file", "", "read the bootstrap token from this file (or pipe), e.g. one written 0600 by `token create > FILE`")
}

// readToken returns the token given by exactly one of --token, --token-file
// and $SDS_TOKEN, and names its source for error messages. None or several
// is a usage error. The token's text never appears in an error.
func readToken(cmd *cobra.Command) (text, source string, err error) {
	f := cmd.Flags()
	var sources []string
	if f.Changed("token") {
		sources = append(sources, "--token")
	}
	if f.Changed("token-file") {
		sources = append(sources, "--token-file")
	}
	env := os.Getenv(tokenEnv)
	if env != "" {
		sources = append(sources, tokenEnv)
	}
	switch len(sources) {
	case 0:
		return "", "", usageError{fmt.Errorf("no bootstrap token: give --token-file FILE, set %s, or give --token", tokenEnv)}
	case 1:
	default:
		return "", "", usageError{fmt.Errorf("the bootstrap token is given %d times (%s): give exactly one of --token-file, %s and --token",
			len(sources), strings.Join(sources, ", "), tokenEnv)}
	}
	switch source = sources[0]; source {
	case "--token":
		text, _ = f.GetString("token")
	case "--token-file":
		path, _ := f.GetString("token-file")
		if path == "" {
			return "", "", usageError{errors.New("--token-file is empty")}
		}
		source = "--token-file " + path
		if text, err = readTokenFile(path); err != nil {
			return "", "", fmt.Errorf("%s: %w", source, err)
		}
	default:
		text = env
	}
	if text == "" {
		return "", "", usageError{fmt.Errorf("%s is empty", source)}
	}
	return text, source, nil
}

// readTokenFile reads a token from a regular file or a pipe, trimming the
// white space around it. Opening does not block on a FIFO without a writer,
// reading a pipe is bounded in time, and a file too large to hold a token is
// refused unread.
func readTokenFile(path string) (string, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	switch typ := fi.Mode().Type(); {
	case typ == 0:
		if fi.Size() > maxTokenFile {
			return "", fmt.Errorf("%d bytes is too large for a token file (at most %d)", fi.Size(), maxTokenFile)
		}
	case typ == os.ModeNamedPipe:
		_ = f.SetReadDeadline(time.Now().Add(tokenFileTimeout))
	default:
		return "", fmt.Errorf("%s, not a regular file or a pipe", fileKind(typ))
	}
	b, err := io.ReadAll(io.LimitReader(f, maxTokenFile+1))
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return "", fmt.Errorf("no token arrived within %s", tokenFileTimeout)
		}
		return "", err
	}
	if len(b) > maxTokenFile {
		return "", fmt.Errorf("more than %d bytes: too large for a token file", maxTokenFile)
	}
	text := strings.TrimSpace(string(b))
	if text == "" {
		return "", errors.New("the file holds no token")
	}
	return text, nil
}

// fileKind names a file type for error messages.
func fileKind(typ os.FileMode) string {
	switch {
	case typ&os.ModeDir != 0:
		return "a directory"
	case typ&os.ModeSocket != 0:
		return "a socket"
	case typ&os.ModeDevice != 0:
		return "a device"
	default:
		return "a special file"
	}
}
