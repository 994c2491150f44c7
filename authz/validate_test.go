package authz

import (
	"errors"
	"strings"
	"testing"
)

func entry(method, resource string, allow ...string) Entry {
	return Entry{Permission: Permission{Method: method, Resource: resource}, Allow: allow}
}

func TestValidateAccepts(t *testing.T) {
	acl := ACL{
		entry("GET", "/user", "web", "fulfillment", "payments"),
		entry("*", ".*", "*"),
		entry("DELETE", "/user/[0-9]+", "staging/web", "prod.eu/billing_v2"),
		entry("POST", `(?i)/orders(?:/[^/]+)*\.json`, "web"),
		entry("PUT", `/files/[^/]+\.(?:png|jpe?g|gif)`, "web"),
		entry("PATCH", `/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}`, "web"),
		entry("HEAD", `/\x2f\Q*\E`, "web"),
		entry("OPTIONS", `/(?i:[a-z]+)`, "web"),
		entry("CONNECT", `/(?i)[^a-z]`, "web"),
		entry("TRACE", `/\D\W\S.`, "web"),
	}
	for _, m := range methods {
		acl = append(acl, entry(m, "/", "web"))
	}
	if err := acl.Validate("prod/users.json", "prod"); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	if err := (ACL{}).Validate("prod/users.json", "prod"); err != nil {
		t.Fatalf("Validate(empty): %v", err)
	}
}

func TestValidateRejects(t *testing.T) {
	const nameRule = `use 1-63 lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit`
	for _, tc := range []struct {
		name string
		e    Entry
		want string // the one problem, after "prod/users.json:entry 1: "
	}{
		{"unknown method", entry("FETCH", "/", "web"),
			`method "FETCH" is not one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE or "*"`},
		{"lower-case method", entry("get", "/", "web"),
			`method "get" must be upper case: "GET"`},
		{"missing method", entry("", "/", "web"),
			`method is missing (use "*" for any method)`},
		{"empty resource", entry("GET", "", "web"),
			`resource is empty (use ".*" for any path)`},
		{"unbalanced paren", entry("GET", "/user(", "web"),
			"resource \"/user(\" is not a valid regular expression: missing closing ): `/user(`"},
		{"unbalanced bracket", entry("GET", "/user/[0-9", "web"),
			"resource \"/user/[0-9\" is not a valid regular expression: missing closing ]: `[0-9`"},
		{"stacked repeat", entry("GET", "/a**", "web"),
			"resource \"/a**\" is not a valid regular expression: invalid nested repetition operator: `**`"},
		{"backreference", entry("GET", `/(a)\1`, "web"),
			"resource \"/(a)\\\\1\" is not a valid regular expression: invalid escape sequence: `\\1`"},
		{"lookahead", entry("GET", `/(?=a)`, "web"),
			"resource \"/(?=a)\" is not a valid regular expression: invalid or unsupported Perl syntax: `(?=`"},
		{"non-ASCII", entry("GET", "/café", "web"),
			`resource "/café" contains 'é', which is not ASCII: paths are matched percent-encoded, write %C3%A9`},
		{"non-ASCII escape", entry("GET", `/caf\x{e9}`, "web"),
			`resource "/caf\\x{e9}" escapes a non-ASCII character (\x{e9}): paths are matched percent-encoded`},
		{"non-ASCII class range", entry("GET", `/[\x00-\x{10FFFF}]`, "web"),
			`resource "/[\\x00-\\x{10FFFF}]" escapes a non-ASCII character (\x{10FFFF}): paths are matched percent-encoded`},
		{"Unicode class", entry("GET", `/\pL+`, "web"),
			`resource "/\\pL+" uses a Unicode class (\pL): paths are matched percent-encoded; use ASCII classes`},
		{"Unicode class by name", entry("GET", `/[\p{Greek}a]`, "web"),
			`resource "/[\\p{Greek}a]" uses a Unicode class (\p{Greek}): paths are matched percent-encoded; use ASCII classes`},
		{"non-ASCII range", entry("GET", `/[\x00-\x7f\200-\377]`, "web"),
			`resource "/[\\x00-\\x7f\\200-\\377]" matches non-ASCII characters (a Unicode class or a range beyond ASCII): paths are matched percent-encoded; use ASCII classes`},
		{"control character", entry("GET", "/a\tb", "web"),
			`resource "/a\tb" contains the control character '\t'`},
		{"too long", entry("GET", "/"+strings.Repeat("a", MaxResourceLen), "web"),
			"resource is longer than 1024 bytes"},
		{"over the budget", entry("GET", `/v1/orders/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/items/[0-9]+`, "web"),
			`resource "/v1/orders/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/items/[0-9]+" is too complex for Envoy: its RE2 program size is 92, above the budget of 90 (Envoy refuses more than 100); simplify it or split the entry`},
		{"nested repeats", entry("GET", `/(?:(?:a{10}){10}){10}`, "web"),
			`resource "/(?:(?:a{10}){10}){10}" is too complex for Envoy: its RE2 program size is 1005, above the budget of 90 (Envoy refuses more than 100); simplify it or split the entry`},
		{"far too complex", entry("GET", strings.Repeat(`(?:(?:[acegikmoqsuwy]{10}){10}){10}`, 20), "web"),
			`resource "` + strings.Repeat(`(?:(?:[acegikmoqsuwy]{10}){10}){10}`, 20) + `" is too complex for Envoy: its RE2 program would be far above the limit of 100`},
		{"empty allow", entry("GET", "/"),
			"allow is empty: the entry would allow nothing (remove it instead)"},
		{"bad service", entry("GET", "/", "Web"),
			`allow "Web": invalid service "Web": ` + nameRule},
		{"empty service", entry("GET", "/", ""),
			`allow "": invalid service "": ` + nameRule},
		{"bad environment", entry("GET", "/", "Prod/web"),
			`allow "Prod/web": invalid environment "Prod": ` + nameRule},
		{"bad qualified service", entry("GET", "/", "prod/-web"),
			`allow "prod/-web": invalid service "-web": ` + nameRule},
		{"too many slashes", entry("GET", "/", "a/b/c"),
			`allow "a/b/c": use "service", "env/service" or "*"`},
		{"whole environment", entry("GET", "/", "staging/*"),
			`allow "staging/*": a whole environment cannot be allowed; list its services, or use "*" for every workload`},
		{"duplicate caller", entry("GET", "/", "web", "db", "web"),
			`allow lists "web" twice`},
		{"same caller two ways", entry("GET", "/", "web", "prod/web"),
			`allow lists "web" and "prod/web", the same caller in environment "prod"`},
		{"star and more", entry("GET", "/", "*", "web"),
			`allow lists "*", which already allows every workload, with other callers`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ACL{tc.e}.Validate("prod/users.json", "prod")
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("Validate = %v, want a *ValidationError", err)
			}
			want := "prod/users.json:entry 1: " + tc.want
			if err.Error() != want {
				t.Errorf("Validate\n got: %s\nwant: %s", err, want)
			}
		})
	}
}

func TestValidateListsEveryProblem(t *testing.T) {
	acl := ACL{
		entry("GET", "/ok", "web"),
		entry("get", "(", "Web", "web", "web"),
		entry("POST", "/ok"),
	}
	err := acl.Validate("prod/users.yaml", "")
	want := strings.Join([]string{
		`prod/users.yaml:entry 2: method "get" must be upper case: "GET"`,
		"prod/users.yaml:entry 2: resource \"(\" is not a valid regular expression: missing closing ): `(`",
		`prod/users.yaml:entry 2: allow "Web": invalid service "Web": use 1-63 lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit`,
		`prod/users.yaml:entry 2: allow lists "web" twice`,
		`prod/users.yaml:entry 3: allow is empty: the entry would allow nothing (remove it instead)`,
	}, "\n")
	if err == nil || err.Error() != want {
		t.Fatalf("Validate\n got: %v\nwant: %s", err, want)
	}
	var ve *ValidationError
	if !errors.As(err, &ve) || len(ve.Problems) != 5 || ve.Problems[4].Entry != 3 {
		t.Errorf("Problems = %+v", ve)
	}
	// Without the destination's environment, "web" and "prod/web" cannot be
	// known to be the same caller.
	if err := (ACL{entry("GET", "/", "web", "prod/web")}).Validate("x.json", ""); err != nil {
		t.Errorf("Validate without env: %v", err)
	}
}

// FuzzCheckResource: any text gets a verdict without panicking, and an
// accepted resource is an ASCII regex within the program size budget.
func FuzzCheckResource(f *testing.F) {
	for _, s := range []string{"/user", `/user/[0-9]+`, "/café", `\x{100}`, `\pL`, "(", `(?i)/a|/b{2,3}?`, `[^\s\S]`, `\Q.*\E`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, res string) {
		if checkResource(res) != "" {
			return
		}
		for i := 0; i < len(res); i++ {
			if res[i] >= 0x80 {
				t.Fatalf("accepted non-ASCII %q", res)
			}
		}
		if n, err := re2ProgramSize(res); err != nil || n > RegexProgramBudget {
			t.Fatalf("accepted %q of size %d, %v", res, n, err)
		}
	})
}
