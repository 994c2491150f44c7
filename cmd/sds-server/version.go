package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// commit is set at build time with -ldflags "-X main.commit=..." (`make
// build` does); without it the Go toolchain's VCS stamp is used, which Go
// leaves out of builds in a git worktree or with -buildvcs=false.
var commit = ""

// versionLine is what `sds-server --version` and `sds-server version`
// print: the release (main.version, set by `make build` from `git describe
// --tags`: vMAJOR.MINOR.PATCH, with -N-gCOMMIT after a tag and -dirty for
// uncommitted changes), the commit (main.commit, else the one the Go
// toolchain recorded, with "modified" for a dirty tree; "unknown" when
// neither is known), and the Go version and platform. bi may be nil (no
// build info).
func versionLine(version, commit string, bi *debug.BuildInfo) string {
	modified := false
	if commit == "" && bi != nil {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if commit == "" {
		commit = "unknown"
	}
	if modified {
		commit += " (modified)"
	}
	return fmt.Sprintf("sds-server %s\ncommit: %s\ngo: %s %s/%s\n", version, commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// buildVersion is versionLine for this binary.
func buildVersion() string {
	bi, _ := debug.ReadBuildInfo()
	return versionLine(version, commit, bi)
}

// addVersion gives root a --version flag and a version subcommand, both
// printing buildVersion.
func addVersion(root *cobra.Command) {
	root.Version = version
	root.SetVersionTemplate(buildVersion())
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print the version, commit and Go version (same as --version)",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprint(cmd.OutOrStdout(), buildVersion()) },
	})
}
