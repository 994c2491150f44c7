package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/meshid/sds-server/authz"
	"github.com/meshid/sds-server/internal/stepcainit"
)

// composeFile is the part of the Compose specification docker-compose.yml
// may use. It is decoded strictly: a key outside it (a typo, or a feature
// this check does not know) fails the test.
type composeFile struct {
	Name     string                    `json:"name"`
	Services map[string]composeService `json:"services"`
	Volumes  map[string]*struct{}      `json:"volumes"`
}

type composeService struct {
	Image       string            `json:"image"`
	Build       json.RawMessage   `json:"build"`
	Command     []string          `json:"command"`
	Entrypoint  []string          `json:"entrypoint"`
	Environment map[string]string `json:"environment"`
	Volumes     []string          `json:"volumes"`
	Ports       []string          `json:"ports"`
	NetworkMode string            `json:"network_mode"`
	User        string            `json:"user"`
	DependsOn   map[string]struct {
		Condition string `json:"condition"`
	} `json:"depends_on"`
	Healthcheck *struct {
		Test     []string `json:"test"`
		Interval string   `json:"interval"`
		Timeout  string   `json:"timeout"`
		Retries  int      `json:"retries"`
	} `json:"healthcheck"`
}

type composeBuild struct {
	Context    string `json:"context"`
	Target     string `json:"target"`
	Dockerfile string `json:"dockerfile"`
}

func (s composeService) build(t *testing.T, name string) *composeBuild {
	t.Helper()
	if len(s.Build) == 0 {
		return nil
	}
	var ctx string
	if json.Unmarshal(s.Build, &ctx) == nil {
		return &composeBuild{Context: ctx}
	}
	var b composeBuild
	dec := json.NewDecoder(strings.NewReader(string(s.Build)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		t.Errorf("service %s: build: %v", name, err)
	}
	return &b
}

func loadCompose(t *testing.T) (*composeFile, string) {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "docker-compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var c composeFile
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	return &c, root
}

// dockerfileStages returns the stage names of the Dockerfile in order, the
// base image of each, and the instructions of each.
type dockerStage struct {
	name, from string
	lines      []string
}

func parseDockerfile(t *testing.T, path string) []dockerStage {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var stages []dockerStage
	var cont string
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if strings.HasSuffix(l, "\\") {
			cont += strings.TrimSuffix(l, "\\") + " "
			continue
		}
		l, cont = cont+l, ""
		f := strings.Fields(l)
		if strings.EqualFold(f[0], "FROM") {
			st := dockerStage{from: f[1]}
			if len(f) == 4 && strings.EqualFold(f[2], "AS") {
				st.name = f[3]
			}
			stages = append(stages, st)
			continue
		}
		if len(stages) > 0 {
			stages[len(stages)-1].lines = append(stages[len(stages)-1].lines, l)
		}
	}
	return stages
}

// TestComposeFile checks docker-compose.yml without Docker: the schema
// essentials (strict keys, images or builds, references between services,
// volumes, loopback-only ports, build targets), the shape the issue asks
// for, and the Dockerfile it builds. Where `docker compose` exists it also
// runs `docker compose config`.
func TestComposeFile(t *testing.T) {
	c, root := loadCompose(t)
	if c.Name == "" {
		t.Errorf("no project name")
	}
	stages := parseDockerfile(t, filepath.Join(root, "Dockerfile"))
	stageNames := map[string]bool{}
	for _, st := range stages {
		stageNames[st.name] = true
	}
	usedVolumes := map[string]bool{}
	for name, s := range c.Services {
		b := s.build(t, name)
		if (s.Image == "") == (b == nil) {
			t.Errorf("service %s: want exactly one of image and build", name)
		}
		if b != nil {
			if b.Context != "." {
				t.Errorf("service %s: build context %q, want the repository (.)", name, b.Context)
			}
			if b.Dockerfile != "" {
				t.Errorf("service %s: builds %s; the repository has one Dockerfile", name, b.Dockerfile)
			}
			if b.Target != "" && !stageNames[b.Target] {
				t.Errorf("service %s: build target %q is not a stage of the Dockerfile", name, b.Target)
			}
		}
		if m := s.NetworkMode; m != "" {
			other, ok := strings.CutPrefix(m, "service:")
			if !ok {
				t.Errorf("service %s: network_mode %q: only service:<name> is used here", name, m)
			} else if o, exists := c.Services[other]; !exists {
				t.Errorf("service %s: network_mode names unknown service %q", name, other)
			} else if o.NetworkMode != "" {
				t.Errorf("service %s: shares the network of %s, which shares another's", name, other)
			} else if _, dep := s.DependsOn[other]; !dep {
				t.Errorf("service %s: shares %s's network namespace but does not depend on it", name, other)
			}
			if len(s.Ports) > 0 {
				t.Errorf("service %s: ports on a service that shares another's network (put them on %s)", name, other)
			}
		}
		for dep, d := range s.DependsOn {
			o, ok := c.Services[dep]
			switch {
			case !ok:
				t.Errorf("service %s: depends_on unknown service %q", name, dep)
			case d.Condition == "service_healthy" && o.Healthcheck == nil:
				t.Errorf("service %s: waits for %s to be healthy, which has no healthcheck", name, dep)
			case !slices.Contains([]string{"service_started", "service_healthy", "service_completed_successfully"}, d.Condition):
				t.Errorf("service %s: depends_on %s: condition %q", name, dep, d.Condition)
			}
		}
		for _, v := range s.Volumes {
			parts := strings.Split(v, ":")
			if len(parts) < 2 || len(parts) > 3 || (len(parts) == 3 && parts[2] != "ro" && parts[2] != "rw") || !strings.HasPrefix(parts[1], "/") {
				t.Errorf("service %s: volume %q: want SOURCE:/PATH[:ro]", name, v)
				continue
			}
			if src := parts[0]; strings.HasPrefix(src, ".") || strings.HasPrefix(src, "/") {
				if _, err := os.Stat(filepath.Join(root, src)); err != nil {
					t.Errorf("service %s: bind mount source %s: %v", name, src, err)
				}
			} else if _, ok := c.Volumes[src]; !ok {
				t.Errorf("service %s: named volume %q is not declared under volumes", name, src)
			} else {
				usedVolumes[src] = true
			}
		}
		for _, p := range s.Ports {
			if !strings.HasPrefix(p, "127.0.0.1:") {
				t.Errorf("service %s: port %q is published beyond the host's loopback", name, p)
			}
		}
		if h := s.Healthcheck; h != nil {
			if len(h.Test) < 2 || h.Test[0] != "CMD" {
				t.Errorf("service %s: healthcheck test %q: want [CMD, ...] (no shell in these images)", name, h.Test)
			}
			for _, d := range []string{h.Interval, h.Timeout} {
				if _, err := time.ParseDuration(d); err != nil {
					t.Errorf("service %s: healthcheck duration %q: %v", name, d, err)
				}
			}
		}
	}
	for v := range c.Volumes {
		if !usedVolumes[v] {
			t.Errorf("volume %s is declared but no service mounts it", v)
		}
	}
	checkAcyclic(t, c)

	// What the issue asks for.
	want := map[string]string{
		"emoji-svc":  "docker.l5d.io/buoyantio/emojivoto-emoji-svc:v11",
		"voting-svc": "docker.l5d.io/buoyantio/emojivoto-voting-svc:v11",
		"web":        "docker.l5d.io/buoyantio/emojivoto-web:v11",
	}
	for app, image := range want {
		if got := c.Services[app].Image; got != image {
			t.Errorf("service %s: image %q, want %q", app, got, image)
		}
	}
	want["vote-bot"] = ""
	sidecars := 0
	for name, s := range c.Services {
		if !strings.HasSuffix(name, "-sidecar") {
			continue
		}
		sidecars++
		if s.Image != "envoyproxy/envoy:v1.40-latest" {
			t.Errorf("%s: image %q, want envoyproxy/envoy:v1.40-latest", name, s.Image)
		}
		app, ok := strings.CutPrefix(s.NetworkMode, "service:")
		if !ok {
			t.Errorf("%s: network_mode %q, want service:<its app>", name, s.NetworkMode)
		}
		delete(want, app)
	}
	for app := range want {
		t.Errorf("service %s has no sidecar (an Envoy with network_mode service:%s)", app, app)
	}
	if sidecars != 4 {
		t.Errorf("%d sidecars, want 4", sidecars)
	}
	if img := c.Services["step-ca"].Image; !strings.HasPrefix(img, "smallstep/step-ca:") {
		t.Errorf("step-ca: image %q, want smallstep/step-ca", img)
	}
	sds := c.Services["sds-server"]
	if b := sds.build(t, "sds-server"); b == nil || b.Target != "" {
		t.Errorf("sds-server: want `build: .` (the Dockerfile's final stage)")
	}
	if sds.Environment["SDS_CA_BACKEND"] != "stepca" {
		t.Errorf("sds-server: SDS_CA_BACKEND %q, want stepca", sds.Environment["SDS_CA_BACKEND"])
	}
	for k := range sds.Environment {
		if !knownEnv(k) {
			t.Errorf("sds-server: %s is not a configuration key's environment variable", k)
		}
	}
	if !slices.Contains(sds.Volumes, "./examples/emojivoto/compose-policies:/policies:ro") || sds.Environment["SDS_POLICY_DIR"] != "/policies" {
		t.Errorf("sds-server: want the compose policies mounted read-only as its policy_dir")
	}

	// The Dockerfile: multi-stage, static binary, non-root, distroless.
	if len(stages) < 2 {
		t.Errorf("Dockerfile: %d stage(s), want a multi-stage build", len(stages))
	} else {
		final := stages[len(stages)-1]
		if !strings.HasPrefix(final.from, "gcr.io/distroless/static") && final.from != "scratch" {
			t.Errorf("Dockerfile: final stage FROM %s, want distroless/static or scratch", final.from)
		}
		var user string
		for _, st := range stages[1:] {
			user = ""
			for _, l := range st.lines {
				if f := strings.Fields(l); strings.EqualFold(f[0], "USER") {
					user = f[1]
				}
			}
			if u, _, _ := strings.Cut(user, ":"); u != "65532" && u != "nonroot" {
				t.Errorf("Dockerfile: stage %s runs as %q, want 65532 (nonroot)", st.name, user)
			}
		}
		var static bool
		for _, l := range stages[0].lines {
			static = static || strings.Contains(l, "CGO_ENABLED=0 go build") && strings.Contains(l, "./cmd/sds-server")
		}
		if !static {
			t.Errorf("Dockerfile: the build stage does not build ./cmd/sds-server with CGO_ENABLED=0")
		}
	}

	// The Compose implementation's own check (its JSON schema and more),
	// with the plugin or a standalone docker-compose v2, when there is one.
	compose := []string{"docker", "compose"}
	if err := exec.Command("docker", "compose", "version").Run(); err != nil {
		compose = []string{"docker-compose"}
		if err := exec.Command("docker-compose", "version").Run(); err != nil {
			t.Logf("neither `docker compose` nor docker-compose is available; checked without them")
			return
		}
	}
	cmd := exec.Command(compose[0], append(compose[1:], "-f", filepath.Join(root, "docker-compose.yml"), "config", "--quiet")...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("%s config: %v\n%s", strings.Join(compose, " "), err, out)
	} else {
		t.Logf("%s config: OK", strings.Join(compose, " "))
	}
}

// knownEnv reports whether name is the SDS_* variable of a configuration
// key (README "Configuration").
func knownEnv(name string) bool {
	keys := []string{"data_dir", "listen_addr", "metrics_addr", "admin_socket", "trust_domain", "cert_ttl",
		"allow_short_ttl", "renew_window", "crl_period", "default_policy", "policy_dir", "server_names", "log_level",
		"ca.backend", "ca.url", "ca.root_fingerprint", "ca.root_file", "ca.provisioner", "ca.key_file", "ca.password_file"}
	for _, k := range keys {
		if name == "SDS_"+strings.ToUpper(strings.ReplaceAll(k, ".", "_")) {
			return true
		}
	}
	return false
}

func checkAcyclic(t *testing.T, c *composeFile) {
	t.Helper()
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(string, []string)
	visit = func(n string, path []string) {
		switch state[n] {
		case 1:
			t.Errorf("depends_on cycle: %s", strings.Join(append(path, n), " -> "))
			return
		case 2:
			return
		}
		state[n] = 1
		for dep := range c.Services[n].DependsOn {
			visit(dep, append(path, n))
		}
		state[n] = 2
	}
	for n := range c.Services {
		visit(n, nil)
	}
}

// decision is one request and whether the ACLs let it through.
type decision struct {
	caller, dest, method, path string
	allow                      bool
}

// allowedBy evaluates an ACL the way its RBAC compilation does: method
// (or *), the resource regex over the whole path, the caller (or *).
func allowedBy(t *testing.T, acl authz.ACL, caller, method, path string) bool {
	t.Helper()
	for _, e := range acl {
		if e.Permission.Method != authz.AnyMethod && e.Permission.Method != method {
			continue
		}
		re, err := regexp.Compile(`^(?:` + e.Permission.Resource + `)$`)
		if err != nil {
			t.Fatalf("resource %q: %v", e.Permission.Resource, err)
		}
		if re.MatchString(path) && (slices.Contains(e.Allow, caller) || slices.Contains(e.Allow, authz.AnyCaller)) {
			return true
		}
	}
	return false
}

func checkPolicies(t *testing.T, dir string, services []string, matrix []decision) {
	t.Helper()
	d, err := authz.LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Err(); err != nil {
		t.Fatalf("%s: %v", dir, err)
	}
	for _, s := range services {
		if _, ok := d.Policies[authz.Key{Env: "default", Service: s}]; !ok {
			t.Errorf("%s: no ACL for default/%s", dir, s)
		}
	}
	for _, m := range matrix {
		res, ok := d.Policies[authz.Key{Env: "default", Service: m.dest}]
		got := ok && allowedBy(t, res.ACL, m.caller, m.method, m.path)
		if got != m.allow {
			t.Errorf("%s: %s -> %s %s %s: allowed=%v, want %v", dir, m.caller, m.dest, m.method, m.path, got, m.allow)
		}
	}
}

// TestComposePolicies checks the ACLs of the compose mesh against
// emojivoto's real gRPC paths: what the app needs, and nothing else.
func TestComposePolicies(t *testing.T) {
	root, _ := filepath.Abs("..")
	checkPolicies(t, filepath.Join(root, "examples", "emojivoto", "compose-policies"), []string{"web", "emoji", "voting"}, []decision{
		{"vote-bot", "web", "GET", "/api/list", true},
		{"vote-bot", "web", "GET", "/api/vote", true},
		{"vote-bot", "web", "POST", "/api/vote", false},
		{"emoji", "web", "GET", "/api/list", false},
		{"web", "emoji", "POST", "/emojivoto.v1.EmojiService/ListAll", true},
		{"web", "emoji", "POST", "/emojivoto.v1.EmojiService/FindByShortcode", true},
		{"web", "emoji", "GET", "/emojivoto.v1.EmojiService/ListAll", false},
		{"web", "emoji", "POST", "/emojivoto.v1.EmojiService/Other", false},
		{"web", "emoji", "POST", "/emojivotoXv1.EmojiService/ListAll", false}, // dots are literal
		{"vote-bot", "emoji", "POST", "/emojivoto.v1.EmojiService/ListAll", false},
		{"web", "voting", "POST", "/emojivoto.v1.VotingService/VoteDoughnut", true},
		{"web", "voting", "POST", "/emojivoto.v1.VotingService/Vote100", true},
		{"web", "voting", "POST", "/emojivoto.v1.VotingService/Results", true},
		{"web", "voting", "POST", "/emojivoto.v1.VotingService/Vote", false},
		{"vote-bot", "voting", "POST", "/emojivoto.v1.VotingService/VoteDoughnut", false},
		{"emoji", "voting", "POST", "/emojivoto.v1.VotingService/Results", false},
		{"web", "vote-bot", "GET", "/", false}, // no ACL: default deny
	})
}

// TestDemoPolicies checks the ACLs of the `make demo` mesh.
func TestDemoPolicies(t *testing.T) {
	root, _ := filepath.Abs("..")
	checkPolicies(t, filepath.Join(root, "examples", "emojivoto", "policies"), []string{"web", "emoji", "voting"}, []decision{
		{"vote-bot", "web", "GET", "/api/list", true},
		{"vote-bot", "web", "POST", "/api/vote", true},
		{"vote-bot", "web", "GET", "/api/results", true},
		{"vote-bot", "web", "GET", "/api/vote", false},
		{"web", "web", "GET", "/api/list", false},
		{"web", "emoji", "GET", "/emoji/list", true},
		{"web", "emoji", "GET", "/emoji/find", true},
		{"web", "emoji", "POST", "/emoji/list", false},
		{"web", "emoji", "GET", "/emoji/listall", false},
		{"vote-bot", "emoji", "GET", "/emoji/list", false},
		{"web", "voting", "POST", "/vote", true},
		{"web", "voting", "GET", "/results", true},
		{"web", "voting", "GET", "/vote", false},
		{"vote-bot", "voting", "POST", "/vote", false}, // the demo's scripted denial
		{"emoji", "voting", "GET", "/results", false},
	})
}

// TestComposeRehearsal plays docker-compose.yml's init steps and server
// configuration on this machine, without Docker: stepca-init's script and a
// real step-ca, sds-server with the compose file's SDS_* environment (its
// container paths mapped to directories, its addresses to loopback ports),
// then every sidecar's init step (join.sh, with the compose file's
// arguments). Each bootstrap it writes must pass `envoy --mode validate`:
// the compose sidecars run the same generator the other e2e tests run.
func TestComposeRehearsal(t *testing.T) {
	bin := tool(t, "SDS_SERVER_BIN", "bin/sds-server")
	envoyBin := tool(t, "SDS_ENVOY_BIN", ".tools/bin/envoy")
	stepBin := tool(t, "SDS_STEPCA_BIN", ".tools/bin/step-ca")
	c, root := loadCompose(t)
	dir := t.TempDir()

	// The init image's PATH: sds-server, stepcainit, busybox sh.
	binDir := filepath.Join(dir, "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(bin, filepath.Join(binDir, "sds-server")); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(binDir, "stepcainit"), "./e2e/stepcainit")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./e2e/stepcainit: %v\n%s", err, out)
	}
	scripts := dockerfileCopies(t, filepath.Join(root, "Dockerfile"))

	// Named volumes become directories; a service's container paths map
	// through its volume list.
	volumeDir := func(name string) string {
		p := filepath.Join(dir, "volumes", name)
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hostPath := func(svc, p string) string {
		for _, v := range c.Services[svc].Volumes {
			parts := strings.Split(v, ":")
			if rest, ok := strings.CutPrefix(p, parts[1]); ok && (rest == "" || strings.HasPrefix(rest, "/")) {
				src := parts[0]
				if strings.HasPrefix(src, ".") {
					return filepath.Join(root, src) + rest
				}
				return volumeDir(src) + rest
			}
		}
		return p
	}
	script := func(svc string) (string, []string) {
		s := c.Services[svc]
		if len(s.Command) == 0 {
			t.Fatalf("service %s: no command", svc)
		}
		src, ok := scripts[s.Command[0]]
		if !ok {
			t.Fatalf("service %s: %s is not copied into the image by the Dockerfile", svc, s.Command[0])
		}
		return filepath.Join(root, src), s.Command[1:]
	}
	env := func(kv ...string) []string {
		var e []string
		for _, v := range os.Environ() {
			if !strings.HasPrefix(v, "SDS_") && !strings.HasPrefix(v, "STEPCA_") && !strings.HasPrefix(v, "PATH=") {
				e = append(e, v)
			}
		}
		return append(append(e, "PATH="+binDir+":"+os.Getenv("PATH")), kv...)
	}
	runScript := func(svc string, kv ...string) string {
		t.Helper()
		path, args := script(svc)
		cmd := exec.Command("sh", append([]string{path}, args...)...)
		cmd.Env = env(kv...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s (%s %s): %v\n%s", svc, path, strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	// stepca-init, then step-ca on a loopback port instead of step-ca:9000.
	si := c.Services["stepca-init"].Environment
	caPort := freePort(t)
	stepDir, caDir := hostPath("stepca-init", si["STEPCA_DIR"]), hostPath("stepca-init", si["SDS_CA_DIR"])
	runScript("stepca-init", "STEPCA_DIR="+stepDir, "SDS_CA_DIR="+caDir, fmt.Sprintf("STEPCA_ADDRESS=127.0.0.1:%d", caPort))
	ca := &stepCA{CA: &stepcainit.CA{
		ConfigFile:   filepath.Join(stepDir, "config", "ca.json"),
		PasswordFile: filepath.Join(stepDir, "secrets", "password"),
		RootFile:     filepath.Join(stepDir, "certs", "root_ca.crt"),
		URL:          fmt.Sprintf("https://127.0.0.1:%d", caPort),
	}, bin: stepBin}
	if got := c.Services["step-ca"].Command; !slices.Equal(got, []string{"step-ca", "--password-file", si["STEPCA_DIR"] + "/secrets/password", si["STEPCA_DIR"] + "/config/ca.json"}) {
		t.Errorf("step-ca command %q does not run what stepca-init wrote", got)
	}
	ca.start(t)

	// sds-server with the compose environment.
	var kv []string
	for k, v := range c.Services["sds-server"].Environment {
		switch k {
		case "SDS_LISTEN_ADDR":
			v = "127.0.0.1:0"
		case "SDS_METRICS_ADDR":
			v = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		case "SDS_CA_URL":
			if v != "https://"+si["STEPCA_ADDRESS"] {
				t.Errorf("SDS_CA_URL %q is not step-ca's address %s", v, si["STEPCA_ADDRESS"])
			}
			v = ca.URL
		default:
			if strings.HasPrefix(v, "/") {
				v = hostPath("sds-server", v)
			}
		}
		kv = append(kv, k+"="+v)
	}
	cmd := exec.Command(bin, c.Services["sds-server"].Command...)
	cmd.Env, cmd.Dir = env(kv...), dir
	srv := start(t, "sds-server", cmd)
	var addr string
	eventually(t, 30*time.Second, "sds-server listening", func() error {
		if !srv.alive() {
			t.Fatalf("sds-server exited:\n%s", srv.out.String())
		}
		m := listenRE.FindStringSubmatch(srv.out.String())
		if m == nil {
			return fmt.Errorf("no listen line yet")
		}
		addr = m[1]
		return nil
	})
	if !strings.Contains(srv.out.String(), "step-ca at "+ca.URL) {
		t.Errorf("sds-server does not report step-ca as its CA:\n%s", srv.out.String())
	}

	// Every sidecar's init step, then Envoy's own check of its bootstrap.
	n := 0
	for name, s := range c.Services {
		if len(s.Command) == 0 || scripts[s.Command[0]] != "examples/emojivoto/compose/join.sh" {
			continue
		}
		n++
		svc := s.Command[1]
		bootDir := hostPath(name, s.Environment["SDS_BOOTSTRAP_DIR"])
		out := runScript(name, "SDS_SERVER="+addr, "SDS_ADMIN_SOCKET="+hostPath(name, s.Environment["SDS_ADMIN_SOCKET"]),
			"SDS_BOOTSTRAP_DIR="+bootDir, "SDS_JOIN_TRIES=5")
		if strings.Contains(out, "SDSTKN-") {
			t.Errorf("%s printed a token: %s", name, out)
		}
		cfg := filepath.Join(bootDir, svc+".yaml")
		fi, err := os.Stat(cfg)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", cfg, fi.Mode().Perm())
		}
		if vout, err := exec.Command(envoyBin, "--mode", "validate", "-c", cfg).CombinedOutput(); err != nil {
			t.Errorf("envoy --mode validate %s (%s): %v\n%s", cfg, name, err, tail(string(vout), 20))
		}
		// The sidecar that mounts this volume runs this file.
		sidecar := c.Services[strings.TrimSuffix(name, "-init")+"-sidecar"]
		if !slices.Equal(sidecar.Command, []string{"envoy", "-c", s.Environment["SDS_BOOTSTRAP_DIR"] + "/" + svc + ".yaml"}) {
			t.Errorf("%s-sidecar runs %q, not the bootstrap %s writes", strings.TrimSuffix(name, "-init"), sidecar.Command, name)
		}
	}
	if n != 4 {
		t.Errorf("%d sidecar init steps, want 4 (web, emoji, voting, vote-bot)", n)
	}
}

// dockerfileCopies maps the image paths the Dockerfile COPYs repository
// files to, to those files.
func dockerfileCopies(t *testing.T, path string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, st := range parseDockerfile(t, path) {
		for _, l := range st.lines {
			f := strings.Fields(l)
			if strings.EqualFold(f[0], "COPY") && len(f) == 3 {
				out[f[2]] = f[1]
			}
		}
	}
	return out
}
