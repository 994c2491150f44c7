package authz

import (
	"errors"
	"fmt"
	"net/url"
	"regexp/syntax"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Limits on a resource regex.
const (
	// EnvoyRegexProgramLimit is Envoy's default limit on the RE2 program
	// size of a regex (runtime key re2.max_program_size.error_level). Envoy
	// refuses a bigger one, and with it the whole RBAC config.
	EnvoyRegexProgramLimit = 100

	// RegexProgramBudget is the largest program size Validate accepts.
	// The size comes from a port of RE2's parser and compiler (re2size.go,
	// re2parse.go) that matched Envoy 1.40 exactly on every regex it was
	// calibrated on (tens of thousands, see the tests); the margin below
	// Envoy's limit absorbs what a different RE2 release inside a later
	// Envoy might change.
	RegexProgramBudget = 90

	// MaxResourceLen bounds the text of a resource regex. Every character
	// costs at least one RE2 instruction, so a longer regex could not pass
	// the program size limit anyway; the bound keeps parsing cheap.
	MaxResourceLen = 1024
)

// checkResource returns why a resource regex is unusable, or "".
//
// A resource must be valid RE2 syntax, as regexp/syntax reads it (Go's
// syntax is RE2's, except for the Unicode class names each knows, which
// resources may not use), and stay within the program size budget. It must
// also be ASCII: Envoy matches the path as it arrives, percent-encoded, so a
// non-ASCII character could never match; and Envoy compiles regexes in
// Latin-1 mode, where \x{100} is an error and a class like [^/] matches a
// byte rather than a UTF-8 character.
func checkResource(res string) string {
	if res == "" {
		return `resource is empty (use ".*" for any path)`
	}
	if len(res) > MaxResourceLen {
		return fmt.Sprintf("resource is longer than %d bytes", MaxResourceLen)
	}
	if !utf8.ValidString(res) {
		return fmt.Sprintf("resource %q is not valid UTF-8", res)
	}
	for _, r := range res {
		if r >= utf8.RuneSelf {
			return fmt.Sprintf("resource %q contains %q, which is not ASCII: paths are matched percent-encoded, write %s", res, r, percentEncode(r))
		}
		if r < ' ' || r == 0x7f {
			return fmt.Sprintf("resource %q contains the control character %q", res, r)
		}
	}
	re, err := syntax.Parse(res, syntax.Perl)
	if err != nil {
		var se *syntax.Error
		if errors.As(err, &se) {
			return fmt.Sprintf("resource %q is not a valid regular expression: %s: `%s`", res, se.Code, se.Expr)
		}
		return fmt.Sprintf("resource %q is not a valid regular expression: %v", res, err)
	}
	if esc := unicodeEscape(res); esc != "" {
		if strings.HasPrefix(esc, `\x`) {
			return fmt.Sprintf("resource %q escapes a non-ASCII character (%s): paths are matched percent-encoded", res, esc)
		}
		return fmt.Sprintf("resource %q uses a Unicode class (%s): paths are matched percent-encoded; use ASCII classes", res, esc)
	}
	if what := nonASCIIMatch(re); what != "" {
		return fmt.Sprintf("resource %q matches non-ASCII characters (%s): paths are matched percent-encoded; use ASCII classes", res, what)
	}
	size, err := re2ProgramSize(res)
	switch {
	case errors.Is(err, errTooComplex):
		return fmt.Sprintf("resource %q is too complex for Envoy: its RE2 program would be far above the limit of %d", res, EnvoyRegexProgramLimit)
	case err != nil:
		return fmt.Sprintf("resource %q could not be checked against Envoy's regex size limit: %v", res, err)
	}
	if size > RegexProgramBudget {
		return fmt.Sprintf("resource %q is too complex for Envoy: its RE2 program size is %d, above the budget of %d (Envoy refuses more than %d); simplify it or split the entry",
			res, size, RegexProgramBudget, EnvoyRegexProgramLimit)
	}
	return ""
}

func percentEncode(r rune) string {
	return url.PathEscape(string(r))
}

// unicodeEscape finds, in the regex text, a \x escape above 0x7F or a
// Unicode class (\pL, \p{Greek}, \PN). A class range like
// [\x00-\x{10FFFF}] looks like a harmless negated class once parsed, but
// Envoy refuses anything above \xFF; and Go and RE2 do not know the same
// Unicode class names (Go reads \pp as punctuation, RE2 refuses it).
func unicodeEscape(s string) string {
	for i := 0; i+1 < len(s); i++ {
		if s[i] != '\\' {
			continue
		}
		switch s[i+1] {
		case 'Q': // literal text up to \E
			end := strings.Index(s[i+2:], `\E`)
			if end < 0 {
				return ""
			}
			i += 2 + end + 1
			continue
		case 'x':
			j := i + 2
			var hex, text string
			if j < len(s) && s[j] == '{' {
				k := strings.IndexByte(s[j:], '}')
				if k < 0 {
					return ""
				}
				hex, text = s[j+1:j+k], s[i:j+k+1]
			} else if j+2 <= len(s) {
				hex, text = s[j:j+2], s[i:j+2]
			}
			if v, err := strconv.ParseUint(hex, 16, 32); err == nil && v >= utf8.RuneSelf {
				return text
			}
		case 'p', 'P':
			if i+2 < len(s) && s[i+2] == '{' {
				if k := strings.IndexByte(s[i:], '}'); k > 0 {
					return s[i : i+k+1]
				}
			}
			return s[i:min(len(s), i+3)]
		}
		i++ // skip the escaped character
	}
	return ""
}

// nonASCIIMatch finds a part of the parsed regex that matches a non-ASCII
// character in some but not all cases: a non-ASCII literal, or a class like
// \pL. A class whose non-ASCII part is everything above 0x7F (negated ASCII
// classes such as [^/], \D or .) is fine: on ASCII paths it matches exactly
// what Envoy's Latin-1 RE2 does.
func nonASCIIMatch(re *syntax.Regexp) string {
	switch re.Op {
	case syntax.OpLiteral:
		for _, r := range re.Rune {
			if r >= utf8.RuneSelf {
				return fmt.Sprintf("%q", r)
			}
		}
	case syntax.OpCharClass:
		var tail []rune
		for i := 0; i+1 < len(re.Rune); i += 2 {
			lo, hi := re.Rune[i], re.Rune[i+1]
			if hi < utf8.RuneSelf {
				continue
			}
			tail = append(tail, max(lo, utf8.RuneSelf), hi)
		}
		tail = withoutASCIIFolds(tail)
		if len(tail) == 0 || (len(tail) == 2 && tail[0] == utf8.RuneSelf && tail[1] == utf8.MaxRune) {
			return ""
		}
		return "a Unicode class or a range beyond ASCII"
	}
	for _, s := range re.Sub {
		if what := nonASCIIMatch(s); what != "" {
			return what
		}
	}
	return ""
}

// withoutASCIIFolds removes from a class's non-ASCII ranges the two
// characters that case-fold to ASCII letters (U+017F to s, U+212A to k),
// which (?i) adds to classes like (?i)[a-z], and joins the ranges their
// absence splits, as in (?i)[^a-z].
func withoutASCIIFolds(rs []rune) []rune {
	var out []rune
	for i := 0; i+1 < len(rs); i += 2 {
		lo, hi := rs[i], rs[i+1]
		if lo == hi && isASCIIFold(lo) {
			continue
		}
		if n := len(out); n > 0 && (lo == out[n-1]+1 || (lo == out[n-1]+2 && isASCIIFold(out[n-1]+1))) {
			out[n-1] = hi
			continue
		}
		out = append(out, lo, hi)
	}
	return out
}

func isASCIIFold(r rune) bool { return r == 0x17F || r == 0x212A }
