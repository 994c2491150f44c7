package authz

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if strings.HasSuffix(name, "/") {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestLoadDir(t *testing.T) {
	dir := t.TempDir()
	const webJSON = `[{"permission": {"method": "GET", "resource": "/user"}, "allow": ["web"]}]`
	writeFiles(t, dir, map[string]string{
		"prod/web.json":    webJSON,
		"prod/users.yaml":  "- permission:\n    method: GET\n    resource: /user/[0-9]+\n  allow: [web, staging/web]\n",
		"staging/web.yml":  "[]\n",
		"prod/db.yml":      "- permission: {method: FETCH, resource: /}\n  allow: [web]\n",
		"prod/broken.json": `[{"permission": {"method": "GET", "resource": "/"}, "allow": ["web"]`,
		"prod/api.json":    `[]`,
		"prod/api.yaml":    `[]`,
		// Stray paths: reported.
		"prod/Bad.json":  `[]`,
		"prod/notes.txt": "x",
		"prod/sub/":      "",
		"Bad-Env/":       "",
		"readme.md":      "x",
		// Editor and tooling leftovers: ignored.
		"prod/.web.json.swp":   "x",
		"prod/web.json~":       "x",
		"prod/.#web.json":      "x",
		"prod/#web.json#":      "x",
		"prod/4913":            "x",
		"prod/web.json.tmp":    "x",
		".git/config":          "x",
		"..2026_01_01/x.json":  "x",
		"prod/users.yaml.swx":  "x",
		"prod/a___jb_tmp___":   "x",
		"staging/.hidden.json": "x",
	})
	// Symlinks are followed, as in a Kubernetes ConfigMap volume.
	if err := os.Symlink("web.json", filepath.Join(dir, "prod", "link.json")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("missing.json", filepath.Join(dir, "prod", "dangling.json")); err != nil {
		t.Fatal(err)
	}

	d, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}

	ok := map[Key]ACL{
		{"prod", "web"}:    {entry("GET", "/user", "web")},
		{"prod", "link"}:   {entry("GET", "/user", "web")},
		{"prod", "users"}:  {entry("GET", "/user/[0-9]+", "web", "staging/web")},
		{"staging", "web"}: {},
	}
	bad := map[Key]string{
		{"prod", "db"}:     `prod/db.yml:entry 1: method "FETCH" is not one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE or "*"`,
		{"prod", "broken"}: "prod/broken.json:1:69: invalid JSON: unexpected end of JSON input",
		{"prod", "api"}:    "prod/api.json: the ACL of prod/api is defined by several files (prod/api.json, prod/api.yaml); keep one",
		// A dangling link claims its destination (so a caller keeps its
		// last good policy) and says where it points.
		{"prod", "dangling"}: "prod/dangling.json: symbolic link to missing.json: no such file or directory",
	}
	if len(d.Policies) != len(ok)+len(bad) {
		t.Errorf("LoadDir found %d destinations, want %d: %v", len(d.Policies), len(ok)+len(bad), d.Policies)
	}
	for k, want := range ok {
		r, found := d.Policies[k]
		switch {
		case !found:
			t.Errorf("%s: missing", k)
		case r.Err != nil:
			t.Errorf("%s: %v", k, r.Err)
		case !reflect.DeepEqual(r.ACL, want):
			t.Errorf("%s: ACL %+v, want %+v", k, r.ACL, want)
		}
	}
	for k, want := range bad {
		r, found := d.Policies[k]
		switch {
		case !found:
			t.Errorf("%s: missing", k)
		case r.Err == nil:
			t.Errorf("%s: no error, want %q", k, want)
		case r.Err.Error() != want:
			t.Errorf("%s: error\n got: %v\nwant: %s", k, r.Err, want)
		}
	}
	if r := d.Policies[Key{"prod", "web"}]; r.Path != "prod/web.json" {
		t.Errorf("Path = %q, want prod/web.json", r.Path)
	}
	var ve *ValidationError
	if !errors.As(d.Policies[Key{"prod", "db"}].Err, &ve) {
		t.Errorf("prod/db error is not a *ValidationError")
	}
	var pe *ParseError
	if !errors.As(d.Policies[Key{"prod", "broken"}].Err, &pe) {
		t.Errorf("prod/broken error is not a *ParseError")
	}

	const nameRule = "use 1-63 lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
	wantStray := []string{
		`Bad-Env/: invalid environment "Bad-Env": ` + nameRule,
		`prod/Bad.json: invalid service "Bad": ` + nameRule,
		"prod/notes.txt: unsupported file extension: name ACL files <service>.json, .yaml or .yml",
		"prod/sub/: directories are not read inside an environment directory",
		"readme.md: an ACL file belongs in an environment directory, as <env>/<service>.json",
	}
	var gotStray []string
	for _, e := range d.Stray {
		gotStray = append(gotStray, e.Error())
	}
	if !reflect.DeepEqual(gotStray, wantStray) {
		t.Errorf("Stray =\n%s\nwant\n%s", strings.Join(gotStray, "\n"), strings.Join(wantStray, "\n"))
	}
	var pathErr *PathError
	if len(d.Stray) > 0 && !errors.As(d.Stray[0], &pathErr) {
		t.Errorf("stray error %T is not a *PathError", d.Stray[0])
	}

	all := d.Err()
	if all == nil {
		t.Fatal("Dir.Err() = nil")
	}
	lines := strings.Split(all.Error(), "\n")
	if len(lines) != len(wantStray)+len(bad) || lines[0] != wantStray[0] || !strings.HasPrefix(lines[len(wantStray)], "prod/api.json:") {
		t.Errorf("Dir.Err() =\n%v", all)
	}
}

func TestLoadDirClean(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"prod/web.json": `[]`})
	d, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Err(); err != nil {
		t.Errorf("Dir.Err() = %v", err)
	}
	if len(d.Policies) != 1 || len(d.Stray) != 0 {
		t.Errorf("LoadDir = %+v", d)
	}
}

func TestLoadDirLimits(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"prod/web.json": "[" + strings.Repeat(" ", MaxFileSize) + "]"})
	d, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := d.Policies[Key{"prod", "web"}].Err, "prod/web.json: larger than 1048576 bytes"; got == nil || got.Error() != want {
		t.Errorf("error = %v, want %q", got, want)
	}
	if _, err := LoadDir(filepath.Join(dir, "missing")); err == nil {
		t.Error("LoadDir of a missing directory succeeded")
	}
}

// BenchmarkReadDir is the cost of one policy_dir poll that finds nothing
// changed: 200 services of about 1.5 KB each, read and hashed.
func BenchmarkReadDir(b *testing.B) {
	dir := b.TempDir()
	entry := `{"permission": {"method": "GET", "resource": "/users/[0-9]+"}, "allow": ["web", "api"]}`
	content := "[" + strings.Repeat(entry+",", 19) + entry + "]"
	for i := range 200 {
		p := filepath.Join(dir, fmt.Sprintf("env%d", i%4), fmt.Sprintf("svc%d.json", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	for b.Loop() {
		if _, err := ReadDir(dir); err != nil {
			b.Fatal(err)
		}
	}
}
