package authz

// This file computes the size of the program RE2 compiles a regular
// expression to, as Envoy measures it: Envoy refuses a safe_regex whose
// RE2::ProgramSize() exceeds re2.max_program_size.error_level (100 by
// default), and a refused regex makes Envoy NACK the whole RBAC config.
//
// Go's regexp/syntax compiles to a different instruction set, so its program
// length is a poor predictor: a class is one Go instruction but one RE2
// instruction per byte range, and RE2 flattens its program. Instead, this is
// a port of the parts of RE2 that determine the size: the parser's tree
// shape (re2parse.go), Regexp::RequiredPrefix, the CoalesceWalker and
// SimplifyWalker of simplify.cc, the Compiler of compile.cc, and
// Prog::Optimize and Prog::Flatten of prog.cc. It follows RE2's Latin-1
// mode, which Envoy 1.40 uses by default (runtime flag
// envoy.reloadable_features.re2_use_latin1_mode): each byte of the pattern
// is a character, and classes stop at \xFF.
//
// The port matched Envoy 1.40 exactly on tens of thousands of generated
// regexes (the tests re-run a corpus against the real Envoy); Validate
// still keeps a margin below Envoy's limit (RegexProgramBudget).

import (
	"errors"
	"regexp/syntax"
	"slices"
)

// errTooComplex reports a regex whose program would be far above any limit;
// the estimator stops early rather than spend time and memory on it.
var errTooComplex = errors.New("regex too complex")

// re2Node is a parse tree node in RE2's shape (ops reuse Go's codes).
type re2Node struct {
	op       syntax.Op
	flags    syntax.Flags
	runes    []rune // literal runes, or class ranges as lo,hi pairs
	sub      []*re2Node
	min, max int
	capture  bool
	cap      int // capture index, for equality
}

const latin1Max = 0xFF

// requiredPrefix is Regexp::RequiredPrefix: for ^literal... RE2 matches the
// literal with memcmp and compiles only the rest.
func requiredPrefix(n *re2Node) (*re2Node, bool) {
	if n.op != syntax.OpConcat {
		return nil, false
	}
	i := 0
	for i < len(n.sub) && n.sub[i].op == syntax.OpBeginText {
		i++
	}
	if i == 0 || i >= len(n.sub) || n.sub[i].op != syntax.OpLiteral {
		return nil, false
	}
	i++
	switch rest := n.sub[i:]; len(rest) {
	case 0:
		return &re2Node{op: syntax.OpEmptyMatch, flags: n.flags}, true
	case 1:
		return rest[0], true
	default:
		return &re2Node{op: syntax.OpConcat, flags: n.flags, sub: rest}, true
	}
}

func isRepeatOp(op syntax.Op) bool {
	return op == syntax.OpStar || op == syntax.OpPlus || op == syntax.OpQuest || op == syntax.OpRepeat
}

func isSingle(op syntax.Op) bool {
	return op == syntax.OpCharClass || op == syntax.OpAnyChar || op == syntax.OpLiteral
}

// coalesce is RE2's CoalesceWalker: in a concatenation, x*x, x+x*, x?x{2}
// and the like (x a single character, class or any char) become one repeat.
func coalesce(n *re2Node) *re2Node {
	if len(n.sub) == 0 {
		return n
	}
	c := *n
	c.sub = make([]*re2Node, len(n.sub))
	for i, s := range n.sub {
		c.sub[i] = coalesce(s)
	}
	if c.op != syntax.OpConcat {
		return &c
	}
	changed := false
	for i := 0; i+1 < len(c.sub); i++ {
		if canCoalesce(c.sub[i], c.sub[i+1]) {
			c.sub[i], c.sub[i+1] = doCoalesce(c.sub[i], c.sub[i+1])
			changed = true
		}
	}
	if changed {
		c.sub = slices.DeleteFunc(c.sub, func(s *re2Node) bool { return s.op == syntax.OpEmptyMatch })
	}
	return &c
}

func canCoalesce(r1, r2 *re2Node) bool {
	if !isRepeatOp(r1.op) || !isSingle(r1.sub[0].op) || (r1.sub[0].op == syntax.OpLiteral && len(r1.sub[0].runes) != 1) {
		return false
	}
	x := r1.sub[0]
	if isRepeatOp(r2.op) && re2Equal(x, r2.sub[0]) && r1.flags&syntax.NonGreedy == r2.flags&syntax.NonGreedy {
		return true
	}
	if re2Equal(x, r2) {
		return true
	}
	return x.op == syntax.OpLiteral && r2.op == syntax.OpLiteral && len(r2.runes) > 1 &&
		r2.runes[0] == x.runes[0] && x.flags&syntax.FoldCase == r2.flags&syntax.FoldCase
}

func doCoalesce(r1, r2 *re2Node) (*re2Node, *re2Node) {
	x := r1.sub[0]
	nre := &re2Node{op: syntax.OpRepeat, flags: r1.flags, sub: []*re2Node{x}}
	switch r1.op {
	case syntax.OpStar:
		nre.min, nre.max = 0, -1
	case syntax.OpPlus:
		nre.min, nre.max = 1, -1
	case syntax.OpQuest:
		nre.min, nre.max = 0, 1
	default:
		nre.min, nre.max = r1.min, r1.max
	}
	empty := &re2Node{op: syntax.OpEmptyMatch}
	add := func(n int) {
		nre.min += n
		if nre.max != -1 {
			nre.max += n
		}
	}
	switch {
	case r2.op == syntax.OpStar:
		nre.max = -1
	case r2.op == syntax.OpPlus:
		nre.min++
		nre.max = -1
	case r2.op == syntax.OpQuest:
		if nre.max != -1 {
			nre.max++
		}
	case r2.op == syntax.OpRepeat:
		nre.min += r2.min
		if r2.max == -1 {
			nre.max = -1
		} else if nre.max != -1 {
			nre.max += r2.max
		}
	case r2.op == syntax.OpLiteral && len(r2.runes) > 1:
		k := 1
		for k < len(r2.runes) && r2.runes[k] == x.runes[0] {
			k++
		}
		add(k)
		if k < len(r2.runes) {
			return nre, &re2Node{op: syntax.OpLiteral, flags: r2.flags, runes: r2.runes[k:]}
		}
	default: // a single occurrence of x
		add(1)
	}
	return empty, nre
}

// simplifier is RE2's SimplifyWalker. It counts the nodes it builds so that
// nested repeats cannot make it expand without bound.
type simplifier struct{ budget int }

func (s *simplifier) node(n *re2Node) (*re2Node, error) {
	s.budget--
	if s.budget < 0 {
		return nil, errTooComplex
	}
	return n, nil
}

func (s *simplifier) simplify(n *re2Node) (*re2Node, error) {
	switch n.op {
	case syntax.OpConcat, syntax.OpAlternate, syntax.OpCapture:
		var c *re2Node // a copy, once a child changes
		for i, sub := range n.sub {
			ns, err := s.simplify(sub)
			if err != nil {
				return nil, err
			}
			if ns != sub && c == nil {
				cp := *n
				cp.sub = slices.Clone(n.sub)
				c = &cp
			}
			if c != nil {
				c.sub[i] = ns
			}
		}
		if c == nil {
			return n, nil
		}
		return s.node(c)
	case syntax.OpStar, syntax.OpPlus, syntax.OpQuest:
		sub, err := s.simplify(n.sub[0])
		if err != nil {
			return nil, err
		}
		switch {
		case sub.op == syntax.OpEmptyMatch:
			return sub, nil
		case sub == n.sub[0]:
			return n, nil
		case sub.op == n.op && sub.flags == n.flags:
			return sub, nil
		}
		return s.node(&re2Node{op: n.op, flags: n.flags, sub: []*re2Node{sub}})
	case syntax.OpRepeat:
		sub, err := s.simplify(n.sub[0])
		if err != nil {
			return nil, err
		}
		if sub.op == syntax.OpEmptyMatch {
			return sub, nil
		}
		lo, hi := n.min, n.max
		if isEmptyWidth(sub) {
			// x{n,m} of an empty-width assertion is x{min(n,1),min(m,1)}.
			lo, hi = min(lo, 1), min(hi, 1)
		}
		return s.repeat(sub, lo, hi, n.flags)
	case syntax.OpCharClass:
		if len(n.runes) == 0 {
			return s.node(&re2Node{op: syntax.OpNoMatch, flags: n.flags})
		}
	}
	return n, nil
}

// isEmptyWidth reports whether n is an empty-width assertion, or a
// concatenation or alternation of them.
func isEmptyWidth(n *re2Node) bool {
	switch n.op {
	case syntax.OpBeginLine, syntax.OpEndLine, syntax.OpBeginText, syntax.OpEndText,
		syntax.OpWordBoundary, syntax.OpNoWordBoundary:
		return true
	case syntax.OpConcat, syntax.OpAlternate:
		for _, s := range n.sub {
			if !isEmptyWidth(s) {
				return false
			}
		}
		return len(n.sub) > 0
	}
	return false
}

// starPlusQuest is Regexp::StarPlusOrQuest, which squashes stacked operators.
func (s *simplifier) starPlusQuest(op syntax.Op, sub *re2Node, flags syntax.Flags) (*re2Node, error) {
	if sub.flags == flags {
		if sub.op == op {
			return sub, nil
		}
		if sub.op == syntax.OpStar || sub.op == syntax.OpPlus || sub.op == syntax.OpQuest {
			if sub.op == syntax.OpStar {
				return sub, nil
			}
			return s.node(&re2Node{op: syntax.OpStar, flags: flags, sub: sub.sub})
		}
	}
	return s.node(&re2Node{op: op, flags: flags, sub: []*re2Node{sub}})
}

func (s *simplifier) repeat(x *re2Node, lo, hi int, f syntax.Flags) (*re2Node, error) {
	concat := func(subs ...*re2Node) (*re2Node, error) {
		if len(subs) == 1 {
			return subs[0], nil
		}
		return s.node(&re2Node{op: syntax.OpConcat, flags: f, sub: subs})
	}
	if hi == -1 {
		switch lo {
		case 0:
			return s.starPlusQuest(syntax.OpStar, x, f)
		case 1:
			return s.starPlusQuest(syntax.OpPlus, x, f)
		}
		subs := make([]*re2Node, 0, lo)
		for range lo - 1 {
			subs = append(subs, x)
		}
		p, err := s.starPlusQuest(syntax.OpPlus, x, f)
		if err != nil {
			return nil, err
		}
		return concat(append(subs, p)...)
	}
	if lo == 0 && hi == 0 {
		return s.node(&re2Node{op: syntax.OpEmptyMatch, flags: f})
	}
	if lo == 1 && hi == 1 {
		return x, nil
	}
	var nre *re2Node
	if lo > 0 {
		subs := make([]*re2Node, lo)
		for i := range subs {
			subs[i] = x
		}
		var err error
		if nre, err = concat(subs...); err != nil {
			return nil, err
		}
	}
	if hi > lo {
		suf, err := s.starPlusQuest(syntax.OpQuest, x, f)
		if err != nil {
			return nil, err
		}
		for i := lo + 1; i < hi; i++ {
			c, err := s.node(&re2Node{op: syntax.OpConcat, flags: f, sub: []*re2Node{x, suf}})
			if err != nil {
				return nil, err
			}
			if suf, err = s.starPlusQuest(syntax.OpQuest, c, f); err != nil {
				return nil, err
			}
		}
		if nre == nil {
			nre = suf
		} else if nre, err = s.node(&re2Node{op: syntax.OpConcat, flags: f, sub: []*re2Node{nre, suf}}); err != nil {
			return nil, err
		}
	}
	if nre == nil {
		return s.node(&re2Node{op: syntax.OpNoMatch, flags: f})
	}
	return nre, nil
}

// stripAnchor is IsAnchorStart (op \A, edge the first sub) and IsAnchorEnd
// (op \z, edge the last sub): an anchor at the edge of the regex, through
// concatenations and captures up to depth 4, is replaced by an empty match
// and reported, so that the program is marked anchored instead.
func stripAnchor(n *re2Node, depth int, edge func([]*re2Node) int, op syntax.Op) (*re2Node, bool) {
	if n == nil || depth >= 4 {
		return n, false
	}
	switch n.op {
	case syntax.OpConcat:
		if len(n.sub) > 0 {
			i := edge(n.sub)
			if s, ok := stripAnchor(n.sub[i], depth+1, edge, op); ok {
				c := *n
				c.sub = slices.Clone(n.sub)
				c.sub[i] = s
				return &c, true
			}
		}
	case syntax.OpCapture:
		if s, ok := stripAnchor(n.sub[0], depth+1, edge, op); ok {
			c := *n
			c.sub = []*re2Node{s}
			return &c, true
		}
	case op:
		return &re2Node{op: syntax.OpEmptyMatch, flags: n.flags}, true
	}
	return n, false
}

// Instructions of an RE2 program.
type re2Op uint8

const (
	instAlt re2Op = iota
	instAltMatch
	instByteRange
	instCapture
	instEmptyWidth
	instMatch
	instNop
	instFail
)

type re2Inst struct {
	op        re2Op
	out, out1 uint32
	lo, hi    uint8
}

// patchList threads the unfilled outs through the outs themselves: p refers
// to inst[p>>1].out (p&1 == 0) or inst[p>>1].out1 (p&1 == 1).
type patchList struct{ head, tail uint32 }

type frag struct {
	begin    uint32
	end      patchList
	nullable bool
}

type re2Compiler struct {
	inst   []re2Inst
	max    int // instruction budget
	visits int // node visit budget
	failed bool
}

func (c *re2Compiler) patch(l patchList, v uint32) {
	for l.head != 0 {
		ip := &c.inst[l.head>>1]
		if l.head&1 != 0 {
			l.head = ip.out1
			ip.out1 = v
		} else {
			l.head = ip.out
			ip.out = v
		}
	}
}

func (c *re2Compiler) appendList(l1, l2 patchList) patchList {
	if l1.head == 0 {
		return l2
	}
	if l2.head == 0 {
		return l1
	}
	ip := &c.inst[l1.tail>>1]
	if l1.tail&1 != 0 {
		ip.out1 = l2.head
	} else {
		ip.out = l2.head
	}
	return patchList{l1.head, l2.tail}
}

func mk(p uint32) patchList { return patchList{p, p} }

func (c *re2Compiler) alloc(in re2Inst) int {
	if c.failed || len(c.inst) >= c.max {
		c.failed = true
		return -1
	}
	c.inst = append(c.inst, in)
	return len(c.inst) - 1
}

func (c *re2Compiler) cat(a, b frag) frag {
	if a.begin == 0 || b.begin == 0 {
		return frag{}
	}
	if in := c.inst[a.begin]; in.op == instNop && a.end.head == a.begin<<1 && in.out == 0 {
		c.patch(a.end, b.begin)
		return b
	}
	c.patch(a.end, b.begin)
	return frag{a.begin, b.end, a.nullable && b.nullable}
}

func (c *re2Compiler) alt(a, b frag) frag {
	if a.begin == 0 {
		return b
	}
	if b.begin == 0 {
		return a
	}
	id := c.alloc(re2Inst{op: instAlt, out: a.begin, out1: b.begin})
	if id < 0 {
		return frag{}
	}
	return frag{uint32(id), c.appendList(a.end, b.end), a.nullable || b.nullable}
}

func (c *re2Compiler) loop(a frag, nongreedy bool) (uint32, patchList) {
	id := c.alloc(re2Inst{op: instAlt})
	if id < 0 {
		return 0, patchList{}
	}
	u := uint32(id)
	var pl patchList
	if nongreedy {
		c.inst[u].out1 = a.begin
		pl = mk(u << 1)
	} else {
		c.inst[u].out = a.begin
		pl = mk(u<<1 | 1)
	}
	c.patch(a.end, u)
	return u, pl
}

func (c *re2Compiler) plus(a frag, nongreedy bool) frag {
	id, pl := c.loop(a, nongreedy)
	if id == 0 {
		return frag{}
	}
	return frag{a.begin, pl, a.nullable}
}

func (c *re2Compiler) star(a frag, nongreedy bool) frag {
	if a.nullable {
		return c.quest(c.plus(a, nongreedy), nongreedy)
	}
	id, pl := c.loop(a, nongreedy)
	if id == 0 {
		return frag{}
	}
	return frag{id, pl, true}
}

func (c *re2Compiler) quest(a frag, nongreedy bool) frag {
	if a.begin == 0 {
		return c.nop()
	}
	in := re2Inst{op: instAlt}
	if nongreedy {
		in.out1 = a.begin
	} else {
		in.out = a.begin
	}
	id := c.alloc(in)
	if id < 0 {
		return frag{}
	}
	u := uint32(id)
	pl := mk(u<<1 | 1)
	if nongreedy {
		pl = mk(u << 1)
	}
	return frag{u, c.appendList(pl, a.end), true}
}

func (c *re2Compiler) single(op re2Op, lo, hi uint8, nullable bool) frag {
	id := c.alloc(re2Inst{op: op, lo: lo, hi: hi})
	if id < 0 {
		return frag{}
	}
	return frag{uint32(id), mk(uint32(id) << 1), nullable}
}

func (c *re2Compiler) nop() frag { return c.single(instNop, 0, 0, true) }

func (c *re2Compiler) capture(a frag) frag {
	if a.begin == 0 {
		return frag{}
	}
	id := c.alloc(re2Inst{op: instCapture, out: a.begin})
	id1 := c.alloc(re2Inst{op: instCapture})
	if id < 0 || id1 < 0 {
		return frag{}
	}
	c.patch(a.end, uint32(id1))
	return frag{uint32(id), mk(uint32(id1) << 1), a.nullable}
}

// class compiles a Latin-1 class: one ByteRange per range, joined by Alts,
// after RE2's ASCII case-folding optimization.
func (c *re2Compiler) class(rs []rune) frag {
	contains := func(r rune) bool {
		for i := 0; i+1 < len(rs); i += 2 {
			if rs[i] <= r && r <= rs[i+1] {
				return true
			}
		}
		return false
	}
	foldsASCII := true
	for r := 'a'; r <= 'z'; r++ {
		if contains(r) != contains(r-'a'+'A') {
			foldsASCII = false
			break
		}
	}
	var f frag
	for i := 0; i+1 < len(rs); i += 2 {
		lo, hi := rs[i], min(rs[i+1], latin1Max)
		if lo > hi || (foldsASCII && 'A' <= lo && hi <= 'Z') {
			continue
		}
		b := c.single(instByteRange, uint8(lo), uint8(hi), false)
		if b.begin == 0 {
			return frag{}
		}
		if f.begin == 0 {
			f = b
			continue
		}
		id := c.alloc(re2Inst{op: instAlt, out: f.begin, out1: b.begin})
		if id < 0 {
			return frag{}
		}
		f = frag{uint32(id), c.appendList(f.end, b.end), false}
	}
	return f
}

func (c *re2Compiler) compile(n *re2Node) frag {
	c.visits--
	if c.failed || c.visits < 0 {
		c.failed = true
		return frag{}
	}
	nongreedy := n.flags&syntax.NonGreedy != 0
	switch n.op {
	case syntax.OpNoMatch:
		return frag{}
	case syntax.OpEmptyMatch:
		return c.nop()
	case syntax.OpLiteral:
		if len(n.runes) == 0 {
			return c.nop()
		}
		var f frag
		for i, r := range n.runes {
			r = min(r, latin1Max)
			b := c.single(instByteRange, uint8(r), uint8(r), false)
			if i == 0 {
				f = b
			} else {
				f = c.cat(f, b)
			}
		}
		return f
	case syntax.OpCharClass:
		return c.class(n.runes)
	case syntax.OpAnyChar:
		return c.single(instByteRange, 0, latin1Max, false)
	case syntax.OpBeginLine, syntax.OpEndLine, syntax.OpBeginText, syntax.OpEndText,
		syntax.OpWordBoundary, syntax.OpNoWordBoundary:
		return c.single(instEmptyWidth, 0, 0, true)
	case syntax.OpCapture:
		f := c.compile(n.sub[0])
		if !n.capture {
			return f
		}
		return c.capture(f)
	case syntax.OpStar:
		return c.star(c.compile(n.sub[0]), nongreedy)
	case syntax.OpPlus:
		return c.plus(c.compile(n.sub[0]), nongreedy)
	case syntax.OpQuest:
		return c.quest(c.compile(n.sub[0]), nongreedy)
	case syntax.OpConcat:
		if len(n.sub) == 0 {
			return c.nop()
		}
		f := c.compile(n.sub[0])
		for _, s := range n.sub[1:] {
			f = c.cat(f, c.compile(s))
		}
		return f
	case syntax.OpAlternate:
		if len(n.sub) == 0 {
			return frag{}
		}
		f := c.compile(n.sub[0])
		for _, s := range n.sub[1:] {
			f = c.alt(f, c.compile(s))
		}
		return f
	}
	c.failed = true // OpRepeat cannot survive simplification
	return frag{}
}

// re2Prog is a compiled program before flattening.
type re2Prog struct {
	inst            []re2Inst
	start, unanchor uint32
}

// isMatch: is ip a guaranteed match at end of text, perhaps after captures?
func (p *re2Prog) isMatch(id uint32) bool {
	for {
		switch in := p.inst[id]; in.op {
		case instCapture, instNop:
			id = in.out
		case instMatch:
			return true
		default:
			return false
		}
	}
}

// optimize is Prog::Optimize: skip Nops, and mark the Alt of a trailing
// (?s).* as AltMatch (which flattening emits as an extra instruction).
func (p *re2Prog) optimize() {
	skip := func(j uint32) uint32 {
		for j != 0 && p.inst[j].op == instNop {
			j = p.inst[j].out
		}
		return j
	}
	// bfs walks the instructions reachable from start like RE2's work
	// queue; visitFirst says whether visit runs before the successors of
	// the instruction are queued (the two passes differ).
	bfs := func(visitFirst bool, visit func(id uint32)) {
		if p.start == 0 {
			return
		}
		seen := map[uint32]bool{p.start: true}
		q := []uint32{p.start}
		for i := 0; i < len(q); i++ {
			id := q[i]
			if visitFirst {
				visit(id)
			}
			in := p.inst[id]
			for k, o := range []uint32{in.out, in.out1} {
				if k == 1 && in.op != instAlt {
					break
				}
				if o != 0 && !seen[o] {
					seen[o] = true
					q = append(q, o)
				}
			}
			if !visitFirst {
				visit(id)
			}
		}
	}
	bfs(true, func(id uint32) {
		ip := &p.inst[id]
		if ip.op == instMatch || ip.op == instFail {
			return
		}
		ip.out = skip(ip.out)
		if ip.op == instAlt {
			ip.out1 = skip(ip.out1)
		}
	})
	bfs(false, func(id uint32) {
		ip := &p.inst[id]
		if ip.op != instAlt {
			return
		}
		j, k := p.inst[ip.out], p.inst[ip.out1]
		anyByteLoop := func(in re2Inst) bool {
			return in.op == instByteRange && in.out == id && in.lo == 0 && in.hi == latin1Max
		}
		if (anyByteLoop(j) && p.isMatch(ip.out1)) || (p.isMatch(ip.out) && anyByteLoop(k)) {
			ip.op = instAltMatch
		}
	})
}

// orderedSet is RE2's SparseSet/SparseArray as used by Flatten: membership
// plus insertion order.
type orderedSet struct {
	idx   map[uint32]int
	order []uint32
}

func newOrderedSet() *orderedSet { return &orderedSet{idx: map[uint32]int{}} }

func (s *orderedSet) has(id uint32) bool { _, ok := s.idx[id]; return ok }

func (s *orderedSet) add(id uint32) {
	if !s.has(id) {
		s.idx[id] = len(s.order)
		s.order = append(s.order, id)
	}
}

// flatSize is the size of the program after Prog::Flatten, which is what
// RE2::ProgramSize() reports.
func (p *re2Prog) flatSize() int {
	roots := newOrderedSet()
	preds := map[uint32][]uint32{}

	// MarkSuccessors.
	roots.add(0)
	roots.add(p.unanchor)
	roots.add(p.start)
	reach := map[uint32]bool{}
	stk := []uint32{p.unanchor}
	for len(stk) > 0 {
		id := stk[len(stk)-1]
		stk = stk[:len(stk)-1]
		for !reach[id] {
			reach[id] = true
			in := p.inst[id]
			switch in.op {
			case instAlt, instAltMatch:
				preds[in.out] = append(preds[in.out], id)
				preds[in.out1] = append(preds[in.out1], id)
				stk = append(stk, in.out1)
				id = in.out
				continue
			case instByteRange, instCapture, instEmptyWidth:
				roots.add(in.out)
				id = in.out
				continue
			case instNop:
				id = in.out
				continue
			}
			break
		}
	}

	// walk floods the tree of root, stopping at leaves and other roots, and
	// calls emit for each instruction reached, in RE2's order.
	walk := func(root uint32, emit func(id uint32, otherRoot bool)) *orderedSet {
		seen := newOrderedSet()
		stk := []uint32{root}
		for len(stk) > 0 {
			id := stk[len(stk)-1]
			stk = stk[:len(stk)-1]
			for !seen.has(id) {
				seen.add(id)
				if id != root && roots.has(id) {
					emit(id, true)
					break
				}
				in := p.inst[id]
				emit(id, false)
				if in.op == instAlt || in.op == instAltMatch {
					stk = append(stk, in.out1)
					id = in.out
					continue
				}
				if in.op == instNop {
					id = in.out
					continue
				}
				break
			}
		}
		return seen
	}

	// MarkDominator, over the successor roots from the highest id down,
	// leaving out the lowest (the Fail instruction) and the two starts.
	sorted := slices.Clone(roots.order)
	slices.Sort(sorted)
	for i := len(sorted) - 1; i > 0; i-- {
		root := sorted[i]
		if root == p.unanchor || root == p.start {
			continue
		}
		seen := walk(root, func(uint32, bool) {})
		for _, id := range seen.order {
			for _, pred := range preds[id] {
				if !seen.has(pred) {
					roots.add(id)
				}
			}
		}
	}

	// EmitList for every root.
	size := 0
	for i := 0; i < len(roots.order); i++ {
		walk(roots.order[i], func(id uint32, otherRoot bool) {
			if otherRoot {
				size++ // a Nop to the other list
				return
			}
			switch p.inst[id].op {
			case instAltMatch, instByteRange, instCapture, instEmptyWidth, instMatch, instFail:
				size++
			}
		})
	}
	return size
}

// re2ProgramSize returns the RE2::ProgramSize() Envoy would compute for a
// regex that regexp/syntax accepts (Latin-1 encoding, default options), or
// errTooComplex.
func re2ProgramSize(pattern string) (int, error) {
	n, err := parseRE2(pattern)
	if err != nil {
		return 0, err
	}
	if suffix, ok := requiredPrefix(n); ok {
		n = suffix
	}
	n = coalesce(n)
	s := &simplifier{budget: 100000}
	n, err = s.simplify(n)
	if err != nil {
		return 0, err
	}
	first := func([]*re2Node) int { return 0 }
	last := func(subs []*re2Node) int { return len(subs) - 1 }
	n, anchored := stripAnchor(n, 0, first, syntax.OpBeginText)
	n, _ = stripAnchor(n, 0, last, syntax.OpEndText)

	c := &re2Compiler{max: 100000, visits: 1000000}
	c.alloc(re2Inst{op: instFail})
	all := c.compile(n)
	if id := c.alloc(re2Inst{op: instMatch}); id > 0 {
		all = c.cat(all, frag{begin: uint32(id)})
	}
	if c.failed {
		return 0, errTooComplex
	}
	p := &re2Prog{start: all.begin}
	if !anchored {
		dot := c.single(instByteRange, 0, latin1Max, false)
		all = c.cat(c.star(dot, true), all)
	}
	p.unanchor = all.begin
	if c.failed {
		return 0, errTooComplex
	}
	p.inst = c.inst
	if p.start == 0 && p.unanchor == 0 {
		return 1, nil // no possible match: only the Fail instruction
	}
	p.optimize()
	return p.flatSize(), nil
}
