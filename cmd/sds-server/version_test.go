package main

import (
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

func TestVersionLine(t *testing.T) {
	goLine := "go: " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"
	stamped := func(rev, modified string) *debug.BuildInfo {
		return &debug.BuildInfo{Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}}
	}
	cases := []struct {
		name, version, commit string
		bi                    *debug.BuildInfo
		want                  string
	}{
		{"tagged release, commit from ldflags", "v1.2.3", "0123abc", stamped("fff", "true"), "sds-server v1.2.3\ncommit: 0123abc\n" + goLine},
		{"toolchain stamp", "v1.2.3-4-g0123abc", "", stamped("0123abcdef", "false"), "sds-server v1.2.3-4-g0123abc\ncommit: 0123abcdef\n" + goLine},
		{"toolchain stamp, dirty tree", "v1.2.3-dirty", "", stamped("0123abcdef", "true"), "sds-server v1.2.3-dirty\ncommit: 0123abcdef (modified)\n" + goLine},
		{"no stamp", "dev", "", &debug.BuildInfo{}, "sds-server dev\ncommit: unknown\n" + goLine},
		{"no build info", "dev", "", nil, "sds-server dev\ncommit: unknown\n" + goLine},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := versionLine(c.version, c.commit, c.bi); got != c.want {
				t.Errorf("versionLine = %q, want %q", got, c.want)
			}
		})
	}
}

// TestVersionFlag checks that --version, -v and the version subcommand
// print the same thing, with the version, the commit line and Go's version.
func TestVersionFlag(t *testing.T) {
	want := buildVersion()
	if !strings.HasPrefix(want, "sds-server "+version+"\ncommit: ") || !strings.HasSuffix(want, runtime.Version()+" "+runtime.GOOS+"/"+runtime.GOARCH+"\n") {
		t.Fatalf("buildVersion() = %q", want)
	}
	for _, args := range [][]string{{"--version"}, {"-v"}, {"version"}} {
		r := runCLI(t, args...)
		if r.code != 0 || r.stderr != "" {
			t.Fatalf("%v: exit %d, stderr %q", args, r.code, r.stderr)
		}
		if r.stdout != want {
			t.Errorf("%v printed %q, want %q", args, r.stdout, want)
		}
	}
}
