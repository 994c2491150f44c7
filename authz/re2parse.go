package authz

// A port of the structure of RE2's parser (parse.cc, Regexp::ParseState and
// FactorAlternation), in Latin-1 mode with the Perl flags Envoy uses. The
// program size depends on the shape of the parse tree, and Go's parser
// builds a different shape for alternations (it merges literal alternatives
// as it goes, flattens the alternations it factors and drops duplicate empty
// alternatives), so the tree is rebuilt here the way RE2 builds it. Only the
// atoms, character classes and escapes, are left to regexp/syntax, which
// reads them as RE2 does.
//
// The input has already been accepted by regexp/syntax (Perl flags), so the
// parser does not diagnose syntax errors; it reports errBadRegex when it
// meets something it cannot follow.

import (
	"errors"
	"fmt"
	"regexp/syntax"
	"slices"
	"strconv"
	"strings"
	"unicode"
)

var errBadRegex = errors.New("regex not understood by the RE2 size estimator")

// Stack markers, beyond the ops of regexp/syntax.
const (
	opLeftParen   syntax.Op = 250
	opVerticalBar syntax.Op = 251
)

func isMarker(n *re2Node) bool { return n.op >= opLeftParen }

type re2Parser struct {
	stack []*re2Node
	flags syntax.Flags
	ncap  int
}

// parseRE2 parses s (read as Latin-1: each byte is a character) into RE2's
// parse tree.
func parseRE2(s string) (*re2Node, error) {
	p := &re2Parser{flags: syntax.Perl}
	for i := 0; i < len(s); {
		c := s[i]
		switch c {
		case '(':
			if strings.HasPrefix(s[i:], "(?") {
				n, err := p.perlFlags(s[i:])
				if err != nil {
					return nil, err
				}
				i += n
				continue
			}
			p.ncap++
			p.push(&re2Node{op: opLeftParen, flags: p.flags, capture: true, cap: p.ncap})
			i++
		case '|':
			p.verticalBar()
			i++
		case ')':
			if err := p.rightParen(); err != nil {
				return nil, err
			}
			i++
		case '^':
			if p.flags&syntax.OneLine != 0 {
				p.pushSimple(syntax.OpBeginText)
			} else {
				p.pushSimple(syntax.OpBeginLine)
			}
			i++
		case '$':
			if p.flags&syntax.OneLine != 0 {
				p.pushRegexp(&re2Node{op: syntax.OpEndText, flags: p.flags | syntax.WasDollar})
			} else {
				p.pushSimple(syntax.OpEndLine)
			}
			i++
		case '.':
			if p.flags&syntax.DotNL != 0 {
				p.pushSimple(syntax.OpAnyChar)
			} else {
				p.pushRegexp(&re2Node{op: syntax.OpCharClass, flags: p.flags &^ syntax.FoldCase,
					runes: []rune{0, '\n' - 1, '\n' + 1, latin1Max}})
			}
			i++
		case '[':
			end := classEnd(s, i)
			if err := p.pushClass(s[i:end]); err != nil {
				return nil, err
			}
			i = end
		case '*', '+', '?':
			op := map[byte]syntax.Op{'*': syntax.OpStar, '+': syntax.OpPlus, '?': syntax.OpQuest}[c]
			i++
			nongreedy := i < len(s) && s[i] == '?'
			if nongreedy {
				i++
			}
			if err := p.repeatOp(op, nongreedy); err != nil {
				return nil, err
			}
		case '{':
			lo, hi, n, ok := parseRepeat(s[i:])
			if !ok {
				p.pushLiteral('{')
				i++
				continue
			}
			i += n
			nongreedy := i < len(s) && s[i] == '?'
			if nongreedy {
				i++
			}
			if err := p.repetition(lo, hi, nongreedy); err != nil {
				return nil, err
			}
		case '\\':
			n, err := p.escape(s[i:])
			if err != nil {
				return nil, err
			}
			i += n
		default:
			p.pushLiteral(rune(c))
			i++
		}
	}
	p.alternation()
	if len(p.stack) != 1 || isMarker(p.stack[0]) {
		return nil, errBadRegex
	}
	return p.stack[0], nil
}

func (p *re2Parser) push(n *re2Node) { p.stack = append(p.stack, n) }

func (p *re2Parser) top(k int) *re2Node {
	if len(p.stack) < k+1 {
		return nil
	}
	return p.stack[len(p.stack)-1-k]
}

func (p *re2Parser) pop() *re2Node {
	n := p.stack[len(p.stack)-1]
	p.stack = p.stack[:len(p.stack)-1]
	return n
}

func (p *re2Parser) pushSimple(op syntax.Op) { p.pushRegexp(&re2Node{op: op, flags: p.flags}) }

// pushRegexp is ParseState::PushRegexp: finish a pending literal string,
// then push re, turning a class of one character, or of a letter in both
// cases, into a literal.
func (p *re2Parser) pushRegexp(re *re2Node) {
	p.maybeConcatString(-1, 0)
	if re.op == syntax.OpCharClass {
		re.runes = clampLatin1(re.runes)
		switch size := classSize(re.runes); {
		case size == 1:
			re = &re2Node{op: syntax.OpLiteral, flags: p.flags, runes: []rune{re.runes[0]}}
		case size == 2 && 'A' <= re.runes[0] && re.runes[0] <= 'Z' && classContains(re.runes, re.runes[0]+'a'-'A'):
			re = &re2Node{op: syntax.OpLiteral, flags: p.flags | syntax.FoldCase, runes: []rune{re.runes[0] + 'a' - 'A'}}
		}
	}
	p.push(re)
}

// pushLiteral is ParseState::PushLiteral.
func (p *re2Parser) pushLiteral(r rune) {
	if p.flags&syntax.FoldCase != 0 && ('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z') {
		lo, hi := r&^0x20, r|0x20 // upper, lower
		p.pushRegexp(&re2Node{op: syntax.OpCharClass, flags: p.flags &^ syntax.FoldCase, runes: []rune{lo, lo, hi, hi}})
		return
	}
	if p.maybeConcatString(r, p.flags) {
		return
	}
	p.pushRegexp(&re2Node{op: syntax.OpLiteral, flags: p.flags, runes: []rune{r}})
}

func isLiteral(n *re2Node) bool { return n != nil && n.op == syntax.OpLiteral }

// maybeConcatString is ParseState::MaybeConcatString: when the two top
// entries are literals with the same case folding, append the top one to
// the other; then reuse it for r, or drop it when r < 0.
func (p *re2Parser) maybeConcatString(r rune, flags syntax.Flags) bool {
	re1, re2 := p.top(0), p.top(1)
	if !isLiteral(re1) || !isLiteral(re2) || re1.flags&syntax.FoldCase != re2.flags&syntax.FoldCase {
		return false
	}
	re2.runes = append(re2.runes, re1.runes...)
	if r >= 0 {
		re1.runes = []rune{r}
		re1.flags = flags
		return true
	}
	p.pop()
	return false
}

// repeatOp is ParseState::PushRepeatOp, which squashes stacked operators.
func (p *re2Parser) repeatOp(op syntax.Op, nongreedy bool) error {
	t := p.top(0)
	if t == nil || isMarker(t) {
		return errBadRegex
	}
	fl := p.flags
	if nongreedy {
		fl ^= syntax.NonGreedy
	}
	if op == t.op && fl == t.flags {
		return nil
	}
	if (t.op == syntax.OpStar || t.op == syntax.OpPlus || t.op == syntax.OpQuest) && fl == t.flags {
		t.op = syntax.OpStar
		return nil
	}
	p.stack[len(p.stack)-1] = &re2Node{op: op, flags: fl, sub: []*re2Node{t}}
	return nil
}

// repetition is ParseState::PushRepetition.
func (p *re2Parser) repetition(lo, hi int, nongreedy bool) error {
	t := p.top(0)
	if t == nil || isMarker(t) {
		return errBadRegex
	}
	fl := p.flags
	if nongreedy {
		fl ^= syntax.NonGreedy
	}
	p.stack[len(p.stack)-1] = &re2Node{op: syntax.OpRepeat, flags: fl, min: lo, max: hi, sub: []*re2Node{t}}
	return nil
}

// verticalBar is ParseState::DoVerticalBar: finish the concatenation left
// of the bar and move it below the bar marker.
func (p *re2Parser) verticalBar() {
	p.maybeConcatString(-1, 0)
	p.concatenation()
	r1, r2 := p.top(0), p.top(1)
	if r2 == nil || r2.op != opVerticalBar {
		p.push(&re2Node{op: opVerticalBar, flags: p.flags})
		return
	}
	if r3 := p.top(2); r3 != nil && (r1.op == syntax.OpAnyChar || r3.op == syntax.OpAnyChar) {
		single := func(n *re2Node) bool {
			return (n.op == syntax.OpLiteral && len(n.runes) == 1) || n.op == syntax.OpCharClass || n.op == syntax.OpAnyChar
		}
		// AnyChar subsumes a neighbouring literal, class or AnyChar.
		if r3.op == syntax.OpAnyChar && single(r1) {
			p.pop()
			return
		}
		if r1.op == syntax.OpAnyChar && single(r3) {
			n := len(p.stack)
			p.stack[n-3], p.stack[n-2] = r1, r2
			p.stack = p.stack[:n-1]
			return
		}
	}
	n := len(p.stack)
	p.stack[n-2], p.stack[n-1] = r1, r2
}

// concatenation is ParseState::DoConcatenation.
func (p *re2Parser) concatenation() {
	if t := p.top(0); t == nil || isMarker(t) {
		p.pushRegexp(&re2Node{op: syntax.OpEmptyMatch, flags: p.flags})
	}
	p.collapse(syntax.OpConcat)
}

// alternation is ParseState::DoAlternation.
func (p *re2Parser) alternation() {
	p.verticalBar()
	p.pop() // the bar
	p.collapse(syntax.OpAlternate)
}

// collapse is ParseState::DoCollapse: replace the entries above the
// nearest marker by their concatenation or alternation, flattening
// entries that already are one.
func (p *re2Parser) collapse(op syntax.Op) {
	j := len(p.stack)
	for j > 0 && !isMarker(p.stack[j-1]) {
		j--
	}
	if len(p.stack)-j == 1 {
		return
	}
	var subs []*re2Node
	for _, n := range p.stack[j:] {
		if n.op == op {
			subs = append(subs, n.sub...)
		} else {
			subs = append(subs, n)
		}
	}
	p.stack = append(p.stack[:j], concatOrAlternate(op, subs, p.flags, true))
}

func (p *re2Parser) rightParen() error {
	p.alternation()
	if len(p.stack) < 2 || p.top(1).op != opLeftParen {
		return errBadRegex
	}
	r1 := p.pop()
	paren := p.pop()
	p.flags = paren.flags
	re := r1
	if paren.capture {
		re = &re2Node{op: syntax.OpCapture, flags: paren.flags, capture: true, cap: paren.cap, sub: []*re2Node{r1}}
	}
	p.pushRegexp(re)
	return nil
}

// perlFlags is ParseState::ParsePerlFlags, for t starting with "(?": named
// captures, and flag settings with or without a group.
func (p *re2Parser) perlFlags(t string) (int, error) {
	if strings.HasPrefix(t, "(?P<") || (strings.HasPrefix(t, "(?<") && !strings.HasPrefix(t, "(?<=") && !strings.HasPrefix(t, "(?<!")) {
		end := strings.IndexByte(t, '>')
		if end < 0 {
			return 0, errBadRegex
		}
		p.ncap++
		p.push(&re2Node{op: opLeftParen, flags: p.flags, capture: true, cap: p.ncap})
		return end + 1, nil
	}
	nflags := p.flags
	negated := false
	for i := 2; i < len(t); i++ {
		var f syntax.Flags
		switch t[i] {
		case 'i':
			f = syntax.FoldCase
		case 's':
			f = syntax.DotNL
		case 'U':
			f = syntax.NonGreedy
		case 'm': // the opposite of OneLine
			if negated {
				nflags |= syntax.OneLine
			} else {
				nflags &^= syntax.OneLine
			}
			continue
		case '-':
			negated = true
			continue
		case ':':
			p.push(&re2Node{op: opLeftParen, flags: p.flags})
			p.flags = nflags
			return i + 1, nil
		case ')':
			p.flags = nflags
			return i + 1, nil
		default:
			return 0, errBadRegex
		}
		if negated {
			nflags &^= f
		} else {
			nflags |= f
		}
	}
	return 0, errBadRegex
}

// escape handles a backslash sequence at the start of t and returns its
// length.
func (p *re2Parser) escape(t string) (int, error) {
	if len(t) < 2 {
		return 0, errBadRegex
	}
	switch c := t[1]; c {
	case 'b':
		p.pushSimple(syntax.OpWordBoundary)
		return 2, nil
	case 'B':
		p.pushSimple(syntax.OpNoWordBoundary)
		return 2, nil
	case 'A':
		p.pushSimple(syntax.OpBeginText)
		return 2, nil
	case 'z':
		p.pushSimple(syntax.OpEndText)
		return 2, nil
	case 'Q':
		lit, rest, _ := strings.Cut(t[2:], `\E`)
		for i := 0; i < len(lit); i++ {
			p.pushLiteral(rune(lit[i]))
		}
		return len(t) - len(rest), nil
	case 'd', 'D', 's', 'S', 'w', 'W':
		return 2, p.pushClass(t[:2])
	case 'p', 'P':
		n := 3
		if len(t) > 2 && t[2] == '{' {
			end := strings.IndexByte(t, '}')
			if end < 0 {
				return 0, errBadRegex
			}
			n = end + 1
		}
		if n > len(t) {
			return 0, errBadRegex
		}
		return n, p.pushClass(t[:n])
	}
	n := escapeLen(t)
	re, err := syntax.Parse(latin1Text(t[:n]), syntax.Perl)
	if err != nil || re.Op != syntax.OpLiteral || len(re.Rune) != 1 {
		return 0, errBadRegex
	}
	p.pushLiteral(re.Rune[0])
	return n, nil
}

// escapeLen is the length of a literal escape at the start of t.
func escapeLen(t string) int {
	switch c := t[1]; {
	case c == 'x' && len(t) > 2 && t[2] == '{':
		if end := strings.IndexByte(t, '}'); end > 0 {
			return end + 1
		}
	case c == 'x':
		return min(4, len(t))
	case '0' <= c && c <= '7':
		n := 2
		for n < 4 && n < len(t) && '0' <= t[n] && t[n] <= '7' {
			n++
		}
		return n
	}
	return 2
}

// classEnd returns the index just past the bracketed class that starts at
// s[i] (ParseCharClass's reading of it: a leading ] is a literal, [:name:]
// is a POSIX class, and backslashes escape).
func classEnd(s string, i int) int {
	j := i + 1
	if j < len(s) && s[j] == '^' {
		j++
	}
	if j < len(s) && s[j] == ']' {
		j++
	}
	for j < len(s) && s[j] != ']' {
		switch {
		case strings.HasPrefix(s[j:], "[:"):
			if end := strings.Index(s[j+2:], ":]"); end >= 0 {
				j += 2 + end + 2
				continue
			}
			j++
		case s[j] == '\\' && j+1 < len(s):
			j += escapeLen(s[j:])
		default:
			j++
		}
	}
	return min(j+1, len(s))
}

// pushClass reads a class (bracketed, or an escape like \d or \pL) with
// regexp/syntax under the current case folding, and pushes it.
func (p *re2Parser) pushClass(text string) error {
	prefix := ""
	if p.flags&syntax.FoldCase != 0 {
		prefix = "(?i)"
	}
	re, err := syntax.Parse(prefix+latin1Text(text), syntax.Perl)
	if err != nil {
		return fmt.Errorf("%w: %v", errBadRegex, err)
	}
	var rs []rune
	switch re.Op {
	case syntax.OpCharClass:
		rs = slices.Clone(re.Rune)
	case syntax.OpAnyChar:
		rs = []rune{0, unicode.MaxRune}
	case syntax.OpAnyCharNotNL:
		rs = []rune{0, '\n' - 1, '\n' + 1, unicode.MaxRune}
	case syntax.OpLiteral:
		if len(re.Rune) != 1 {
			return errBadRegex
		}
		rs = foldOrbit(re.Rune[0], re.Flags&syntax.FoldCase != 0)
	case syntax.OpNoMatch:
	default:
		return errBadRegex
	}
	p.pushRegexp(&re2Node{op: syntax.OpCharClass, flags: p.flags &^ syntax.FoldCase, runes: rs})
	return nil
}

// foldOrbit returns r, and with fold its case variants, as class ranges.
func foldOrbit(r rune, fold bool) []rune {
	runes := []rune{r}
	if fold {
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			runes = append(runes, f)
		}
	}
	slices.Sort(runes)
	var rs []rune
	for _, x := range runes {
		if n := len(rs); n > 0 && rs[n-1]+1 == x {
			rs[n-1] = x
			continue
		}
		rs = append(rs, x, x)
	}
	return rs
}

// latin1Text rewrites the bytes above 0x7F of a Latin-1 pattern fragment as
// \x{..} escapes, so that regexp/syntax reads each as one character, as
// RE2 does in Latin-1 mode.
func latin1Text(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			b.WriteString(`\x{` + strconv.FormatUint(uint64(s[i]), 16) + `}`)
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// parseRepeat reads {n}, {n,} or {n,m} at the start of t (MaybeParseRepeat;
// a count with a leading zero makes the brace a literal, as in Go).
func parseRepeat(t string) (lo, hi, n int, ok bool) {
	end := strings.IndexByte(t, '}')
	if end < 0 {
		return 0, 0, 0, false
	}
	body := t[1:end]
	a, b, comma := strings.Cut(body, ",")
	digits := func(s string) bool {
		return s != "" && strings.Trim(s, "0123456789") == "" && (len(s) == 1 || s[0] != '0')
	}
	if !digits(a) || (comma && b != "" && !digits(b)) {
		return 0, 0, 0, false
	}
	lo, err := strconv.Atoi(a)
	if err != nil {
		return 0, 0, 0, false
	}
	hi = lo
	if comma {
		hi = -1
		if b != "" {
			if hi, err = strconv.Atoi(b); err != nil {
				return 0, 0, 0, false
			}
		}
	}
	return lo, hi, end + 1, true
}

func clampLatin1(rs []rune) []rune {
	var out []rune
	for i := 0; i+1 < len(rs); i += 2 {
		if rs[i] > latin1Max {
			break
		}
		out = append(out, rs[i], min(rs[i+1], latin1Max))
	}
	return out
}

func classSize(rs []rune) int {
	n := 0
	for i := 0; i+1 < len(rs); i += 2 {
		n += int(rs[i+1]-rs[i]) + 1
	}
	return n
}

func classContains(rs []rune, r rune) bool {
	for i := 0; i+1 < len(rs); i += 2 {
		if rs[i] <= r && r <= rs[i+1] {
			return true
		}
	}
	return false
}

// concatOrAlternate is Regexp::ConcatOrAlternate.
func concatOrAlternate(op syntax.Op, subs []*re2Node, flags syntax.Flags, factor bool) *re2Node {
	switch len(subs) {
	case 0:
		if op == syntax.OpAlternate {
			return &re2Node{op: syntax.OpNoMatch, flags: flags}
		}
		return &re2Node{op: syntax.OpEmptyMatch, flags: flags}
	case 1:
		return subs[0]
	}
	if op == syntax.OpAlternate && factor {
		subs = factorAlternation(slices.Clone(subs), flags)
		if len(subs) == 1 {
			return subs[0]
		}
	}
	return &re2Node{op: op, flags: flags, sub: subs}
}

// factorAlternation is Regexp::FactorAlternation: factor common literal
// prefixes (round 1) and common simple leading pieces (round 2) out of runs
// of alternatives, factoring the suffixes recursively, then merge runs of
// literals and classes into one class (round 3).
func factorAlternation(sub []*re2Node, flags syntax.Flags) []*re2Node {
	sub = factorRound(sub, flags, 1)
	sub = factorRound(sub, flags, 2)
	return mergeClasses(sub, flags)
}

// factorRound runs round 1 or 2 of FactorAlternation.
func factorRound(sub []*re2Node, flags syntax.Flags, round int) []*re2Node {
	var out []*re2Node
	start := 0
	var str []rune     // round 1: the run's common literal prefix
	var fold bool      // round 1: its case folding
	var first *re2Node // round 2: the run's common leading piece
	for i := 0; i <= len(sub); i++ {
		var stri []rune
		var foldi bool
		var firsti *re2Node
		if i < len(sub) {
			if round == 1 {
				stri, foldi = leadingString(sub[i])
				if foldi == fold {
					same := 0
					for same < len(str) && same < len(stri) && str[same] == stri[same] {
						same++
					}
					if same > 0 {
						str = str[:same]
						continue
					}
				}
			} else {
				firsti = leadingRegexp(sub[i])
				if first != nil && round2Prefix(first) && re2Equal(first, firsti) {
					continue
				}
			}
		}
		switch i - start {
		case 0:
		case 1:
			out = append(out, sub[start])
		default:
			var prefix *re2Node
			if round == 1 {
				prefix = literalString(str, fold, flags)
				for j := start; j < i; j++ {
					sub[j] = removeLeadingString(sub[j], len(str))
				}
			} else {
				prefix = first
				for j := start; j < i; j++ {
					sub[j] = removeLeadingRegexp(sub[j])
				}
			}
			suffixes := factorAlternation(slices.Clone(sub[start:i]), flags)
			out = append(out, concatOrAlternate(syntax.OpConcat,
				[]*re2Node{prefix, concatOrAlternate(syntax.OpAlternate, suffixes, flags, false)}, flags, false))
		}
		if i < len(sub) {
			start, str, fold, first = i, stri, foldi, firsti
		}
	}
	return out
}

// mergeClasses is round 3: runs of single literals and classes become one
// class.
func mergeClasses(sub []*re2Node, flags syntax.Flags) []*re2Node {
	mergeable := func(n *re2Node) bool {
		return (n.op == syntax.OpLiteral && len(n.runes) == 1) || n.op == syntax.OpCharClass
	}
	var out []*re2Node
	start := 0
	for i := 0; i <= len(sub); i++ {
		if i < len(sub) && i > start && mergeable(sub[start]) && mergeable(sub[i]) {
			continue
		}
		switch i - start {
		case 0:
		case 1:
			out = append(out, sub[start])
		default:
			// A folded literal adds its whole fold orbit, even when the
			// class already has the literal; the result keeps to Latin-1
			// (measured: [a-z]|(?i:s) gains S, and [^/]|(?i:s) stays [^/]).
			var runes []rune
			for _, n := range sub[start:i] {
				if n.op == syntax.OpCharClass {
					runes = append(runes, n.runes...)
				} else {
					runes = append(runes, foldOrbit(n.runes[0], n.flags&syntax.FoldCase != 0)...)
				}
			}
			out = append(out, &re2Node{op: syntax.OpCharClass, flags: flags, runes: clampLatin1(normalizeRanges(runes))})
		}
		if i < len(sub) {
			start = i
		}
	}
	return out
}

// normalizeRanges sorts and merges overlapping or abutting class ranges.
func normalizeRanges(rs []rune) []rune {
	type rg struct{ lo, hi rune }
	var rgs []rg
	for i := 0; i+1 < len(rs); i += 2 {
		rgs = append(rgs, rg{rs[i], rs[i+1]})
	}
	slices.SortFunc(rgs, func(a, b rg) int { return int(a.lo - b.lo) })
	var out []rune
	for _, r := range rgs {
		if n := len(out); n > 0 && r.lo <= out[n-1]+1 {
			out[n-1] = max(out[n-1], r.hi)
			continue
		}
		out = append(out, r.lo, r.hi)
	}
	return out
}

// leadingString is Regexp::LeadingString.
func leadingString(n *re2Node) ([]rune, bool) {
	for n.op == syntax.OpConcat && len(n.sub) > 0 {
		n = n.sub[0]
	}
	fold := n.flags&syntax.FoldCase != 0
	if n.op == syntax.OpLiteral {
		return n.runes, fold
	}
	return nil, fold
}

// removeLeadingString is Regexp::RemoveLeadingString, which edits n in
// place (the parse tree is not shared yet).
func removeLeadingString(n *re2Node, k int) *re2Node {
	var path []*re2Node
	leaf := n
	for leaf.op == syntax.OpConcat && len(leaf.sub) > 0 {
		if len(path) < 4 {
			path = append(path, leaf)
		}
		leaf = leaf.sub[0]
	}
	if leaf.op == syntax.OpLiteral {
		if k >= len(leaf.runes) {
			leaf.op, leaf.runes = syntax.OpEmptyMatch, nil
		} else {
			leaf.runes = slices.Clone(leaf.runes[k:])
		}
	}
	for d := len(path) - 1; d >= 0; d-- {
		c := path[d]
		if c.sub[0].op != syntax.OpEmptyMatch {
			continue
		}
		switch len(c.sub) {
		case 0, 1:
			c.op, c.sub = syntax.OpEmptyMatch, nil
		case 2:
			*c = *c.sub[1]
		default:
			c.sub = c.sub[1:]
		}
	}
	return n
}

// leadingRegexp is Regexp::LeadingRegexp.
func leadingRegexp(n *re2Node) *re2Node {
	if n.op == syntax.OpEmptyMatch {
		return nil
	}
	if n.op == syntax.OpConcat && len(n.sub) >= 2 {
		if n.sub[0].op == syntax.OpEmptyMatch {
			return nil
		}
		return n.sub[0]
	}
	return n
}

// removeLeadingRegexp is Regexp::RemoveLeadingRegexp.
func removeLeadingRegexp(n *re2Node) *re2Node {
	if n.op == syntax.OpEmptyMatch {
		return n
	}
	if n.op == syntax.OpConcat && len(n.sub) >= 2 {
		if n.sub[0].op == syntax.OpEmptyMatch {
			return n
		}
		if len(n.sub) == 2 {
			return n.sub[1]
		}
		n.sub = n.sub[1:]
		return n
	}
	return &re2Node{op: syntax.OpEmptyMatch, flags: n.flags}
}

// round2Prefix: the leading pieces round 2 may factor out (empty-width
// assertions, classes, and fixed repeats of a single character or class).
func round2Prefix(n *re2Node) bool {
	switch n.op {
	case syntax.OpBeginLine, syntax.OpEndLine, syntax.OpWordBoundary, syntax.OpNoWordBoundary,
		syntax.OpBeginText, syntax.OpEndText, syntax.OpCharClass, syntax.OpAnyChar:
		return true
	case syntax.OpRepeat:
		s := n.sub[0]
		return n.min == n.max && ((s.op == syntax.OpLiteral && len(s.runes) == 1) || s.op == syntax.OpCharClass || s.op == syntax.OpAnyChar)
	}
	return false
}

func literalString(rs []rune, fold bool, flags syntax.Flags) *re2Node {
	f := flags &^ syntax.FoldCase
	if fold {
		f |= syntax.FoldCase
	}
	if len(rs) == 0 {
		return &re2Node{op: syntax.OpEmptyMatch, flags: f}
	}
	return &re2Node{op: syntax.OpLiteral, flags: f, runes: slices.Clone(rs)}
}

// re2Equal is Regexp::Equal.
func re2Equal(a, b *re2Node) bool {
	if a == nil || b == nil || a.op != b.op {
		return false
	}
	switch a.op {
	case syntax.OpEndText:
		if (a.flags^b.flags)&syntax.WasDollar != 0 {
			return false
		}
	case syntax.OpLiteral:
		if !slices.Equal(a.runes, b.runes) || (a.flags^b.flags)&syntax.FoldCase != 0 {
			return false
		}
	case syntax.OpStar, syntax.OpPlus, syntax.OpQuest:
		if (a.flags^b.flags)&syntax.NonGreedy != 0 {
			return false
		}
	case syntax.OpRepeat:
		if (a.flags^b.flags)&syntax.NonGreedy != 0 || a.min != b.min || a.max != b.max {
			return false
		}
	case syntax.OpCapture:
		if a.cap != b.cap {
			return false
		}
	case syntax.OpCharClass:
		if !slices.Equal(a.runes, b.runes) {
			return false
		}
	}
	if len(a.sub) != len(b.sub) {
		return false
	}
	for i := range a.sub {
		if !re2Equal(a.sub[i], b.sub[i]) {
			return false
		}
	}
	return true
}
