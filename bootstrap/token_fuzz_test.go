package bootstrap

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/store"
)

// Fuzz targets of token handling. `go test` runs them on their seeds (f.Add
// and testdata/fuzz/<name>); `make fuzz` explores beyond them.

// fuzzRoot returns a throw-away self-signed root for the fuzz targets (which
// get a testing.F, not the *testing.T newPKI wants).
func fuzzRoot(tb testing.TB) *x509.Certificate {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fuzz root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// fuzzDigest and fuzzSecret are a well-formed digest and secret for seeds.
var (
	fuzzDigest = strings.Repeat("0", DigestLen-3) + "abc"
	fuzzSecret = strings.Repeat("z", SecretLen-5) + "01234"
)

// tokenSeeds are valid and nearly valid token texts.
func tokenSeeds() []string {
	valid := TokenPrefix + "-" + TokenVersion + "-" + fuzzDigest + "-" + fuzzSecret
	return []string{
		valid,
		"  " + valid + "\n",
		"Bearer " + valid,
		"bearer\t" + valid,
		"",
		"SDSTKN",
		"SDSTKN-",
		"SDSTKN-1",
		"SDSTKN-1-",
		"SDSTKN-2-" + fuzzDigest + "-" + fuzzSecret,
		"SDSTKN-123-x",
		"SDSTKN-1234-x",
		"SDSTKN-1-" + fuzzDigest + "-" + fuzzSecret + "-extra",
		"SDSTKN-1-" + fuzzDigest + "-" + strings.ToUpper(fuzzSecret),
		"SDSTKN-1-" + fuzzDigest + "-" + fuzzSecret[1:],
		"SDSTKN-1-" + fuzzDigest + "-" + strings.Repeat("z", SecretLen), // 36^31 > 2^160: out of range
		"SDSTKN-1-" + strings.Repeat("z", DigestLen) + "-" + fuzzSecret, // 36^50 > 2^256: out of range
		"SDSTKN-1-" + fuzzDigest + "-" + fuzzSecret[:10] + "é" + fuzzSecret[12:],
		"sdstkn-1-" + fuzzDigest + "-" + fuzzSecret,
		"SDSTKN-1--",
		"SDSTKN-1-" + fuzzDigest + "-",
		"-SDSTKN-1-" + fuzzDigest + "-" + fuzzSecret,
		"SDSTKN\x00-1-" + fuzzDigest + "-" + fuzzSecret,
	}
}

// base36Runs returns the maximal runs of [0-9a-z] in s of at least n bytes:
// the pieces of an input that could be (part of) a secret.
func base36Runs(s string, n int) []string {
	var out []string
	start := -1
	for i := 0; i <= len(s); i++ {
		if i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] >= 'a' && s[i] <= 'z') {
			if start < 0 {
				start = i
			}
			continue
		}
		if start >= 0 && i-start >= n {
			out = append(out, s[start:i])
		}
		start = -1
	}
	return out
}

// checkNoEcho fails when msg repeats a long base36 run of input: error
// messages and redactions may name the token's ID, never its text.
func checkNoEcho(t *testing.T, what, msg, input string) {
	t.Helper()
	for _, run := range base36Runs(input, 12) {
		if strings.Contains(msg, run) {
			t.Fatalf("%s %q repeats %q of the input %q", what, msg, run, input)
		}
	}
}

// FuzzParse: Parse never panics; a token that parses re-serialises to the
// same text (trimmed) and parses back to itself; errors are one line and
// never repeat the input; Redact never shows the secret.
func FuzzParse(f *testing.F) {
	for _, s := range tokenSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := Parse(s)
		red := Redact(s)
		if err != nil {
			msg := err.Error()
			if msg == "" || strings.ContainsAny(msg, "\r\n") {
				t.Fatalf("Parse(%q): error %q is not one non-empty line", s, msg)
			}
			checkNoEcho(t, "error", msg, s)
			if tok != (Token{}) {
				t.Fatalf("Parse(%q) failed (%v) but returned a token", s, err)
			}
		} else {
			if got, want := tok.String(), strings.TrimSpace(s); got != want {
				t.Fatalf("Parse(%q).String() = %q, want the trimmed input", s, got)
			}
			back, err := Parse(tok.String())
			if err != nil || back != tok {
				t.Fatalf("Parse(String()) of %q = %+v, %v; want the same token", s, back, err)
			}
			if len(tok.Digest) != DigestLen || len(tok.Secret) != SecretLen || !isBase36(tok.Digest) || !isBase36(tok.Secret) {
				t.Fatalf("Parse(%q) accepted a malformed token %+v", s, tok)
			}
			if want := TokenPrefix + "-" + TokenVersion + "-" + tok.Digest + "-" + redacted; red != want {
				t.Fatalf("Redact(%q) = %q, want %q", s, red, want)
			}
			if strings.Contains(red, tok.Secret) {
				t.Fatalf("Redact(%q) = %q shows the secret", s, red)
			}
		}
		// Whatever s is, its redaction is one of four shapes, and the only
		// part of s it may show is a well-formed digest in the digest's
		// place.
		switch {
		case red == redacted, red == TokenPrefix+"-"+redacted, red == TokenPrefix+"-"+TokenVersion+"-"+redacted:
		default:
			parts := strings.SplitN(strings.TrimSpace(s), "-", 4)
			if len(parts) < 3 || red != TokenPrefix+"-"+TokenVersion+"-"+parts[2]+"-"+redacted ||
				len(parts[2]) != DigestLen || !isBase36(parts[2]) {
				t.Fatalf("Redact(%q) = %q shows more than a digest", s, red)
			}
		}
	})
}

// FuzzAuthenticate: Registry.Authenticate on any raw header value never
// panics, refuses with an *AuthError of a known reason whose one-line
// message never repeats the input, and succeeds only for the exact token
// the registry issued. In the input, "{token}" stands for that token's text
// and "{digest}" for its digest, so that mutations explore near misses.
func FuzzAuthenticate(f *testing.F) {
	ctx := context.Background()
	root := fuzzRoot(f)
	kv := store.NewMemory()
	f.Cleanup(func() { _ = kv.Close() })
	reg := NewRegistry(kv, nil)
	text, rec, err := reg.Create(ctx, CreateOptions{Service: "web", Env: "prod", TTL: time.Hour}, root)
	if err != nil {
		f.Fatal(err)
	}
	issued, err := Parse(text)
	if err != nil {
		f.Fatal(err)
	}
	// A revoked token of the same registry, for the revoked path.
	revokedText, revokedRec, err := reg.Create(ctx, CreateOptions{Service: "web", Env: "prod", TTL: time.Hour}, root)
	if err != nil {
		f.Fatal(err)
	}
	if _, err := reg.Revoke(ctx, revokedRec.ID); err != nil {
		f.Fatal(err)
	}
	roots := []*x509.Certificate{root}

	for _, s := range append(tokenSeeds(),
		"{token}", "Bearer {token}", "BEARER  {token} ", "Bearer", "Bearer ", "Bearerx{token}",
		"{revoked}", "Bearer {revoked}",
		"SDSTKN-1-{digest}-"+fuzzSecret, // right root, unknown secret
		"{token}{token}", "Bearer Bearer {token}", "{token}x",
	) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		raw := strings.NewReplacer("{token}", text, "{revoked}", revokedText, "{digest}", issued.Digest).Replace(s)
		got, err := reg.Authenticate(ctx, raw, roots)
		if err == nil {
			if got.ID != rec.ID || !strings.Contains(raw, issued.Secret) {
				t.Fatalf("Authenticate(%q) admitted record %s; only %s was issued", raw, got.ID, rec.ID)
			}
			// Only the token itself, optionally after a Bearer scheme.
			bare := strings.TrimSpace(raw)
			if bare != text {
				rest := strings.TrimSpace(bare[min(len(bare), 6):])
				if len(bare) < 6 || !strings.EqualFold(bare[:6], "bearer") || rest != text {
					t.Fatalf("Authenticate(%q) accepted more than the token", raw)
				}
			}
			return
		}
		ae, ok := AsAuthError(err)
		if !ok {
			t.Fatalf("Authenticate(%q): %v is not an *AuthError (the memory store does not fail)", raw, err)
		}
		switch ae.Reason {
		case ReasonMissing, ReasonMalformed, ReasonWrongRoot, ReasonUnknown, ReasonRevoked:
		default:
			t.Fatalf("Authenticate(%q): reason %q", raw, ae.Reason)
		}
		msg := err.Error()
		if strings.ContainsAny(msg, "\r\n") {
			t.Fatalf("Authenticate(%q): error %q is not one line", raw, msg)
		}
		checkNoEcho(t, "error", msg, raw)
		if strings.Contains(msg, issued.Secret) {
			t.Fatalf("Authenticate(%q): error %q shows the secret", raw, msg)
		}
	})
}
