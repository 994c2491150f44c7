package bootstrap

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"math/big"
	"strings"
	"testing"
)

func mustToken(t *testing.T, root *x509.Certificate) Token {
	t.Helper()
	tok, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestTokenRoundTrip(t *testing.T) {
	p := newPKI(t, "a", "")
	for i := 0; i < 200; i++ { // enough draws to hit secrets that need padding
		tok := mustToken(t, p.root)
		s := tok.String()
		if want := len("SDSTKN-1-") + DigestLen + 1 + SecretLen; len(s) != want {
			t.Fatalf("token length %d, want %d", len(s), want)
		}
		if !strings.HasPrefix(s, "SDSTKN-1-") {
			t.Fatalf("token %q lacks prefix", Redact(s))
		}
		back, err := Parse(s)
		if err != nil {
			t.Fatalf("Parse(String()) = %v", err)
		}
		if back != tok {
			t.Fatalf("round trip changed the token")
		}
	}
}

func TestRootDigest(t *testing.T) {
	p := newPKI(t, "a", "")
	d := RootDigest(p.root)
	if len(d) != DigestLen || !isBase36(d) {
		t.Fatalf("digest %q: want %d base36 characters", d, DigestLen)
	}
	n, ok := new(big.Int).SetString(d, 36)
	if !ok {
		t.Fatal("digest does not parse as base36")
	}
	sum := sha256.Sum256(p.root.Raw)
	got := n.FillBytes(make([]byte, 32))
	if hex.EncodeToString(got) != hex.EncodeToString(sum[:]) {
		t.Fatal("digest is not the SHA-256 of the root's DER")
	}
	if tok := mustToken(t, p.root); tok.Digest != d {
		t.Fatal("New does not pin RootDigest(root)")
	}
	if RootDigest(newPKI(t, "b", "").root) == d {
		t.Fatal("two roots share a digest")
	}
}

func TestPad36(t *testing.T) {
	if got := pad36(big.NewInt(0), SecretLen); got != strings.Repeat("0", SecretLen) {
		t.Fatalf("pad36(0) = %q", got)
	}
	if got := pad36(big.NewInt(35), 3); got != "00z" {
		t.Fatalf("pad36(35, 3) = %q", got)
	}
	max := new(big.Int).Sub(maxSecret, big.NewInt(1))
	if got := pad36(max, SecretLen); len(got) != SecretLen {
		t.Fatalf("largest secret takes %d characters, want %d", len(got), SecretLen)
	}
	max = new(big.Int).Sub(maxDigest, big.NewInt(1))
	if got := pad36(max, DigestLen); len(got) != DigestLen {
		t.Fatalf("largest digest takes %d characters, want %d", len(got), DigestLen)
	}
}

func TestNewSecretsDiffer(t *testing.T) {
	p := newPKI(t, "a", "")
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		s := mustToken(t, p.root).Secret
		if seen[s] {
			t.Fatal("New repeated a secret")
		}
		seen[s] = true
	}
}

func TestNewNoRoot(t *testing.T) {
	if _, err := New(nil); err == nil {
		t.Fatal("New(nil) succeeded")
	}
}

func TestParseErrors(t *testing.T) {
	p := newPKI(t, "a", "")
	tok := mustToken(t, p.root)
	d, s := tok.Digest, tok.Secret
	cases := []struct {
		name, in, want string
	}{
		{"empty", "", "empty"},
		{"blank", "  \n", "empty"},
		{"secret alone", s, "does not start with"},
		{"wrong prefix", "SDSTKM-1-" + d + "-" + s, "does not start with"},
		{"lower-case prefix", "sdstkn-1-" + d + "-" + s, "does not start with"},
		{"no dash after prefix", "SDSTKN1-" + d + "-" + s, "does not start with"},
		{"prefix only", "SDSTKN", "no version"},
		{"version 2", "SDSTKN-2-" + d + "-" + s, "version 2"},
		{"empty version", "SDSTKN--" + d + "-" + s, "no version"},
		{"secret as version", "SDSTKN-" + s, "no version"},
		{"no secret", "SDSTKN-1-" + d, "3 dash-separated parts"},
		{"extra dash in secret", "SDSTKN-1-" + d + "-" + s[:10] + "-" + s[10:], "5 dash-separated parts"},
		{"trailing dash", "SDSTKN-1-" + d + "-" + s + "-", "5 dash-separated parts"},
		{"short digest", "SDSTKN-1-" + d[1:] + "-" + s, "root digest has 49 characters"},
		{"long digest", "SDSTKN-1-" + d + "0-" + s, "root digest has 51 characters"},
		{"digest alphabet", "SDSTKN-1-" + d[:49] + "_-" + s, "root digest has characters outside"},
		{"digest out of range", "SDSTKN-1-" + strings.Repeat("z", DigestLen) + "-" + s, "root digest is out of range"},
		{"short secret", "SDSTKN-1-" + d + "-" + s[1:], "secret has 30 characters"},
		{"long secret", "SDSTKN-1-" + d + "-" + s + "a", "secret has 32 characters"},
		{"upper-case secret", "SDSTKN-1-" + d + "-" + strings.ToUpper(s[:30]) + "A", "secret has characters outside"},
		{"secret alphabet", "SDSTKN-1-" + d + "-" + s[:30] + "!", "secret has characters outside"},
		{"secret out of range", "SDSTKN-1-" + d + "-" + strings.Repeat("z", SecretLen), "secret is out of range"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse(c.in)
			if err == nil {
				t.Fatal("Parse succeeded")
			}
			msg := err.Error()
			if !strings.Contains(msg, c.want) {
				t.Errorf("error %q does not say %q", msg, c.want)
			}
			if strings.Contains(msg, s) || strings.Contains(msg, s[:12]) || strings.Contains(msg, s[10:]) {
				t.Errorf("error %q leaks the secret", msg)
			}
		})
	}
}

func TestParseTrimsSpace(t *testing.T) {
	tok := mustToken(t, newPKI(t, "a", "").root)
	got, err := Parse(" " + tok.String() + "\n")
	if err != nil || got != tok {
		t.Fatalf("Parse with white space = %v, %v", got == tok, err)
	}
}

func TestTokenID(t *testing.T) {
	p := newPKI(t, "a", "")
	tok := mustToken(t, p.root)
	id := tok.ID()
	if len(id) != IDLen {
		t.Fatalf("ID %q has %d characters, want %d", id, len(id), IDLen)
	}
	sum := sha256.Sum256([]byte(tok.Secret))
	if id != hex.EncodeToString(sum[:])[:IDLen] {
		t.Fatal("ID is not the first 16 hex characters of SHA-256(secret)")
	}
	if hex.EncodeToString(tok.SecretHash()) != hex.EncodeToString(sum[:]) {
		t.Fatal("SecretHash is not SHA-256(secret)")
	}
	again, _ := Parse(tok.String())
	if again.ID() != id {
		t.Fatal("ID is not stable")
	}
	if strings.Contains(tok.Secret, id) || strings.HasPrefix(tok.Secret, id[:4]) {
		t.Fatal("ID reveals part of the secret")
	}
	other := mustToken(t, p.root)
	if other.ID() == id {
		t.Fatal("two tokens share an ID")
	}
}

func TestPinsRoot(t *testing.T) {
	a, b, c := newPKI(t, "a", ""), newPKI(t, "b", ""), newPKI(t, "c", "")
	tok := mustToken(t, b.root)
	cases := []struct {
		name  string
		roots []*x509.Certificate
		want  *x509.Certificate
	}{
		{"only root", []*x509.Certificate{b.root}, b.root},
		{"among others", []*x509.Certificate{a.root, nil, b.root, c.root}, b.root},
		{"absent", []*x509.Certificate{a.root, c.root}, nil},
		{"intermediate of same PKI", []*x509.Certificate{b.inter}, nil},
		{"none", nil, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := tok.PinsRoot(tc.roots)
			if ok != (tc.want != nil) || got != tc.want {
				t.Fatalf("PinsRoot = %v, %v", got, ok)
			}
		})
	}
}

func TestRedact(t *testing.T) {
	tok := mustToken(t, newPKI(t, "a", "").root)
	d, s := tok.Digest, tok.Secret
	cases := []struct{ in, want string }{
		{tok.String(), "SDSTKN-1-" + d + "-…"},
		{" " + tok.String() + "\n", "SDSTKN-1-" + d + "-…"},
		{"", "…"},
		{s, "…"},
		{"Bearer " + tok.String(), "…"},
		{"SDSTKN-2-" + d + "-" + s, "SDSTKN-…"},
		{"SDSTKN-1-" + s, "SDSTKN-1-…"},
		{"SDSTKN-1-" + d + s, "SDSTKN-1-…"},
		{"SDSTKN-1-" + d + "-" + s + "-" + s, "SDSTKN-1-" + d + "-…"},
		{"SDSTKN", "SDSTKN-…"},
		{"\xff\xfe-SDSTKN", "…"},
	}
	for _, c := range cases {
		got := Redact(c.in)
		if got != c.want {
			t.Errorf("Redact(%q) = %q, want %q", Redact(c.in), got, c.want)
		}
		if strings.Contains(got, s[:8]) {
			t.Errorf("Redact leaks the secret: %q", got)
		}
	}
}
