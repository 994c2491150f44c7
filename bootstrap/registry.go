package bootstrap

import (
	"context"
	"crypto/subtle"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/meshid/sds-server/issuer"
	"github.com/meshid/sds-server/store"
)

// Bucket is the store bucket holding token records, keyed by Token.ID.
const Bucket = "tokens"

// Reasons a token is refused, in AuthError.Reason.
const (
	ReasonMissing   = "missing"    // no token on the stream
	ReasonMalformed = "malformed"  // not a well-formed SDSTKN-1 token
	ReasonWrongRoot = "wrong_root" // pins a root CA the server does not trust
	ReasonUnknown   = "unknown"    // never issued here, or deleted
	ReasonRevoked   = "revoked"    // revoked by an operator
	ReasonExpired   = "expired"    // past its expiry: admits no new node
	ReasonExhausted = "exhausted"  // use limit reached: admits no new node
)

// ErrInvalidID is wrapped by registry errors about a token ID that cannot
// be one (wrong length or alphabet).
var ErrInvalidID = errors.New("invalid bootstrap token ID")

// Record is what the registry keeps about a token. It never holds the
// secret, only its SHA-256.
type Record struct {
	// ID is the token's public ID (Token.ID), the key in the store.
	ID string `json:"id"`
	// Service and Env are the identity the token admits nodes as.
	Service string `json:"service"`
	Env     string `json:"env"`
	// Digest is the base36 digest of the root CA the token pins.
	Digest string `json:"digest"`
	// SecretHash is the SHA-256 of the secret, compared in constant time.
	SecretHash []byte `json:"secret_hash"`
	// CreatedAt and ExpiresAt bound the period in which the token admits
	// new nodes.
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
	// MaxUses limits how many nodes the token admits; 0 means unlimited.
	MaxUses int `json:"max_uses"`
	// Uses counts the nodes admitted so far.
	Uses int `json:"uses"`
	// Revoked tokens authenticate nothing and admit no node, from
	// RevokedAt on.
	Revoked   bool      `json:"revoked"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	// LastUsedAt is when the token last admitted a node.
	LastUsedAt time.Time `json:"last_used_at,omitzero"`
}

// Status summarises the record at now for listings: "revoked", "expired",
// "exhausted" or "active".
func (r Record) Status(now time.Time) string {
	switch {
	case r.Revoked:
		return ReasonRevoked
	case !now.Before(r.ExpiresAt):
		return ReasonExpired
	case r.MaxUses > 0 && r.Uses >= r.MaxUses:
		return ReasonExhausted
	default:
		return "active"
	}
}

// AuthError is why a token was refused. Reason is one of the Reason*
// constants; Denied is true when the token is genuine but no longer admits
// (revoked, expired, exhausted: gRPC PermissionDenied) and false when the
// caller is not authenticated at all (gRPC Unauthenticated). Error() is a
// one-line message for the user that never contains the secret.
type AuthError struct {
	Reason string
	Denied bool
	msg    string
	cause  error
}

// Error returns the one-line, user-facing message.
func (e *AuthError) Error() string { return e.msg }

// Unwrap returns the underlying cause, if any (store.ErrNotFound for
// unknown tokens).
func (e *AuthError) Unwrap() error { return e.cause }

// AsAuthError returns the AuthError in err's chain, if there is one.
func AsAuthError(err error) (*AuthError, bool) {
	var ae *AuthError
	if errors.As(err, &ae) {
		return ae, true
	}
	return nil, false
}

const createHint = "create a new one with `sds-server token create`"

func authErr(reason string, cause error, format string, args ...any) *AuthError {
	denied := reason == ReasonRevoked || reason == ReasonExpired || reason == ReasonExhausted
	return &AuthError{Reason: reason, Denied: denied, msg: fmt.Sprintf(format, args...), cause: cause}
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

func revokedErr(r Record) *AuthError {
	return authErr(ReasonRevoked, nil, "bootstrap token %s was revoked at %s; %s", r.ID, stamp(r.RevokedAt), createHint)
}

func expiredErr(r Record) *AuthError {
	return authErr(ReasonExpired, nil, "bootstrap token %s expired at %s; %s", r.ID, stamp(r.ExpiresAt), createHint)
}

func exhaustedErr(r Record) *AuthError {
	return authErr(ReasonExhausted, nil, "bootstrap token %s has admitted %d of its %d allowed nodes; %s", r.ID, r.Uses, r.MaxUses, createHint)
}

func unknownErr(id string) *AuthError {
	return authErr(ReasonUnknown, store.ErrNotFound, "unknown bootstrap token %s: this server never issued it or it was deleted; %s", id, createHint)
}

// Registry persists tokens in a store.Store and authenticates them.
// It is safe for concurrent use (the store serialises updates).
type Registry struct {
	kv  store.Store
	now func() time.Time
}

// NewRegistry returns a registry on kv. now is the clock (time.Now if nil);
// tests pass a fake one.
func NewRegistry(kv store.Store, now func() time.Time) *Registry {
	if now == nil {
		now = time.Now
	}
	return &Registry{kv: kv, now: now}
}

func (r *Registry) clock() time.Time { return r.now().UTC().Round(0) }

// CreateOptions describes a new token.
type CreateOptions struct {
	// Service and Env are the identity the token admits nodes as.
	Service, Env string
	// TTL is how long the token admits new nodes; must be positive (the
	// caller applies any default).
	TTL time.Duration
	// MaxUses limits the nodes the token admits; 0 means unlimited.
	MaxUses int
}

var errIDTaken = errors.New("token ID already taken")

// Create makes a token pinning root for opts and stores its record. It
// returns the token text, to be shown once (it is not stored anywhere), and
// the record.
func (r *Registry) Create(ctx context.Context, opts CreateOptions, root *x509.Certificate) (string, Record, error) {
	if err := issuer.ValidateName("service", opts.Service); err != nil {
		return "", Record{}, fmt.Errorf("create bootstrap token: %w", err)
	}
	if err := issuer.ValidateName("environment", opts.Env); err != nil {
		return "", Record{}, fmt.Errorf("create bootstrap token: %w", err)
	}
	if opts.TTL <= 0 {
		return "", Record{}, fmt.Errorf("create bootstrap token: lifetime %s must be positive", opts.TTL)
	}
	if opts.MaxUses < 0 {
		return "", Record{}, fmt.Errorf("create bootstrap token: use limit %d must be 0 (unlimited) or more", opts.MaxUses)
	}
	// A 64-bit ID collision is all but impossible; retry anyway rather than
	// overwrite another token's record.
	for attempt := 0; ; attempt++ {
		tok, err := New(root)
		if err != nil {
			return "", Record{}, err
		}
		now := r.clock()
		rec := Record{
			ID:         tok.ID(),
			Service:    opts.Service,
			Env:        opts.Env,
			Digest:     tok.Digest,
			SecretHash: tok.SecretHash(),
			CreatedAt:  now,
			ExpiresAt:  now.Add(opts.TTL),
			MaxUses:    opts.MaxUses,
		}
		data, err := json.Marshal(rec)
		if err != nil {
			return "", Record{}, fmt.Errorf("create bootstrap token: encode record: %w", err)
		}
		err = r.kv.Update(ctx, Bucket, rec.ID, func(old []byte) ([]byte, error) {
			if old != nil {
				return nil, errIDTaken
			}
			return data, nil
		})
		if errors.Is(err, errIDTaken) && attempt < 3 {
			continue
		}
		if err != nil {
			return "", Record{}, fmt.Errorf("create bootstrap token: store record: %w", err)
		}
		return tok.String(), rec, nil
	}
}

// List returns every token record, oldest first.
func (r *Registry) List(ctx context.Context) ([]Record, error) {
	var out []Record
	err := r.kv.List(ctx, Bucket, func(key string, value []byte) error {
		var rec Record
		if err := json.Unmarshal(value, &rec); err != nil {
			return fmt.Errorf("decode token record %s: %w", key, err)
		}
		out = append(out, rec)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list bootstrap tokens: %w", err)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// resolveID accepts a token ID or, for convenience, the token text itself
// (mapped to its ID, never echoed).
func resolveID(s string) (string, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, TokenPrefix+"-") {
		tok, err := Parse(s)
		if err != nil {
			return "", fmt.Errorf("%w: %w", ErrInvalidID, err)
		}
		return tok.ID(), nil
	}
	if len(s) != IDLen || strings.Trim(s, "0123456789abcdef") != "" {
		return "", fmt.Errorf("%w: want %d lower-case hex characters as shown by `sds-server token list`", ErrInvalidID, IDLen)
	}
	return s, nil
}

// Get returns the record of the token with ID id (or of the token text id).
// An unknown ID gives an error wrapping store.ErrNotFound.
func (r *Registry) Get(ctx context.Context, id string) (Record, error) {
	id, err := resolveID(id)
	if err != nil {
		return Record{}, err
	}
	data, err := r.kv.Get(ctx, Bucket, id)
	if errors.Is(err, store.ErrNotFound) {
		return Record{}, fmt.Errorf("no bootstrap token with ID %s: %w", id, err)
	}
	if err != nil {
		return Record{}, fmt.Errorf("read bootstrap token %s: %w", id, err)
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		return Record{}, fmt.Errorf("decode bootstrap token %s: %w", id, err)
	}
	return rec, nil
}

// Revoke revokes the token with ID id (or of the token text id): from now
// on it authenticates nothing. Revoking twice is not an error and keeps the
// first RevokedAt. An unknown ID gives an error wrapping store.ErrNotFound.
// Closing the streams already open with it and stopping its nodes'
// renewals is the caller's job (sds.Server.RevokeToken does both).
func (r *Registry) Revoke(ctx context.Context, id string) (Record, error) {
	id, err := resolveID(id)
	if err != nil {
		return Record{}, err
	}
	now := r.clock()
	var rec Record
	err = r.kv.Update(ctx, Bucket, id, func(old []byte) ([]byte, error) {
		if old == nil {
			return nil, fmt.Errorf("no bootstrap token with ID %s: %w", id, store.ErrNotFound)
		}
		var cur Record
		if err := json.Unmarshal(old, &cur); err != nil {
			return nil, fmt.Errorf("decode bootstrap token %s: %w", id, err)
		}
		if !cur.Revoked {
			cur.Revoked, cur.RevokedAt = true, now
		}
		rec = cur
		return json.Marshal(cur)
	})
	if err != nil {
		return Record{}, fmt.Errorf("revoke bootstrap token: %w", err)
	}
	return rec, nil
}

// Rotate replaces the token with ID id by a new one for the same service
// and environment, with the same lifetime and use limit, pinning root, and
// revokes the old one. It returns the new token text (shown once) and
// record.
func (r *Registry) Rotate(ctx context.Context, id string, root *x509.Certificate) (string, Record, error) {
	old, err := r.Get(ctx, id)
	if err != nil {
		return "", Record{}, fmt.Errorf("rotate bootstrap token: %w", err)
	}
	text, rec, err := r.Create(ctx, CreateOptions{
		Service: old.Service,
		Env:     old.Env,
		TTL:     old.ExpiresAt.Sub(old.CreatedAt),
		MaxUses: old.MaxUses,
	}, root)
	if err != nil {
		return "", Record{}, fmt.Errorf("rotate bootstrap token %s: %w", old.ID, err)
	}
	if _, err := r.Revoke(ctx, old.ID); err != nil {
		return "", Record{}, fmt.Errorf("rotate bootstrap token %s: new token %s created but the old one is still valid: %w", old.ID, rec.ID, err)
	}
	return text, rec, nil
}

// Authenticate checks the credential of an xDS stream. raw is the token
// text (an "authorization" metadata value with its "Bearer " scheme is
// accepted too); roots is the current trust bundle. In order: no token ->
// missing; unparsable -> malformed; pinning no root in roots -> wrong_root;
// no record or secret mismatch -> unknown; revoked -> revoked. Expiry and
// use limits govern admitting new nodes and are checked by Admit, not here.
// Refusals are *AuthError; other errors are store failures.
func (r *Registry) Authenticate(ctx context.Context, raw string, roots []*x509.Certificate) (Record, error) {
	raw = stripBearer(raw)
	if raw == "" {
		return Record{}, authErr(ReasonMissing, nil, "no bootstrap token: send `authorization: Bearer SDSTKN-…` as gRPC metadata (`sds-server bootstrap envoy` writes it into the Envoy bootstrap)")
	}
	tok, err := Parse(raw)
	if err != nil {
		return Record{}, authErr(ReasonMalformed, nil, "malformed bootstrap token: %v", err)
	}
	if _, ok := tok.PinsRoot(roots); !ok {
		return Record{}, wrongRootErr(tok)
	}
	return r.lookup(ctx, tok)
}

// stripBearer trims raw and its "Bearer " scheme, if any.
func stripBearer(raw string) string {
	raw = strings.TrimSpace(raw)
	if len(raw) >= 6 && strings.EqualFold(raw[:6], "bearer") && (len(raw) == 6 || raw[6] == ' ' || raw[6] == '\t') {
		raw = strings.TrimSpace(raw[6:])
	}
	return raw
}

func wrongRootErr(tok Token) *AuthError {
	return authErr(ReasonWrongRoot, nil, "bootstrap token %s pins a root CA this server does not trust (digest mismatch): it belongs to another server or predates a CA rotation; %s", tok.ID(), createHint)
}

// AuthenticateStale is Authenticate for a token Authenticate refused with
// ReasonWrongRoot: it accepts the token if this registry holds it (secret
// and pinned digest as recorded) and it is not revoked, whatever root it
// pins. Such a token was created by this server before a root rotation
// removed its root from the bundle. The caller may let it authenticate the
// nodes it already admitted (sidecars bootstrapped before the rotation
// reconnect with the token in their bootstrap), never admit new ones.
func (r *Registry) AuthenticateStale(ctx context.Context, raw string) (Record, error) {
	raw = stripBearer(raw)
	tok, err := Parse(raw)
	if err != nil {
		return Record{}, authErr(ReasonMalformed, nil, "malformed bootstrap token: %v", err)
	}
	rec, err := r.lookup(ctx, tok)
	if ae, ok := AsAuthError(err); ok && ae.Reason == ReasonUnknown {
		// Not ours: the wrong root is the better explanation.
		return Record{}, wrongRootErr(tok)
	}
	return rec, err
}

// lookup checks tok against its record: unknown, revoked or the record.
func (r *Registry) lookup(ctx context.Context, tok Token) (Record, error) {
	id := tok.ID()
	data, err := r.kv.Get(ctx, Bucket, id)
	if errors.Is(err, store.ErrNotFound) {
		return Record{}, unknownErr(id)
	}
	if err != nil {
		return Record{}, fmt.Errorf("authenticate bootstrap token %s: %w", id, err)
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		return Record{}, fmt.Errorf("authenticate bootstrap token %s: decode record: %w", id, err)
	}
	hashOK := subtle.ConstantTimeCompare(rec.SecretHash, tok.SecretHash())
	digestOK := subtle.ConstantTimeCompare([]byte(rec.Digest), []byte(tok.Digest))
	if hashOK&digestOK != 1 {
		return Record{}, unknownErr(id)
	}
	if rec.Revoked {
		return Record{}, revokedErr(rec)
	}
	return rec, nil
}

// Admit counts one more node admitted with the token id, atomically: it
// refuses (with an *AuthError) a token that is revoked, expired (now at or
// after ExpiresAt) or exhausted (MaxUses reached), and otherwise increments
// Uses and returns the updated record. Call it when a new node joins, after
// Authenticate; a refusal changes nothing.
func (r *Registry) Admit(ctx context.Context, id string) (Record, error) {
	id, err := resolveID(id)
	if err != nil {
		return Record{}, authErr(ReasonUnknown, err, "unknown bootstrap token: %v", err)
	}
	now := r.clock()
	var rec Record
	err = r.kv.Update(ctx, Bucket, id, func(old []byte) ([]byte, error) {
		var b []byte
		var err error
		b, rec, err = admitRecord(id, old, now)
		return b, err
	})
	return admitResult(id, rec, err)
}

// AdmitIn is Admit inside the store transaction tx, so that the token's use
// is written in the same commit as the node it admits (one durable write
// per admission, never a use without its node or the reverse). Like tx's
// function it has no side effect but on tx and may run more than once.
func (r *Registry) AdmitIn(tx store.Txn, id string) (Record, error) {
	id, err := resolveID(id)
	if err != nil {
		return Record{}, authErr(ReasonUnknown, err, "unknown bootstrap token: %v", err)
	}
	old, err := tx.Get(Bucket, id)
	if errors.Is(err, store.ErrNotFound) {
		old, err = nil, nil
	}
	if err != nil {
		return admitResult(id, Record{}, err)
	}
	b, rec, err := admitRecord(id, old, r.clock())
	if err == nil {
		err = tx.Put(Bucket, id, b)
	}
	return admitResult(id, rec, err)
}

// admitRecord checks the stored record old of token id and returns it with
// one more use, or the refusal.
func admitRecord(id string, old []byte, now time.Time) ([]byte, Record, error) {
	if old == nil {
		return nil, Record{}, unknownErr(id)
	}
	var cur Record
	if err := json.Unmarshal(old, &cur); err != nil {
		return nil, Record{}, fmt.Errorf("decode bootstrap token %s: %w", id, err)
	}
	switch {
	case cur.Revoked:
		return nil, Record{}, revokedErr(cur)
	case !now.Before(cur.ExpiresAt):
		return nil, Record{}, expiredErr(cur)
	case cur.MaxUses > 0 && cur.Uses >= cur.MaxUses:
		return nil, Record{}, exhaustedErr(cur)
	}
	cur.Uses++
	cur.LastUsedAt = now
	b, err := json.Marshal(cur)
	if err != nil {
		return nil, Record{}, fmt.Errorf("encode bootstrap token %s: %w", id, err)
	}
	return b, cur, nil
}

// admitResult gives Admit's errors their form: refusals as they are,
// store failures wrapped.
func admitResult(id string, rec Record, err error) (Record, error) {
	if err != nil {
		if ae, ok := AsAuthError(err); ok {
			return Record{}, ae
		}
		return Record{}, fmt.Errorf("admit node with bootstrap token %s: %w", id, err)
	}
	return rec, nil
}
