// Package authz owns the access-control format of sds-server: the per-service
// ACL files operators write, their validation, and their compilation to the
// Envoy RBAC HTTP filter that the server pushes over ECDS.
//
// An ACL lists who may call a destination service, in the format of Square's
// "one app, one ID" talk:
//
//	[ { "permission": { "method": "GET", "resource": "/user/[0-9]+" },
//	    "allow": [ "web", "staging/web" ] },
//	  { "permission": { "method": "*", "resource": "/healthz" },
//	    "allow": [ "*" ] } ]
//
// resource is an RE2 regular expression matched against the whole request
// path, without the query string. allow names services of the destination's
// environment ("web"), of another environment ("staging/web"), or any
// workload of the mesh ("*"). Anything not allowed is denied, so an empty list
// denies every request.
//
// Problems are reported as "<file>:entry <N>: <reason>", where N counts the
// entries of the file from 1. Compiled policies are named "entry-<N>" with
// the same N (zero-padded), so Envoy's logs and stats point at the same entry.
//
// The package does not depend on the server (package sds): it turns bytes
// and directories into validated ACLs, and ACLs into Envoy protos.
package authz

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/meshid/sds-server/issuer"
)

// Permission is what an ACL entry grants: an HTTP method and a set of paths.
type Permission struct {
	// Method is an HTTP method in upper case (GET, HEAD, POST, PUT, DELETE,
	// PATCH, OPTIONS, CONNECT, TRACE), or "*" for any method. Quote "*" in
	// YAML, where a bare * starts an alias.
	Method string `json:"method"`
	// Resource is an RE2 regular expression that must match the whole path
	// (the query string excluded). It is limited to ASCII, since Envoy sees
	// paths percent-encoded, and to what Envoy's regex size limit accepts.
	Resource string `json:"resource"`
}

// Entry grants a permission to the callers listed in Allow.
type Entry struct {
	Permission Permission `json:"permission"`
	// Allow lists the callers: "service" (same environment as the
	// destination), "env/service", or "*" for any workload of the mesh.
	Allow []string `json:"allow"`
}

// ACL is the access-control list of one destination service: the entries
// in file order. An empty ACL allows nothing.
type ACL []Entry

// methods lists the HTTP methods an entry may name, besides "*".
var methods = []string{"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}

// AnyMethod and AnyCaller are the wildcards of Permission.Method and
// Entry.Allow.
const (
	AnyMethod = "*"
	AnyCaller = "*"
)

// ParseError reports an ACL file that cannot be read as the format, with the
// position of the problem where it is known (Line and Col from 1, Entry from
// 1; zero when unknown).
type ParseError struct {
	File  string
	Line  int
	Col   int
	Entry int
	Err   error
}

// Error returns "file:line:col: entry N: reason", leaving out what is not
// known; without a position it reads "file:entry N: reason", as a Problem.
func (e *ParseError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	switch {
	case e.Line > 0:
		fmt.Fprintf(&b, ":%d:%d: ", e.Line, e.Col)
		if e.Entry > 0 {
			fmt.Fprintf(&b, "entry %d: ", e.Entry)
		}
	case e.Entry > 0:
		fmt.Fprintf(&b, ":entry %d: ", e.Entry)
	default:
		b.WriteString(": ")
	}
	b.WriteString(e.Err.Error())
	return b.String()
}

func (e *ParseError) Unwrap() error { return e.Err }

// describedError replaces the message of an error it wraps.
type describedError struct {
	msg string
	err error
}

func (e *describedError) Error() string { return e.msg }

func (e *describedError) Unwrap() error { return e.err }

func describe(err error, format string, args ...any) error {
	return &describedError{msg: fmt.Sprintf(format, args...), err: err}
}

// Format names an ACL file format.
type Format string

// The formats Parse reads. YAML has the same schema as JSON.
const (
	JSON Format = "json"
	YAML Format = "yaml"
)

// FormatOf returns the format of an ACL file from its extension (.json,
// .yaml or .yml, lower case), or false.
func FormatOf(filename string) (Format, bool) {
	switch filepath.Ext(filename) {
	case ".json":
		return JSON, true
	case ".yaml", ".yml":
		return YAML, true
	}
	return "", false
}

// Parse reads an ACL file; filename picks the format (see FormatOf) and
// prefixes every error. Parsing is strict: the top level must be the list of
// entries, and unknown or duplicate fields at any level are errors, because a
// misspelt field in an access policy must not silently mean something else.
// Parse checks the shape only; call Validate for the values.
func Parse(data []byte, filename string) (ACL, error) {
	format, ok := FormatOf(filename)
	if !ok {
		return nil, &ParseError{File: filename, Err: errors.New("unsupported file extension: use .json, .yaml or .yml")}
	}
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf")) // a UTF-8 byte order mark
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, &ParseError{File: filename, Err: errors.New("file is empty; write [] for an ACL that allows nothing")}
	}
	js := data
	if format == YAML {
		var err error
		if js, err = yamlToJSON(data); err != nil {
			return nil, &ParseError{File: filename, Err: err}
		}
	}
	return parseJSON(js, filename, format == JSON)
}

// yamlToJSON converts YAML to the equivalent JSON, rejecting duplicate keys.
// It follows YAML 1.1, so a bare yes, no, on or off is a boolean: the type
// errors of decodeEntry say to quote it.
func yamlToJSON(data []byte) ([]byte, error) {
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		msg := strings.Join(strings.Fields(err.Error()), " ") // one line
		if strings.Contains(msg, "did not find expected alphabetic or numeric character") {
			msg += ` (a bare * starts an alias: write "*")`
		}
		return nil, describe(err, "invalid YAML: %s", msg)
	}
	return js, nil
}

// parseJSON decodes the list entry by entry so that errors can name the
// entry; positions are reported only for JSON input (for YAML, js is a
// conversion and its offsets mean nothing to the author).
func parseJSON(js []byte, file string, positions bool) (ACL, error) {
	fail := func(off int64, entry int, err error) error {
		pe := &ParseError{File: file, Entry: entry, Err: err}
		if positions && off >= 0 {
			pe.Line, pe.Col = lineCol(js, off)
		}
		return pe
	}
	// Check the syntax first over the whole input: json.Unmarshal reports
	// exact offsets, where a streaming decoder's can point a token early.
	var v any
	if err := json.Unmarshal(js, &v); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			off := se.Offset - 1 // the offending byte
			if strings.HasPrefix(se.Error(), "unexpected end") {
				off = int64(len(js))
			}
			return nil, fail(off, 0, describe(err, "invalid JSON: %v", err))
		}
		return nil, fail(-1, 0, describe(err, "invalid JSON: %v", err))
	}
	switch v.(type) {
	case []any:
	case map[string]any:
		return nil, fail(skipSpace(js, 0), 0, errors.New("the top level must be a list of entries, not an object"))
	case nil:
		return nil, fail(skipSpace(js, 0), 0, errors.New("the top level is null; write [] for an ACL that allows nothing"))
	default:
		return nil, fail(skipSpace(js, 0), 0, fmt.Errorf("the top level must be a list of entries, not %s", article(jsonType(v))))
	}

	// The input is a valid JSON list: decode it entry by entry.
	dec := json.NewDecoder(bytes.NewReader(js))
	if _, err := dec.Token(); err != nil { // the opening [
		return nil, fail(-1, 0, err)
	}
	acl := ACL{}
	for dec.More() {
		n := len(acl) + 1
		off := skipSpace(js, dec.InputOffset())
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, fail(off, n, err)
		}
		e, err := decodeEntry(raw)
		if err != nil {
			return nil, fail(off, n, err)
		}
		acl = append(acl, e)
	}
	return acl, nil
}

// decodeEntry checks the field names of one entry exactly (encoding/json
// alone would accept "Method" for "method" and keep the last of duplicate
// fields), then decodes it.
func decodeEntry(raw json.RawMessage) (Entry, error) {
	var e Entry
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := checkFields(dec, "entry"); err != nil {
		return e, err
	}
	dec = json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return e, describe(err, "%s: got %s, want %s", fieldName(te.Field, "the entry"), article(te.Value), kindName(te.Type))
		}
		return e, err
	}
	return e, nil
}

// schema lists the fields each object level of an entry may hold; a level
// not listed holds no objects of ours.
var schema = map[string][]string{
	"entry":      {"permission", "allow"},
	"permission": {"method", "resource"},
}

// checkFields walks one JSON value, rejecting unknown and duplicate fields in
// the objects that schema describes and duplicate fields anywhere.
func checkFields(dec *json.Decoder, level string) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	switch tok {
	case json.Delim('{'):
		seen := map[string]bool{}
		for dec.More() {
			t, err := dec.Token()
			if err != nil {
				return err
			}
			key, _ := t.(string)
			where := ""
			if level != "entry" {
				where = " in " + level
			}
			if seen[key] {
				return fmt.Errorf("duplicate field %q%s", key, where)
			}
			seen[key] = true
			next := ""
			if fields, ok := schema[level]; ok {
				if !slices.Contains(fields, key) {
					return fmt.Errorf("unknown field %q%s (want %s)", key, where, quoteList(fields))
				}
				next = key
			}
			if err := checkFields(dec, next); err != nil {
				return err
			}
		}
		_, err = dec.Token()
		return err
	case json.Delim('['):
		for dec.More() {
			if err := checkFields(dec, ""); err != nil {
				return err
			}
		}
		_, err = dec.Token()
		return err
	}
	return nil
}

func quoteList(s []string) string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = strconv.Quote(v)
	}
	return strings.Join(q, " and ")
}

func fieldName(field, whole string) string {
	if field == "" {
		return whole
	}
	return strconv.Quote(field)
}

func kindName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Struct:
		return "an object"
	case reflect.Slice:
		return "a list of " + strings.TrimPrefix(kindName(t.Elem()), "a ") + "s"
	case reflect.String:
		return "a string"
	}
	return t.String()
}

// jsonType names the type of a value decoded into an any, as
// json.UnmarshalTypeError.Value does.
func jsonType(v any) string {
	switch v.(type) {
	case bool:
		return "bool"
	case float64:
		return "number"
	case string:
		return "string"
	}
	return "value"
}

// article names the JSON type of a value encoding/json could not decode.
func article(v string) string {
	switch v {
	case "object":
		return "an object"
	case "array":
		return "a list"
	case "bool":
		return "a boolean (in YAML, quote yes, no, on, off)"
	case "number", "string":
		return "a " + v
	}
	return v
}

// skipSpace skips white space and commas: the decoder's offset between two
// list elements is before the comma.
func skipSpace(b []byte, off int64) int64 {
	for off < int64(len(b)) && strings.IndexByte(" \t\r\n,", b[off]) >= 0 {
		off++
	}
	return off
}

func lineCol(b []byte, off int64) (line, col int) {
	off = min(max(off, 0), int64(len(b)))
	prefix := b[:off]
	line = bytes.Count(prefix, []byte("\n")) + 1
	col = int(off) - (bytes.LastIndexByte(prefix, '\n') + 1) + 1
	return line, col
}

// Problem is one thing wrong with an ACL: a reason, the file, and the entry
// it concerns (from 1; 0 for the file as a whole).
type Problem struct {
	File   string
	Entry  int
	Reason string
}

func (p Problem) String() string {
	if p.Entry == 0 {
		return p.File + ": " + p.Reason
	}
	return fmt.Sprintf("%s:entry %d: %s", p.File, p.Entry, p.Reason)
}

// ValidationError lists every problem Validate found, in entry order.
type ValidationError struct {
	Problems []Problem
}

// Error returns the problems one per line, each as "file:entry N: reason".
func (e *ValidationError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Validate checks every entry and returns a *ValidationError listing all the
// problems, or nil. file prefixes the problems. env is the destination's
// environment, used to spot "web" and "<env>/web" naming the same caller;
// pass "" when it is not known.
//
// Rules: the method is GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS,
// CONNECT, TRACE or "*"; the resource is a non-empty ASCII RE2 regex of at
// most MaxResourceLen bytes whose RE2 program fits RegexProgramBudget (so
// that Envoy accepts it); allow is non-empty, each caller is "service",
// "env/service" or "*" with valid names, no caller is listed twice, and "*"
// stands alone.
func (a ACL) Validate(file, env string) error {
	var probs []Problem
	add := func(entry int, format string, args ...any) {
		probs = append(probs, Problem{File: file, Entry: entry, Reason: fmt.Sprintf(format, args...)})
	}
	for i, e := range a {
		n := i + 1
		if reason := checkMethod(e.Permission.Method); reason != "" {
			add(n, "%s", reason)
		}
		if reason := checkResource(e.Permission.Resource); reason != "" {
			add(n, "%s", reason)
		}
		if len(e.Allow) == 0 {
			add(n, "allow is empty: the entry would allow nothing (remove it instead)")
		}
		seen := map[string]string{}
		for _, c := range e.Allow {
			if reason := checkCaller(c); reason != "" {
				add(n, "%s", reason)
				continue
			}
			key := c
			if env != "" && !strings.Contains(c, "/") && c != AnyCaller {
				key = env + "/" + c
			}
			if prev, dup := seen[key]; dup {
				if prev == c {
					add(n, "allow lists %q twice", c)
				} else {
					add(n, "allow lists %q and %q, the same caller in environment %q", prev, c, env)
				}
				continue
			}
			seen[key] = c
		}
		if _, star := seen[AnyCaller]; star && len(seen) > 1 {
			add(n, "allow lists \"*\", which already allows every workload, with other callers")
		}
	}
	if len(probs) == 0 {
		return nil
	}
	return &ValidationError{Problems: probs}
}

func checkMethod(m string) string {
	switch {
	case m == AnyMethod || slices.Contains(methods, m):
		return ""
	case m == "":
		return `method is missing (use "*" for any method)`
	case slices.Contains(methods, strings.ToUpper(m)):
		return fmt.Sprintf("method %q must be upper case: %q", m, strings.ToUpper(m))
	}
	return fmt.Sprintf("method %q is not one of %s or \"*\"", m, strings.Join(methods, ", "))
}

// checkCaller checks the syntax of one allow item.
func checkCaller(c string) string {
	if c == AnyCaller {
		return ""
	}
	env, svc, qualified := strings.Cut(c, "/")
	if !qualified {
		if err := issuer.ValidateName("service", c); err != nil {
			return fmt.Sprintf("allow %q: %v", c, err)
		}
		return ""
	}
	if strings.Contains(svc, "/") {
		return fmt.Sprintf("allow %q: use \"service\", \"env/service\" or \"*\"", c)
	}
	if svc == AnyCaller {
		return fmt.Sprintf("allow %q: a whole environment cannot be allowed; list its services, or use \"*\" for every workload", c)
	}
	if err := issuer.ValidateName("environment", env); err != nil {
		return fmt.Sprintf("allow %q: %v", c, err)
	}
	if err := issuer.ValidateName("service", svc); err != nil {
		return fmt.Sprintf("allow %q: %v", c, err)
	}
	return ""
}
