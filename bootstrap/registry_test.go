package bootstrap

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/sds-server/store"
)

// recordingStore remembers every value written, in any bucket, so tests can
// check that no secret ever reaches the store.
type recordingStore struct {
	store.Store
	mu     sync.Mutex
	writes [][]byte
}

func (s *recordingStore) note(b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes = append(s.writes, append([]byte(nil), b...))
}

func (s *recordingStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	s.note([]byte(bucket + "/" + key))
	s.note(value)
	return s.Store.Put(ctx, bucket, key, value)
}

func (s *recordingStore) Update(ctx context.Context, bucket, key string, fn func([]byte) ([]byte, error)) error {
	s.note([]byte(bucket + "/" + key))
	return s.Store.Update(ctx, bucket, key, func(old []byte) ([]byte, error) {
		v, err := fn(old)
		if err == nil {
			s.note(v)
		}
		return v, err
	})
}

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type fixture struct {
	reg   *Registry
	kv    *recordingStore
	clock *fakeClock
	pki   *testPKI
	roots []*x509.Certificate
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	kv := &recordingStore{Store: store.NewMemory()}
	t.Cleanup(func() { _ = kv.Close() })
	clock := &fakeClock{t: time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)}
	p := newPKI(t, "mesh", "")
	return &fixture{reg: NewRegistry(kv, clock.Now), kv: kv, clock: clock, pki: p, roots: []*x509.Certificate{p.root}}
}

func (f *fixture) create(t *testing.T, opts CreateOptions) (string, Record) {
	t.Helper()
	if opts.Service == "" {
		opts.Service = "web"
	}
	if opts.Env == "" {
		opts.Env = "prod"
	}
	if opts.TTL == 0 {
		opts.TTL = 24 * time.Hour
	}
	text, rec, err := f.reg.Create(context.Background(), opts, f.pki.root)
	if err != nil {
		t.Fatal(err)
	}
	return text, rec
}

func secretOf(t *testing.T, text string) string {
	t.Helper()
	tok, err := Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	return tok.Secret
}

func TestCreate(t *testing.T) {
	f := newFixture(t)
	text, rec := f.create(t, CreateOptions{Service: "web", Env: "prod", TTL: time.Hour, MaxUses: 3})
	tok, err := Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	want := Record{
		ID: tok.ID(), Service: "web", Env: "prod", Digest: RootDigest(f.pki.root), SecretHash: tok.SecretHash(),
		CreatedAt: f.clock.Now(), ExpiresAt: f.clock.Now().Add(time.Hour), MaxUses: 3,
	}
	if fmt.Sprint(rec) != fmt.Sprint(want) {
		t.Fatalf("record\n%+v\nwant\n%+v", rec, want)
	}
	got, err := f.reg.Get(context.Background(), rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("stored record\n%+v\nwant\n%+v", got, want)
	}
	raw, err := f.kv.Get(context.Background(), Bucket, rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"id"`, `"service"`, `"env"`, `"digest"`, `"secret_hash"`, `"created_at"`, `"expires_at"`, `"max_uses"`, `"uses"`, `"revoked"`} {
		if !bytes.Contains(raw, []byte(key)) {
			t.Errorf("stored JSON %s lacks %s", raw, key)
		}
	}
	if bytes.Contains(raw, []byte("revoked_at")) {
		t.Errorf("stored JSON %s has revoked_at before any revocation", raw)
	}
}

func TestCreateInvalid(t *testing.T) {
	f := newFixture(t)
	cases := []struct {
		name string
		opts CreateOptions
		root *x509.Certificate
		want string
	}{
		{"bad service", CreateOptions{Service: "Web", Env: "prod", TTL: time.Hour}, f.pki.root, "invalid service"},
		{"empty service", CreateOptions{Env: "prod", TTL: time.Hour}, f.pki.root, "invalid service"},
		{"bad env", CreateOptions{Service: "web", Env: "prod/x", TTL: time.Hour}, f.pki.root, "invalid environment"},
		{"zero ttl", CreateOptions{Service: "web", Env: "prod"}, f.pki.root, "must be positive"},
		{"negative ttl", CreateOptions{Service: "web", Env: "prod", TTL: -time.Hour}, f.pki.root, "must be positive"},
		{"negative uses", CreateOptions{Service: "web", Env: "prod", TTL: time.Hour, MaxUses: -1}, f.pki.root, "use limit"},
		{"no root", CreateOptions{Service: "web", Env: "prod", TTL: time.Hour}, nil, "no root"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := f.reg.Create(context.Background(), c.opts, c.root)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Create = %v, want error saying %q", err, c.want)
			}
		})
	}
	if recs, _ := f.reg.List(context.Background()); len(recs) != 0 {
		t.Fatalf("failed creations stored %d records", len(recs))
	}
}

func TestStoreNeverHoldsSecret(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	var secrets []string
	for i := 0; i < 5; i++ {
		text, rec := f.create(t, CreateOptions{MaxUses: 2})
		secrets = append(secrets, secretOf(t, text))
		if _, err := f.reg.Authenticate(ctx, text, f.roots); err != nil {
			t.Fatal(err)
		}
		if _, err := f.reg.Admit(ctx, rec.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := f.reg.Revoke(ctx, text); err != nil { // by token text
			t.Fatal(err)
		}
	}
	if len(f.kv.writes) == 0 {
		t.Fatal("nothing was written")
	}
	var stored [][]byte
	stored = append(stored, f.kv.writes...)
	_ = f.kv.List(ctx, Bucket, func(k string, v []byte) error {
		stored = append(stored, []byte(k), v)
		return nil
	})
	for _, s := range secrets {
		for _, b := range stored {
			if bytes.Contains(b, []byte(s)) || bytes.Contains(b, []byte(s[:16])) {
				t.Fatalf("store holds a token secret: %s", b)
			}
		}
	}
}

func TestAuthenticate(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	good, _ := f.create(t, CreateOptions{})
	revoked, revRec := f.create(t, CreateOptions{})
	if _, err := f.reg.Revoke(ctx, revRec.ID); err != nil {
		t.Fatal(err)
	}
	never := mustToken(t, f.pki.root).String() // well formed, never stored
	tampered, tamRec := f.create(t, CreateOptions{})
	// Same ID, different secret hash: the record must not match.
	if err := f.kv.Update(ctx, Bucket, tamRec.ID, func(old []byte) ([]byte, error) {
		var r Record
		if err := json.Unmarshal(old, &r); err != nil {
			return nil, err
		}
		r.SecretHash[0] ^= 1
		return json.Marshal(r)
	}); err != nil {
		t.Fatal(err)
	}
	other := newPKI(t, "other", "")
	otherTok := mustToken(t, other.root).String()
	// A genuine token whose digest was swapped for another trusted root.
	swapped := "SDSTKN-1-" + RootDigest(other.root) + "-" + secretOf(t, good)

	cases := []struct {
		name   string
		raw    string
		roots  []*x509.Certificate
		reason string // "" = success
	}{
		{"ok", good, f.roots, ""},
		{"ok with bearer", "Bearer " + good, f.roots, ""},
		{"ok with lower-case bearer", "bearer  " + good + "\n", f.roots, ""},
		{"ok among several roots", good, []*x509.Certificate{other.root, f.pki.root}, ""},
		{"missing", "", f.roots, ReasonMissing},
		{"missing after bearer", "Bearer ", f.roots, ReasonMissing},
		{"malformed", "SDSTKN-1-abc", f.roots, ReasonMalformed},
		{"malformed garbage", "hunter2", f.roots, ReasonMalformed},
		{"wrong root", otherTok, f.roots, ReasonWrongRoot},
		{"wrong root, no roots", good, nil, ReasonWrongRoot},
		{"unknown", never, f.roots, ReasonUnknown},
		{"secret hash mismatch", tampered, f.roots, ReasonUnknown},
		{"digest swapped", swapped, []*x509.Certificate{f.pki.root, other.root}, ReasonUnknown},
		{"revoked", revoked, f.roots, ReasonRevoked},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rec, err := f.reg.Authenticate(ctx, c.raw, c.roots)
			if c.reason == "" {
				if err != nil {
					t.Fatalf("Authenticate = %v", err)
				}
				if rec.Service != "web" || rec.Env != "prod" {
					t.Fatalf("record %+v", rec)
				}
				return
			}
			ae, ok := AsAuthError(err)
			if !ok {
				t.Fatalf("Authenticate = %v, want *AuthError %s", err, c.reason)
			}
			if ae.Reason != c.reason {
				t.Fatalf("reason %q (%v), want %q", ae.Reason, err, c.reason)
			}
			if wantDenied := c.reason == ReasonRevoked; ae.Denied != wantDenied {
				t.Fatalf("Denied = %v for %s", ae.Denied, c.reason)
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Errorf("message %q is not one line", msg)
			}
			if tok, perr := Parse(strings.TrimPrefix(c.raw, "Bearer ")); perr == nil && strings.Contains(msg, tok.Secret) {
				t.Errorf("message %q leaks the secret", msg)
			}
		})
	}
}

func TestAuthenticateIgnoresExpiryAndUses(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	text, rec := f.create(t, CreateOptions{TTL: time.Hour, MaxUses: 1})
	if _, err := f.reg.Admit(ctx, rec.ID); err != nil {
		t.Fatal(err)
	}
	f.clock.Add(2 * time.Hour)
	if _, err := f.reg.Authenticate(ctx, text, f.roots); err != nil {
		t.Fatalf("an existing node's token stopped authenticating after expiry/exhaustion: %v", err)
	}
}

func TestAdmit(t *testing.T) {
	ctx := context.Background()
	t.Run("unlimited", func(t *testing.T) {
		f := newFixture(t)
		_, rec := f.create(t, CreateOptions{})
		for i := 1; i <= 3; i++ {
			got, err := f.reg.Admit(ctx, rec.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.Uses != i || !got.LastUsedAt.Equal(f.clock.Now()) {
				t.Fatalf("after %d admits: %+v", i, got)
			}
		}
	})
	t.Run("exhausted", func(t *testing.T) {
		f := newFixture(t)
		_, rec := f.create(t, CreateOptions{MaxUses: 1})
		got, err := f.reg.Admit(ctx, rec.ID)
		if err != nil || got.Uses != 1 {
			t.Fatalf("first Admit = %+v, %v", got, err)
		}
		_, err = f.reg.Admit(ctx, rec.ID)
		expectAuth(t, err, ReasonExhausted, "1 of its 1")
		after, _ := f.reg.Get(ctx, rec.ID)
		if after.Uses != 1 {
			t.Fatalf("refused Admit changed Uses to %d", after.Uses)
		}
	})
	t.Run("expired", func(t *testing.T) {
		f := newFixture(t)
		_, rec := f.create(t, CreateOptions{TTL: time.Hour})
		f.clock.Add(time.Hour - time.Nanosecond)
		if _, err := f.reg.Admit(ctx, rec.ID); err != nil {
			t.Fatalf("Admit just before expiry = %v", err)
		}
		f.clock.Add(time.Nanosecond) // now == ExpiresAt
		_, err := f.reg.Admit(ctx, rec.ID)
		expectAuth(t, err, ReasonExpired, "expired at 2026-11-21T11:00:00Z; create a new one with `sds-server token create`")
		if after, _ := f.reg.Get(ctx, rec.ID); after.Uses != 1 {
			t.Fatalf("refused Admit changed Uses to %d", after.Uses)
		}
	})
	t.Run("revoked", func(t *testing.T) {
		f := newFixture(t)
		_, rec := f.create(t, CreateOptions{})
		if _, err := f.reg.Revoke(ctx, rec.ID); err != nil {
			t.Fatal(err)
		}
		_, err := f.reg.Admit(ctx, rec.ID)
		expectAuth(t, err, ReasonRevoked, "revoked at 2026-11-21T10:00:00Z")
	})
	t.Run("unknown", func(t *testing.T) {
		f := newFixture(t)
		_, err := f.reg.Admit(ctx, "0123456789abcdef")
		expectAuth(t, err, ReasonUnknown, "unknown")
		if !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("%v does not wrap store.ErrNotFound", err)
		}
	})
	t.Run("concurrent", func(t *testing.T) {
		f := newFixture(t)
		_, rec := f.create(t, CreateOptions{MaxUses: 5})
		var wg sync.WaitGroup
		var mu sync.Mutex
		ok, refused := 0, 0
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := f.reg.Admit(ctx, rec.ID)
				mu.Lock()
				defer mu.Unlock()
				if err == nil {
					ok++
				} else if ae, isAuth := AsAuthError(err); isAuth && ae.Reason == ReasonExhausted {
					refused++
				}
			}()
		}
		wg.Wait()
		if ok != 5 || refused != 15 {
			t.Fatalf("%d admitted, %d refused; want 5 and 15", ok, refused)
		}
	})
}

func expectAuth(t *testing.T, err error, reason, msg string) {
	t.Helper()
	ae, ok := AsAuthError(fmt.Errorf("wrapped: %w", err))
	if !ok {
		t.Fatalf("error %v is not an *AuthError", err)
	}
	if ae.Reason != reason {
		t.Fatalf("reason %q (%v), want %q", ae.Reason, err, reason)
	}
	wantDenied := reason == ReasonRevoked || reason == ReasonExpired || reason == ReasonExhausted
	if ae.Denied != wantDenied {
		t.Fatalf("Denied = %v for %s", ae.Denied, reason)
	}
	if !strings.Contains(ae.Error(), msg) {
		t.Fatalf("message %q does not say %q", ae.Error(), msg)
	}
}

func TestRevoke(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	text, rec := f.create(t, CreateOptions{})
	first, err := f.reg.Revoke(ctx, rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !first.Revoked || !first.RevokedAt.Equal(f.clock.Now()) {
		t.Fatalf("after Revoke: %+v", first)
	}
	f.clock.Add(time.Minute)
	second, err := f.reg.Revoke(ctx, text)
	if err != nil {
		t.Fatalf("second Revoke = %v", err)
	}
	if !second.RevokedAt.Equal(first.RevokedAt) {
		t.Fatalf("second Revoke moved RevokedAt from %v to %v", first.RevokedAt, second.RevokedAt)
	}
	if got, _ := f.reg.Get(ctx, rec.ID); !got.RevokedAt.Equal(first.RevokedAt) || got.Status(f.clock.Now()) != ReasonRevoked {
		t.Fatalf("stored %+v", got)
	}

	cases := []struct {
		name string
		id   string
		is   error
	}{
		{"unknown", "0123456789abcdef", store.ErrNotFound},
		{"short", "0123", ErrInvalidID},
		{"upper case", "0123456789ABCDEF", ErrInvalidID},
		{"malformed token", "SDSTKN-1-x", ErrInvalidID},
		{"unknown token", mustToken(t, f.pki.root).String(), store.ErrNotFound},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := f.reg.Revoke(ctx, c.id)
			if !errors.Is(err, c.is) {
				t.Fatalf("Revoke(%q) = %v, want %v", Redact(c.id), err, c.is)
			}
			if _, err := f.reg.Get(ctx, c.id); !errors.Is(err, c.is) {
				t.Fatalf("Get = %v, want %v", err, c.is)
			}
		})
	}
}

func TestListAndStatus(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	_, a := f.create(t, CreateOptions{Service: "a", TTL: time.Hour})
	f.clock.Add(time.Second)
	_, b := f.create(t, CreateOptions{Service: "b", MaxUses: 1})
	f.clock.Add(time.Second)
	_, c := f.create(t, CreateOptions{Service: "c"})
	f.clock.Add(time.Second)
	_, d := f.create(t, CreateOptions{Service: "d"})
	if _, err := f.reg.Admit(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := f.reg.Revoke(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	f.clock.Add(2 * time.Hour)
	recs, err := f.reg.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ id, status string }{{a.ID, "expired"}, {b.ID, "exhausted"}, {c.ID, "revoked"}, {d.ID, "active"}}
	if len(recs) != len(want) {
		t.Fatalf("List returned %d records", len(recs))
	}
	for i, w := range want {
		if recs[i].ID != w.id || recs[i].Status(f.clock.Now()) != w.status {
			t.Errorf("record %d: %s %s, want %s %s", i, recs[i].ID, recs[i].Status(f.clock.Now()), w.id, w.status)
		}
	}
}

func TestRotate(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	oldText, old := f.create(t, CreateOptions{Service: "api", Env: "staging", TTL: 3 * time.Hour, MaxUses: 4})
	f.clock.Add(time.Minute)
	newText, rec, err := f.reg.Rotate(ctx, old.ID, f.pki.root)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Service != "api" || rec.Env != "staging" || rec.MaxUses != 4 || rec.ExpiresAt.Sub(rec.CreatedAt) != 3*time.Hour {
		t.Fatalf("rotated record %+v", rec)
	}
	_, err = f.reg.Authenticate(ctx, oldText, f.roots)
	if ae, ok := AsAuthError(err); !ok || ae.Reason != ReasonRevoked {
		t.Fatalf("old token after rotation: %v", err)
	}
	if _, err := f.reg.Authenticate(ctx, newText, f.roots); err != nil {
		t.Fatalf("new token: %v", err)
	}
}

// TestAuthenticateStale: a token of this registry whose root left the
// bundle (a root rotation) authenticates for its known nodes; anything
// else gets the refusal Authenticate gives.
func TestAuthenticateStale(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	good, goodRec := f.create(t, CreateOptions{})
	revoked, revRec := f.create(t, CreateOptions{})
	if _, err := f.reg.Revoke(ctx, revRec.ID); err != nil {
		t.Fatal(err)
	}
	never := mustToken(t, f.pki.root).String() // another server's token, same root
	swapped := "SDSTKN-1-" + RootDigest(newPKI(t, "other", "").root) + "-" + secretOf(t, good)
	newRoot := newPKI(t, "new", "").root

	// Authenticate refuses it once its root is gone from the bundle.
	if _, err := f.reg.Authenticate(ctx, good, []*x509.Certificate{newRoot}); !hasReason(err, ReasonWrongRoot) {
		t.Fatalf("Authenticate with the root gone: %v, want wrong_root", err)
	}
	cases := []struct {
		name, raw, reason string
	}{
		{"own token", "Bearer " + good, ""},
		{"revoked", revoked, ReasonRevoked},
		{"never stored", never, ReasonWrongRoot},
		{"digest swapped", swapped, ReasonWrongRoot},
		{"malformed", "SDSTKN-x", ReasonMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec, err := f.reg.AuthenticateStale(ctx, tc.raw)
			if tc.reason == "" {
				if err != nil || rec.ID != goodRec.ID {
					t.Fatalf("AuthenticateStale: %+v %v", rec, err)
				}
				return
			}
			if !hasReason(err, tc.reason) || rec.ID != "" {
				t.Fatalf("AuthenticateStale: %+v %v, want %s", rec, err, tc.reason)
			}
			if strings.Contains(err.Error(), secretOf(t, good)) {
				t.Fatal("the error leaks the token secret")
			}
		})
	}
}

func hasReason(err error, reason string) bool {
	ae, ok := AsAuthError(err)
	return ok && ae.Reason == reason
}
