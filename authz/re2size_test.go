package authz

import (
	"errors"
	"regexp/syntax"
	"strings"
	"testing"
)

// envoySizes are RE2 program sizes measured with Envoy 1.40 (default
// runtime, so Latin-1 mode), by running `envoy --mode validate` on a
// bootstrap whose RBAC filter holds each regex, with the runtime key
// re2.max_program_size.warn_level at 0 so that Envoy logs every size.
// TestEnvoyRegexCalibration re-measures a larger corpus when Envoy is there.
var envoySizes = []struct {
	re   string
	size int
}{
	{"a", 5},
	{"/user", 9},
	{"/user/[0-9]+", 12},
	{"/users/[^/]+", 14},
	{"/api/v[12]/items", 17},
	{".*", 6},
	{".+", 7},
	{"(?s).*", 6},
	{"/static/.*", 14},
	{"/static(?s).*", 13},
	{"[^/]", 6},
	{".", 6},
	{"\\d", 5},
	{"\\w+", 8},
	{"\\s", 7},
	{"[[:alpha:]]", 5},
	{"(?i)/admin", 10},
	{"(?i)k", 5},
	{"(?i)[a-z]+", 6},
	{"(?i)[^a-z]", 7},
	{"^/user$", 4},
	{"^/user", 4},
	{"/user$", 9},
	{"^(/user|/users)$", 11},
	{"^/(users|groups)/[0-9]+$", 20},
	{"/(users|groups)/[0-9]+", 21},
	{"/(?:users|groups|orgs)/[0-9a-f]{8}", 37},
	{"/(?P<id>[0-9]+)", 9},
	{"(a)", 7},
	{"(?:a|b)", 5},
	{"(?:ab|cd)", 8},
	{"a*", 5},
	{"a+", 6},
	{"a?", 6},
	{"a*?", 5},
	{"a{5}", 9},
	{"a{2,5}", 12},
	{"a{3,}", 8},
	{"a*a", 6},
	{"a+a*", 6},
	{"[0-9]+[0-9]*", 6},
	{"\\b", 5},
	{"(?:\\b){0,2}", 6},
	{"(?:\\z){3,}", 6},
	{"\\A/x\\z", 4},
	{"(?m)^/x$", 8},
	{"/files/[^/]+\\.(?:png|jpe?g|gif)", 26},
	{"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", 73},
	{"/v1/(?:[a-z0-9-]+/)*[a-z0-9-]+", 19},
	{"/healthz|/readyz|/livez", 23},
	{"(?:/[a-z]+){1,4}", 20},
	{"/api/.+/items/[0-9]+", 21},
	{"[^\\s\\S]", 1},
	{"/a(?:)b", 7},
	{"(|a)", 8},
	{"(a|)", 8},
}

func programSize(t *testing.T, re string) int {
	t.Helper()
	if _, err := syntax.Parse(re, syntax.Perl); err != nil {
		t.Fatalf("parse %q: %v", re, err)
	}
	n, err := re2ProgramSize(re)
	if err != nil {
		t.Fatalf("re2ProgramSize(%q): %v", re, err)
	}
	return n
}

func TestRE2ProgramSizeMatchesEnvoy(t *testing.T) {
	for _, tc := range envoySizes {
		if got := programSize(t, tc.re); got != tc.size {
			t.Errorf("re2ProgramSize(%q) = %d, Envoy says %d", tc.re, got, tc.size)
		}
	}
}

// Cases where Go's parser builds a different tree from RE2's: Go merges
// literal alternatives as it parses, flattens the alternations it factors
// and collapses empty alternatives; RE2 also factors a common leading ^ out
// of alternatives, and clamps merged classes to Latin-1. An estimate built
// on Go's tree was off by up to 25% on these; the port parses like RE2.
func TestRE2ProgramSizeWhereGoParsesDifferently(t *testing.T) {
	for _, tc := range []struct {
		re   string
		size int
	}{
		{"(?:/(?:users|groups|orgs)|/orders)", 26},
		{"(a|a|b)", 9},
		{"(?:/users|/(?:users|groups|orgs))/[0-9]+", 28},
		{strings.Repeat("(?:/users|/(?:users|groups|orgs))/[0-9]+", 5), 124},
		{"^/a$|^/b$", 7},
		{"(|a|)", 8},
		{"a||b", 7},
		{"[a-z]|(?i:s)", 6},
		{"(?:|(?i:[^/]|s|[^/]x))", 9},
		{"(?:|(?i:[^/]|s)|[^/]x)", 9},
		{"(?:a{|(?U)a*)??", 10},
	} {
		if got := programSize(t, tc.re); got != tc.size {
			t.Errorf("re2ProgramSize(%q) = %d, Envoy says %d", tc.re, got, tc.size)
		}
	}
}

func TestRE2ProgramSizeOfRepeats(t *testing.T) {
	// Nested repeats expand multiplicatively (Go's parser allows a product
	// of 1000); sizes measured with Envoy.
	for _, tc := range []struct {
		re   string
		size int
	}{
		{`(?:(?:a{10}){10}){10}`, 1004},
		{`(?:a{30}){30}`, 904},
		{`(?:(?:[^\s\S]{10}){10}){10}`, 1}, // matches nothing
		{`(?:(?:\b{10}){10}){10}`, 5},      // x{n,m} of an assertion is x{1}
	} {
		if got := programSize(t, tc.re); got != tc.size {
			t.Errorf("re2ProgramSize(%q) = %d, Envoy says %d", tc.re, got, tc.size)
		}
	}
}

func TestRE2ProgramSizeStopsEarly(t *testing.T) {
	// About 101,000 instructions: past the compiler's budget.
	if n, err := re2ProgramSize(strings.Repeat(`(?:(?:a{10}){10}){10}`, 101)); err == nil {
		t.Errorf("re2ProgramSize = %d, want errTooComplex", n)
	}
}

// FuzzRE2ProgramSize: every ASCII regex regexp/syntax accepts gets a size
// or errTooComplex; the port must neither panic nor fail to follow it.
func FuzzRE2ProgramSize(f *testing.F) {
	for _, tc := range envoySizes {
		f.Add(tc.re)
	}
	for _, s := range []string{`(?i)\Qab`, `[]a]`, `[^]a]`, `[\]\-]`, `a{`, `a{1`, `a{,2}`, `(?P<n>x)(?<m>y)`,
		`(?-i:a)(?i-s:b)`, `\101\0\x41\x{42}`, `[[:^alpha:][:digit:]]`, `\pN\p{Greek}\PL`, `(?U)a*?b+`, `(|)`, `(?:)+`, `{00}`, `a{01}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for i := 0; i < len(s); i++ {
			if s[i] >= 0x80 {
				return
			}
		}
		if len(s) > MaxResourceLen {
			return
		}
		if _, err := syntax.Parse(s, syntax.Perl); err != nil {
			return
		}
		n, err := re2ProgramSize(s)
		if err != nil && !errors.Is(err, errTooComplex) {
			t.Fatalf("re2ProgramSize(%q): %v", s, err)
		}
		if err == nil && n < 1 {
			t.Fatalf("re2ProgramSize(%q) = %d", s, n)
		}
	})
}
