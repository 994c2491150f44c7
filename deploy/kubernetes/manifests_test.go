package kubernetes

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/meshid/sds-server/authz"
)

const namespace = "sds-server"

// manifests is every object of the directory, decoded strictly.
type manifests struct {
	namespaces      []*corev1.Namespace
	serviceAccounts map[string]*corev1.ServiceAccount
	configMaps      map[string]*corev1.ConfigMap
	services        map[string]*corev1.Service
	statefulSets    map[string]*appsv1.StatefulSet
	files           []string
}

// docSep splits a multi-document YAML file.
var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// blank reports whether a YAML document holds only comments and space.
func blank(doc []byte) bool {
	for _, l := range strings.Split(string(doc), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// decodeStrict decodes one document into a typed object: unknown fields,
// duplicate fields and type mismatches are errors.
func decodeStrict(doc []byte) (any, error) {
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	var obj any
	switch tm.APIVersion + " " + tm.Kind {
	case "v1 Namespace":
		obj = &corev1.Namespace{}
	case "v1 ServiceAccount":
		obj = &corev1.ServiceAccount{}
	case "v1 ConfigMap":
		obj = &corev1.ConfigMap{}
	case "v1 Service":
		obj = &corev1.Service{}
	case "apps/v1 StatefulSet":
		obj = &appsv1.StatefulSet{}
	default:
		return nil, fmt.Errorf("apiVersion %q kind %q: not a type this test knows; add it to decodeStrict", tm.APIVersion, tm.Kind)
	}
	// As the API server decodes: YAML to JSON (duplicate keys are errors),
	// then case-sensitive JSON with unknown fields refused. encoding/json
	// alone would match "runAsNonroot" to runAsNonRoot.
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	strict, err := k8sjson.UnmarshalStrict(j, obj, k8sjson.DisallowUnknownFields)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	if err := errors.Join(strict...); err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	return obj, nil
}

func load(t *testing.T) *manifests {
	t.Helper()
	m := &manifests{
		serviceAccounts: map[string]*corev1.ServiceAccount{}, configMaps: map[string]*corev1.ConfigMap{},
		services: map[string]*corev1.Service{}, statefulSets: map[string]*appsv1.StatefulSet{},
	}
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f == "kustomization.yaml" {
			continue
		}
		m.files = append(m.files, f)
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSep.Split(string(b), -1) {
			if blank([]byte(doc)) {
				continue
			}
			obj, err := decodeStrict([]byte(doc))
			if err != nil {
				t.Errorf("%s, document %d: %v", f, i+1, err)
				continue
			}
			m.add(t, f, obj)
		}
	}
	return m
}

func (m *manifests) add(t *testing.T, file string, obj any) {
	t.Helper()
	switch o := obj.(type) {
	case *corev1.Namespace:
		if o.Name == "" {
			t.Errorf("%s: a Namespace without a name", file)
		}
		m.namespaces = append(m.namespaces, o)
	case *corev1.ServiceAccount:
		put(t, m.serviceAccounts, file, "ServiceAccount", o.ObjectMeta, o)
	case *corev1.ConfigMap:
		put(t, m.configMaps, file, "ConfigMap", o.ObjectMeta, o)
	case *corev1.Service:
		put(t, m.services, file, "Service", o.ObjectMeta, o)
	case *appsv1.StatefulSet:
		put(t, m.statefulSets, file, "StatefulSet", o.ObjectMeta, o)
	}
}

// put files a namespaced object by name, checking it has a name, is in the
// server's namespace and is defined once.
func put[T any](t *testing.T, into map[string]T, file, kind string, meta metav1.ObjectMeta, obj T) {
	t.Helper()
	switch _, dup := into[meta.Name]; {
	case meta.Name == "":
		t.Errorf("%s: a %s without a name", file, kind)
	case dup:
		t.Errorf("%s: %s %s defined twice", file, kind, meta.Name)
	case meta.Namespace != namespace:
		t.Errorf("%s: %s %s in namespace %q, want %q", file, kind, meta.Name, meta.Namespace, namespace)
	}
	into[meta.Name] = obj
}

// server returns the sds-server StatefulSet and its container.
func (m *manifests) server(t *testing.T) (*appsv1.StatefulSet, *corev1.Container) {
	t.Helper()
	ss, ok := m.statefulSets["sds-server"]
	if !ok {
		t.Fatal("no StatefulSet sds-server")
	}
	for i := range ss.Spec.Template.Spec.Containers {
		if c := &ss.Spec.Template.Spec.Containers[i]; c.Name == "sds-server" {
			return ss, c
		}
	}
	t.Fatal("StatefulSet sds-server has no container sds-server")
	return nil, nil
}

func TestDecodeStrict(t *testing.T) {
	// The decoder must refuse what the API server would drop silently.
	bad := []struct{ name, doc, want string }{
		{"unknown field", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndatta: {}\n", `unknown field "datta"`},
		{"misplaced field", "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: x}\nspec: {replica: 1}\n", `unknown field "spec.replica"`},
		{"duplicate field", "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\nmetadata: {name: y}\n", `key "metadata" already set`},
		{"field in the wrong case", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\nautomountServiceaccountToken: false\n", `unknown field "automountServiceaccountToken"`},
		{"wrong type", "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: x}\nspec: {replicas: one}\n", "replicas"},
		{"unknown kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", `kind "Pod"`},
	}
	for _, b := range bad {
		t.Run(b.name, func(t *testing.T) {
			_, err := decodeStrict([]byte(b.doc))
			if err == nil || !strings.Contains(err.Error(), b.want) {
				t.Errorf("error %v, want one saying %q", err, b.want)
			}
		})
	}
}

func TestManifestsDecode(t *testing.T) {
	m := load(t)
	if len(m.namespaces) != 1 || m.namespaces[0].Name != namespace {
		t.Errorf("namespaces %v, want one %q", m.namespaces, namespace)
	}
	for kind, n := range map[string]int{"ServiceAccount": len(m.serviceAccounts), "ConfigMap": len(m.configMaps), "Service": len(m.services), "StatefulSet": len(m.statefulSets)} {
		if n == 0 {
			t.Errorf("no %s", kind)
		}
	}
}

// TestKustomization checks that kustomization.yaml lists every manifest
// file, once, and nothing else.
func TestKustomization(t *testing.T) {
	m := load(t)
	b, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
	}
	if err := yaml.UnmarshalStrict(b, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if k.Kind != "Kustomization" || k.APIVersion != "kustomize.config.k8s.io/v1beta1" {
		t.Errorf("kustomization.yaml: %s %s", k.APIVersion, k.Kind)
	}
	got := slices.Clone(k.Resources)
	sort.Strings(got)
	if !slices.Equal(got, m.files) {
		t.Errorf("kustomization resources %v, want the manifest files %v", got, m.files)
	}
	// The namespace first, so `kubectl apply -f` of the list in order works too.
	if len(k.Resources) == 0 || k.Resources[0] != "namespace.yaml" {
		t.Errorf("resources %v do not start with namespace.yaml", k.Resources)
	}
}

func subset(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// TestReferences checks that what refers to something by name finds it:
// selectors and labels, the governing Service, the ServiceAccount, Service
// target ports, volumes and their ConfigMaps and keys, probe ports.
func TestReferences(t *testing.T) {
	m := load(t)
	ss, c := m.server(t)
	pod := ss.Spec.Template
	if ss.Spec.Replicas == nil || *ss.Spec.Replicas != 1 {
		t.Errorf("replicas %v, want 1 (the state is a single-writer bbolt file)", ss.Spec.Replicas)
	}
	if ss.Spec.Selector == nil || !subset(ss.Spec.Selector.MatchLabels, pod.Labels) {
		t.Errorf("StatefulSet selector %v does not select its pod template labels %v", ss.Spec.Selector, pod.Labels)
	}
	if _, ok := m.services[ss.Spec.ServiceName]; !ok {
		t.Errorf("serviceName %q: no such Service", ss.Spec.ServiceName)
	}
	if _, ok := m.serviceAccounts[pod.Spec.ServiceAccountName]; !ok {
		t.Errorf("serviceAccountName %q: no such ServiceAccount", pod.Spec.ServiceAccountName)
	}

	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	portOK := func(p intOrString) bool {
		if p.name != "" {
			_, ok := ports[p.name]
			return ok
		}
		return slices.Contains(mapsValues(ports), p.num)
	}
	for name, svc := range m.services {
		if !subset(svc.Spec.Selector, pod.Labels) {
			t.Errorf("Service %s selector %v does not select the pod (labels %v)", name, svc.Spec.Selector, pod.Labels)
		}
		for _, p := range svc.Spec.Ports {
			tp := intOrString{name: p.TargetPort.StrVal, num: p.TargetPort.IntVal}
			if !portOK(tp) {
				t.Errorf("Service %s port %s: targetPort %v is no container port (%v)", name, p.Name, p.TargetPort.String(), ports)
			}
		}
	}
	if svc, ok := m.services["sds-server"]; ok && !svc.Spec.PublishNotReadyAddresses {
		t.Error("Service sds-server: want publishNotReadyAddresses: true (a not-ready single server must stay reachable for renewals)")
	}
	for _, want := range []struct{ svc, port string }{{"sds-server", "sds"}, {"sds-server-metrics", "metrics"}} {
		svc, ok := m.services[want.svc]
		if !ok || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.StrVal != want.port {
			t.Errorf("want Service %s with one port to the container port %q", want.svc, want.port)
		}
	}

	for what, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s probe: want an httpGet probe", what)
			continue
		}
		if p.HTTPGet.Port.StrVal != "metrics" || !portOK(intOrString{name: p.HTTPGet.Port.StrVal}) {
			t.Errorf("%s probe port %v, want the container port named metrics", what, p.HTTPGet.Port.String())
		}
	}
	if c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil && c.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Errorf("liveness probe path %q, want /healthz", c.LivenessProbe.HTTPGet.Path)
	}
	if c.ReadinessProbe != nil && c.ReadinessProbe.HTTPGet != nil && c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("readiness probe path %q, want /readyz", c.ReadinessProbe.HTTPGet.Path)
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		volumes[v.Name] = v
		if cm := v.ConfigMap; cm != nil {
			data, ok := m.configMaps[cm.Name]
			if !ok {
				t.Errorf("volume %s: no ConfigMap %q", v.Name, cm.Name)
				continue
			}
			for _, it := range cm.Items {
				if _, ok := data.Data[it.Key]; !ok {
					t.Errorf("volume %s: ConfigMap %s has no key %q", v.Name, cm.Name, it.Key)
				}
			}
		}
	}
	claims := map[string]bool{}
	for _, pvc := range ss.Spec.VolumeClaimTemplates {
		claims[pvc.Name] = true
		if _, clash := volumes[pvc.Name]; clash {
			t.Errorf("volume %s is both a pod volume and a claim template", pvc.Name)
		}
	}
	mounted := map[string]bool{}
	for _, vm := range c.VolumeMounts {
		mounted[vm.Name] = true
		if _, ok := volumes[vm.Name]; !ok && !claims[vm.Name] {
			t.Errorf("volumeMount %s: no such volume or claim template", vm.Name)
		}
	}
	for name := range volumes {
		if !mounted[name] {
			t.Errorf("volume %s is mounted nowhere", name)
		}
	}
	for name := range claims {
		if !mounted[name] {
			t.Errorf("claim template %s is mounted nowhere", name)
		}
	}
}

type intOrString struct {
	name string
	num  int32
}

func mapsValues(m map[string]int32) []int32 {
	var out []int32
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// mountOf returns the mount path of the volume name in c.
func mountOf(c *corev1.Container, name string) (corev1.VolumeMount, bool) {
	for _, vm := range c.VolumeMounts {
		if vm.Name == name {
			return vm, true
		}
	}
	return corev1.VolumeMount{}, false
}

func envOf(c *corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value, true
		}
	}
	return "", false
}

// serverConfig is the part of config.yaml the manifests depend on.
type serverConfig struct {
	DataDir     string   `json:"data_dir"`
	ListenAddr  string   `json:"listen_addr"`
	MetricsAddr string   `json:"metrics_addr"`
	PolicyDir   string   `json:"policy_dir"`
	ServerNames []string `json:"server_names"`
}

// TestServerConfigMatchesPod checks config.yaml against the pod: the
// --config path is the mounted file, the listen and metrics ports are the
// container ports (metrics on all addresses, for the kubelet's probes), the
// data dir is a subdirectory of the data volume, each policy ConfigMap is
// mounted as an environment directory of policy_dir, and the server's
// certificate names the Service.
func TestServerConfigMatchesPod(t *testing.T) {
	m := load(t)
	ss, c := m.server(t)
	cfgMount, ok := mountOf(c, "config")
	if !ok {
		t.Fatal("no config volume mounted")
	}
	if !slices.Equal(c.Args, []string{"serve", "--config", cfgMount.MountPath}) {
		t.Errorf("args %q, want serve --config %s", c.Args, cfgMount.MountPath)
	}
	var cmName, key string
	for _, v := range ss.Spec.Template.Spec.Volumes {
		if v.Name == "config" && v.ConfigMap != nil {
			cmName, key = v.ConfigMap.Name, cfgMount.SubPath
		}
	}
	text, ok := m.configMaps[cmName].Data[key]
	if !ok {
		t.Fatalf("config ConfigMap %q has no key %q", cmName, key)
	}
	var cfg serverConfig
	if err := yaml.Unmarshal([]byte(text), &cfg); err != nil {
		t.Fatalf("config.yaml in ConfigMap %s: %v", cmName, err)
	}

	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for _, a := range []struct{ key, addr, port string }{{"listen_addr", cfg.ListenAddr, "sds"}, {"metrics_addr", cfg.MetricsAddr, "metrics"}} {
		host, port, err := net.SplitHostPort(a.addr)
		if err != nil {
			t.Errorf("%s %q: %v", a.key, a.addr, err)
			continue
		}
		if n, _ := strconv.Atoi(port); int32(n) != ports[a.port] {
			t.Errorf("%s port %s, want the container port %s (%d)", a.key, port, a.port, ports[a.port])
		}
		if host != "0.0.0.0" {
			t.Errorf("%s host %s: other pods and the kubelet could not reach it", a.key, host)
		}
	}

	if cfg.DataDir != "" {
		t.Errorf("config.yaml sets data_dir %q, which the image's SDS_DATA_DIR overrides: set SDS_DATA_DIR in the pod instead", cfg.DataDir)
	}
	dataDir, ok := envOf(c, "SDS_DATA_DIR")
	dataMount, mok := mountOf(c, "data")
	if !ok || !mok || filepath.Dir(dataDir) != dataMount.MountPath {
		t.Errorf("SDS_DATA_DIR %q (set: %v), want a direct subdirectory of the data volume's mount %q: serve must own its 0700 data dir, and the volume's root belongs to root", dataDir, ok, dataMount.MountPath)
	}
	if dataMount.ReadOnly || dataMount.SubPath != "" {
		t.Errorf("data volume mount %+v: want read-write, no subPath", dataMount)
	}

	policyMounts := 0
	for _, v := range ss.Spec.Template.Spec.Volumes {
		if v.ConfigMap == nil || !strings.HasPrefix(v.ConfigMap.Name, "sds-server-policies-") {
			continue
		}
		policyMounts++
		env := strings.TrimPrefix(v.ConfigMap.Name, "sds-server-policies-")
		vm, ok := mountOf(c, v.Name)
		if !ok || vm.MountPath != filepath.Join(cfg.PolicyDir, env) || vm.SubPath != "" || !vm.ReadOnly {
			t.Errorf("policy ConfigMap %s: mount %+v, want %s read-only, without subPath (kubelet updates would not reach it)", v.ConfigMap.Name, vm, filepath.Join(cfg.PolicyDir, env))
		}
	}
	for name := range m.configMaps {
		if strings.HasPrefix(name, "sds-server-policies-") && policyMounts == 0 {
			t.Errorf("policy ConfigMap %s is not mounted", name)
		}
	}
	if policyMounts == 0 {
		t.Error("no policy ConfigMap mounted")
	}

	for _, svc := range m.services {
		if svc.Spec.Ports[0].TargetPort.StrVal != "sds" {
			continue
		}
		want := svc.Name + "." + svc.Namespace + ".svc"
		if !slices.Contains(cfg.ServerNames, want) {
			t.Errorf("server_names %v lack %s: sidecars using the Service name would refuse the server's certificate", cfg.ServerNames, want)
		}
	}
}

// TestPodSecurity checks the lock-down the README promises: non-root, a
// read-only root filesystem, no capability, no privilege escalation,
// RuntimeDefault seccomp, no service account token.
func TestPodSecurity(t *testing.T) {
	m := load(t)
	ss, c := m.server(t)
	pod := ss.Spec.Template.Spec
	psc, sc := pod.SecurityContext, c.SecurityContext
	if psc == nil || sc == nil {
		t.Fatal("pod or container securityContext missing")
	}
	isTrue := func(b *bool) bool { return b != nil && *b }
	checks := []struct {
		what string
		ok   bool
	}{
		{"pod runAsNonRoot", isTrue(psc.RunAsNonRoot)},
		{"pod runAsUser set and not 0", psc.RunAsUser != nil && *psc.RunAsUser != 0},
		{"pod seccompProfile RuntimeDefault", psc.SeccompProfile != nil && psc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault},
		{"pod fsGroupChangePolicy OnRootMismatch", psc.FSGroupChangePolicy != nil && *psc.FSGroupChangePolicy == corev1.FSGroupChangeOnRootMismatch},
		{"container runAsNonRoot", isTrue(sc.RunAsNonRoot)},
		{"container readOnlyRootFilesystem", isTrue(sc.ReadOnlyRootFilesystem)},
		{"container allowPrivilegeEscalation false", sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation},
		{"container drops ALL capabilities, adds none", sc.Capabilities != nil && slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) && len(sc.Capabilities.Add) == 0},
		{"container seccompProfile RuntimeDefault", sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault},
		{"container not privileged", sc.Privileged == nil || !*sc.Privileged},
		{"pod automountServiceAccountToken false", pod.AutomountServiceAccountToken != nil && !*pod.AutomountServiceAccountToken},
		{"no host network, PID or IPC", !pod.HostNetwork && !pod.HostPID && !pod.HostIPC},
		{"memory limit", !c.Resources.Limits.Memory().IsZero()},
	}
	for _, ch := range checks {
		if !ch.ok {
			t.Errorf("%s: not so", ch.what)
		}
	}
	if sa, ok := m.serviceAccounts[pod.ServiceAccountName]; !ok || sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Errorf("ServiceAccount %s: want automountServiceAccountToken: false", pod.ServiceAccountName)
	}
	if ns := m.namespaces; len(ns) == 1 && ns[0].Labels["pod-security.kubernetes.io/enforce"] != "restricted" {
		t.Errorf("namespace does not enforce the restricted Pod Security Standard")
	}
}

// TestPolicyConfigMapsLoad lays each policy ConfigMap out as the kubelet
// mounts it (<policy_dir>/<env>/<key>) and loads it with the server's
// loader: every key must be a valid ACL.
func TestPolicyConfigMapsLoad(t *testing.T) {
	m := load(t)
	dir := t.TempDir()
	n := 0
	for name, cm := range m.configMaps {
		env, ok := strings.CutPrefix(name, "sds-server-policies-")
		if !ok {
			continue
		}
		if err := os.MkdirAll(filepath.Join(dir, env), 0o755); err != nil {
			t.Fatal(err)
		}
		for key, val := range cm.Data {
			if err := os.WriteFile(filepath.Join(dir, env, key), []byte(val), 0o644); err != nil {
				t.Fatal(err)
			}
			n++
		}
		if len(cm.BinaryData) != 0 {
			t.Errorf("ConfigMap %s has binaryData", name)
		}
	}
	if n == 0 {
		t.Fatal("no policy in any sds-server-policies-<env> ConfigMap")
	}
	d, err := authz.LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Err(); err != nil {
		t.Errorf("policies do not load: %v", err)
	}
	if len(d.Policies) != n {
		t.Errorf("%d policies loaded from %d keys", len(d.Policies), n)
	}
}

// TestNoTabs guards the YAML against tab indentation, which YAML forbids
// and some tools accept.
func TestNoTabs(t *testing.T) {
	files, _ := filepath.Glob("*.yaml")
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if i := bytes.IndexByte(b, '\t'); i >= 0 {
			t.Errorf("%s: tab at byte %d", f, i)
		}
	}
}
