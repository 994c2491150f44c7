package authz

import (
	"encoding/json"
	"errors"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"
)

// Fuzz targets of ACL loading and compiling. `go test` runs them on their
// seeds (f.Add and testdata/fuzz/<name>); `make fuzz` explores beyond them.

// fuzzDest is the destination every fuzzed ACL is compiled for.
var fuzzDest = Identity{TrustDomain: "mesh.local", Env: "prod", Service: "users"}

// aclSeeds are valid and invalid ACL files: JSON ones, then YAML ones.
var aclSeeds = struct{ json, yaml []string }{
	json: []string{
		`[]`,
		`[ { "permission": { "method": "GET", "resource": "/user/[0-9]+" }, "allow": [ "web", "staging/web" ] },
  { "permission": { "method": "*", "resource": "/healthz" }, "allow": [ "*" ] } ]`,
		`[{"permission":{"method":"POST","resource":"(?i)/orders(?:/[^/]+)*\\.json"},"allow":["web"]},` +
			`{"permission":{"method":"PUT","resource":"/files/[^/]+\\.(?:png|jpe?g|gif)"},"allow":["prod.eu/billing_v2"]}]`,
		"\xef\xbb\xbf" + `[{"permission":{"method":"DELETE","resource":"/x"},"allow":["web"]}]`,
		`[{"permission":{"method":"GET","resource":"/v1/orders/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/items/[0-9]+"},"allow":["web"]}]`,
		`[{"permission":{"method":"GET","resource":"/(?:(?:a{10}){10}){10}"},"allow":["web"]}]`,
		`[{"permission":{"method":"get","resource":"/"},"allow":["web","web","prod/web","*"]}]`,
		`[{"permission":{"method":"GET","resource":"/caf\u00e9"},"allow":["Web"]}]`,
		`[{"permission":{"method":"GET","resource":"/\\pL+"},"allow":["staging/*"]}]`,
		`[{"permission":{"method":"GET","resource":"/[\\x00-\\x{10FFFF}]"},"allow":["a/b/c"]}]`,
		`[{"permission":{"method":"GET","resource":"/(a)\\1"},"allow":[]}]`,
		`[{"permission":{"method":"GET","resource":"/"},"allow":["web"],"allow":["db"]}]`,
		`[{"permission":{"Method":"GET","resource":"/"},"allow":["web"]}]`,
		`[{"permission":{"method":"GET","resource":"/","path":"/"},"allow":["web"]}]`,
		`[{"permission":{"method":1,"resource":"/"},"allow":"web"}]`,
		`[{"permission":null,"allow":null}]`,
		`{"permission":{"method":"GET","resource":"/"},"allow":["web"]}`,
		`null`, `"x"`, `1`, `[1]`, `[[]]`, `[{}]`, ``, `  `, `[`, `[{"permission":{`, `[]]`,
	},
	yaml: []string{
		"[]",
		`
- permission: {method: GET, resource: /user}
  allow: [web, fulfillment, payments]
- permission:
    method: "*"
    resource: /admin/.*
  allow: [staging/web, "*"]
`,
		"- {permission: {method: GET, resource: /user}, allow: [web]}\n- {permission: {method: '*', resource: /admin/.*}, allow: ['*']}\n",
		"- permission: {method: *, resource: /}\n  allow: [web]\n",
		"- permission: {method: GET, resource: /}\n  allow: [no]\n",
		"- permission: {method: GET, resource: /}\n  allow: [web]\n  allow: [db]\n",
		"entries: []\n",
		"- permission: {method: GET\n",
		"- &a {permission: {method: GET, resource: /}, allow: [web]}\n- *a\n",
		"- permission: {method: GET, resource: !!binary aGVsbG8=}\n  allow: [web]\n",
		"--- []\n--- [x]\n",
		"~\n",
	},
}

// FuzzACL: an ACL file of any content, as JSON or YAML, never panics the
// loader; a file that loads (parses and validates, as LoadDir does) compiles
// to an RBAC config that passes the proto's ValidateAll, with one policy per
// entry and every resource a Go-compilable regex within the RE2 program
// budget; one that does not load does not compile either; and a loaded ACL
// survives a JSON round trip unchanged.
func FuzzACL(f *testing.F) {
	for _, s := range aclSeeds.json {
		f.Add([]byte(s), false)
	}
	for _, s := range aclSeeds.yaml {
		f.Add([]byte(s), true)
	}
	// Resources at the edges of what Validate accepts, in a valid entry.
	// (FuzzCheckResource and FuzzRE2ProgramSize fuzz the regex alone.)
	for _, res := range []string{
		"/", ".*", `/\x2f\Q*\E`, `/(?i:[a-z]+)`, `/(?i)[^a-z]`, `/\D\W\S.`, `^/a$`, `\A/a\z`,
		`/(?:a|b|c|ab|abc)+?`, `/a{2,5}?b{3,}c{0}`, `/(?s).`, `/(?U)a*`, `/[[:alpha:]]+`, `/[^\x00-\x7f]`,
		`/\b\B`, `/(?:)`, `|`, `()`, `/a{1000}`, `(?i)k`, `(?i)[k-s]`, `/\Q\E`, `/\Qabc`, `/\x{41}`, `/\x4`, `/\p{`,
	} {
		e, err := json.Marshal(ACL{{Permission: Permission{Method: AnyMethod, Resource: res}, Allow: []string{"web"}}})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(e, false)
	}
	f.Fuzz(func(t *testing.T, data []byte, asYAML bool) {
		file := "prod/users.json"
		if asYAML {
			file = "prod/users.yaml"
		}
		acl, err := Parse(data, file)
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) || !strings.HasPrefix(err.Error(), file) {
				t.Fatalf("Parse: %v (%T), want a *ParseError naming %s", err, err, file)
			}
			return
		}
		verr := acl.Validate(file, fuzzDest.Env)
		rbac, cerr := Compile(acl, fuzzDest)
		if verr != nil {
			var ve *ValidationError
			if !errors.As(verr, &ve) || len(ve.Problems) == 0 {
				t.Fatalf("Validate: %v (%T), want a *ValidationError with problems", verr, verr)
			}
			if cerr == nil {
				t.Fatalf("Compile accepted an ACL that Validate refuses (%v)", verr)
			}
			return
		}
		if cerr != nil {
			t.Fatalf("Compile refused a valid ACL: %v", cerr)
		}
		if err := rbac.ValidateAll(); err != nil {
			t.Fatalf("compiled RBAC fails ValidateAll: %v", err)
		}
		if _, err := TypedExtensionConfig(FilterName, rbac); err != nil {
			t.Fatalf("TypedExtensionConfig: %v", err)
		}
		if got := len(rbac.GetRules().GetPolicies()); got != len(acl) {
			t.Fatalf("compiled %d policies for %d entries", got, len(acl))
		}
		for _, e := range acl {
			checkAcceptedResource(t, e.Permission.Resource)
		}
		js, err := json.Marshal(acl)
		if err != nil {
			t.Fatalf("marshal a valid ACL: %v", err)
		}
		back, err := Parse(js, "prod/users.json")
		if err != nil || !reflect.DeepEqual(back, acl) {
			t.Fatalf("JSON round trip of %s: got %#v, %v; want %#v", js, back, err, acl)
		}
	})
}

// checkAcceptedResource fails unless res, accepted by Validate, is what
// Envoy takes: ASCII, Go/RE2 syntax, and an RE2 program within the budget.
func checkAcceptedResource(t *testing.T, res string) {
	t.Helper()
	for i := 0; i < len(res); i++ {
		if res[i] >= utf8.RuneSelf || res[i] < ' ' || res[i] == 0x7f {
			t.Fatalf("accepted resource %q has byte %#x", res, res[i])
		}
	}
	if len(res) == 0 || len(res) > MaxResourceLen {
		t.Fatalf("accepted resource %q of %d bytes", res, len(res))
	}
	if _, err := regexp.Compile(res); err != nil {
		t.Fatalf("accepted resource %q does not compile: %v", res, err)
	}
	size, err := re2ProgramSize(res)
	if err != nil || size > RegexProgramBudget || size < 1 {
		t.Fatalf("accepted resource %q: RE2 program size %d, %v; want 1..%d", res, size, err, RegexProgramBudget)
	}
}
