package authz

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
)

func TestParseFormats(t *testing.T) {
	want := ACL{
		{Permission: Permission{Method: "GET", Resource: "/user"}, Allow: []string{"web", "fulfillment", "payments"}},
		{Permission: Permission{Method: "*", Resource: "/admin/.*"}, Allow: []string{"staging/web", "*"}},
	}
	inputs := map[string]string{
		"prod/users.json": `[ { "permission": { "method": "GET", "resource": "/user" },
    "allow": [ "web", "fulfillment", "payments" ] },
  { "permission": { "method": "*", "resource": "/admin/.*" },
    "allow": [ "staging/web", "*" ] } ]`,
		"prod/users.yaml": `
- permission: {method: GET, resource: /user}
  allow: [web, fulfillment, payments]
- permission:
    method: "*"
    resource: /admin/.*
  allow: [staging/web, "*"]
`,
		"prod/users.yml":  "- {permission: {method: GET, resource: /user}, allow: [web, fulfillment, payments]}\n- {permission: {method: '*', resource: /admin/.*}, allow: [staging/web, '*']}\n",
		"bom/users.json":  "\xef\xbb\xbf" + `[{"permission":{"method":"GET","resource":"/user"},"allow":["web","fulfillment","payments"]},{"permission":{"method":"*","resource":"/admin/.*"},"allow":["staging/web","*"]}]`,
		"empty/list.json": `[]`,
		"empty/list.yaml": `[]`,
	}
	for file, in := range inputs {
		got, err := Parse([]byte(in), file)
		if err != nil {
			t.Errorf("Parse(%s): %v", file, err)
			continue
		}
		w := want
		if file == "empty/list.json" || file == "empty/list.yaml" {
			w = ACL{}
		}
		if !reflect.DeepEqual(got, w) {
			t.Errorf("Parse(%s) = %+v, want %+v", file, got, w)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, file, in, want string
	}{
		{"extension", "prod/web.txt", `[]`,
			"prod/web.txt: unsupported file extension: use .json, .yaml or .yml"},
		{"empty file", "prod/web.json", " \n",
			"prod/web.json: file is empty; write [] for an ACL that allows nothing"},
		{"bad JSON", "prod/web.json", "[\n  {\"permission\": {\"method\": \"GET\",}}\n]",
			"prod/web.json:2:35: invalid JSON: invalid character '}' looking for beginning of object key string"},
		{"truncated JSON", "prod/web.json", `[{"permission": {`,
			"prod/web.json:1:18: invalid JSON: unexpected end of JSON input"},
		{"trailing data", "prod/web.json", "[]\n]",
			"prod/web.json:2:1: invalid JSON: invalid character ']' after top-level value"},
		{"object at top level", "prod/web.json", `{"entries": []}`,
			"prod/web.json:1:1: the top level must be a list of entries, not an object"},
		{"null at top level", "prod/web.json", `null`,
			"prod/web.json:1:1: the top level is null; write [] for an ACL that allows nothing"},
		{"string at top level", "prod/web.json", ` "x"`,
			"prod/web.json:1:2: the top level must be a list of entries, not a string"},
		{"unknown top-level field", "prod/web.json",
			`[{"permission": {"method": "GET", "resource": "/"}, "allow": ["web"], "deny": ["db"]}]`,
			`prod/web.json:1:2: entry 1: unknown field "deny" (want "permission" and "allow")`},
		{"unknown nested field", "prod/web.json",
			"[\n {\"permission\": {\"method\": \"GET\", \"resource\": \"/\"}, \"allow\": [\"web\"]},\n {\"permission\": {\"methd\": \"GET\", \"resource\": \"/\"}, \"allow\": [\"web\"]}\n]",
			`prod/web.json:3:2: entry 2: unknown field "methd" in permission (want "method" and "resource")`},
		{"field case", "prod/web.json", `[{"Permission": {"method": "GET", "resource": "/"}, "allow": ["web"]}]`,
			`prod/web.json:1:2: entry 1: unknown field "Permission" (want "permission" and "allow")`},
		{"duplicate field", "prod/web.json", `[{"permission": {"method": "GET", "method": "PUT", "resource": "/"}, "allow": ["web"]}]`,
			`prod/web.json:1:2: entry 1: duplicate field "method" in permission`},
		{"wrong type", "prod/web.json", `[{"permission": {"method": "GET", "resource": "/"}, "allow": "web"}]`,
			`prod/web.json:1:2: entry 1: "allow": got a string, want a list of strings`},
		{"wrong nested type", "prod/web.json", `[{"permission": {"method": 1, "resource": "/"}, "allow": ["web"]}]`,
			`prod/web.json:1:2: entry 1: "permission.method": got a number, want a string`},
		{"entry not an object", "prod/web.json", `[["GET", "/"]]`,
			`prod/web.json:1:2: entry 1: the entry: got a list, want an object`},
		{"YAML unknown top-level field", "prod/web.yaml",
			"- permission: {method: GET, resource: /}\n  allow: [web]\n  deny: [db]\n",
			`prod/web.yaml:entry 1: unknown field "deny" (want "permission" and "allow")`},
		{"YAML unknown nested field", "prod/web.yaml",
			"- permission: {method: GET, resource: /}\n  allow: [web]\n- permission: {method: GET, path: /}\n  allow: [web]\n",
			`prod/web.yaml:entry 2: unknown field "path" in permission (want "method" and "resource")`},
		{"YAML object at top level", "prod/web.yaml", "entries: []\n",
			"prod/web.yaml: the top level must be a list of entries, not an object"},
		{"YAML duplicate key", "prod/web.yaml", "- permission: {method: GET, resource: /}\n  allow: [web]\n  allow: [db]\n",
			`prod/web.yaml: invalid YAML: yaml: unmarshal errors: line 3: key "allow" already set in map`},
		{"YAML bare star", "prod/web.yaml", "- permission: {method: *, resource: /}\n  allow: [web]\n",
			`prod/web.yaml: invalid YAML: yaml: did not find expected alphabetic or numeric character (a bare * starts an alias: write "*")`},
		{"YAML 1.1 boolean", "prod/web.yaml", "- permission: {method: GET, resource: /}\n  allow: [no]\n",
			`prod/web.yaml:entry 1: "allow": got a boolean (in YAML, quote yes, no, on, off), want a string`},
		{"YAML syntax", "prod/web.yaml", "- permission: {method: GET\n",
			"prod/web.yaml: invalid YAML: yaml: line 1: did not find expected ',' or '}'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			acl, err := Parse([]byte(tc.in), tc.file)
			if err == nil {
				t.Fatalf("Parse = %+v, want error %q", acl, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("Parse error\n got: %s\nwant: %s", err, tc.want)
			}
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Errorf("error %T is not a *ParseError", err)
			}
		})
	}
}

func TestParseErrorWraps(t *testing.T) {
	_, err := Parse([]byte(`[1,]`), "x.json")
	var se *json.SyntaxError
	if !errors.As(err, &se) {
		t.Errorf("Parse error %v does not wrap the *json.SyntaxError", err)
	}
	_, err = Parse([]byte(`[{"permission": [], "allow": []}]`), "x.json")
	var te *json.UnmarshalTypeError
	if !errors.As(err, &te) {
		t.Errorf("Parse error %v does not wrap the *json.UnmarshalTypeError", err)
	}
}
