// Package bootstrap lets a new sidecar join the mesh: join tokens (their
// format, their registry and the authentication of xDS streams with them),
// verification of the server's root CA against the digest a token pins, and
// generation of the Envoy bootstrap that points a sidecar at sds-server.
package bootstrap

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"strings"
)

// Token format constants. A token reads SDSTKN-1-<digest>-<secret>.
const (
	// TokenPrefix starts every token, so that leaked tokens are easy to grep for.
	TokenPrefix = "SDSTKN"
	// TokenVersion is the only token format version this package knows.
	TokenVersion = "1"
	// DigestLen is the length of the base36 SHA-256 digest of the root
	// certificate: ceil(256 / log2(36)) = 50 characters.
	DigestLen = 50
	// SecretLen is the length of the base36 secret: 160 random bits take
	// ceil(160 / log2(36)) = 31 characters.
	SecretLen = 31
	// SecretBits is the entropy of a token secret.
	SecretBits = 160
	// IDLen is the length of a token ID (hex characters).
	IDLen = 16
)

// redacted stands in for a secret in logs.
const redacted = "…"

var (
	maxDigest = new(big.Int).Lsh(big.NewInt(1), 256) // exclusive bound
	maxSecret = new(big.Int).Lsh(big.NewInt(1), SecretBits)
)

// Token is a parsed join token. Digest pins the root CA the holder must
// trust; Secret is the credential itself. A Token's String form must never be
// logged: use Redact or ID.
type Token struct {
	// Digest is the base36 SHA-256 of the root certificate's DER,
	// DigestLen characters.
	Digest string
	// Secret is the base36 random secret, SecretLen characters.
	Secret string
}

// New creates a token pinning root, with a fresh random secret from
// crypto/rand.
func New(root *x509.Certificate) (Token, error) {
	if root == nil || len(root.Raw) == 0 {
		return Token{}, errors.New("create bootstrap token: no root certificate")
	}
	n, err := rand.Int(rand.Reader, maxSecret)
	if err != nil {
		return Token{}, fmt.Errorf("create bootstrap token: read random secret: %w", err)
	}
	return Token{Digest: RootDigest(root), Secret: pad36(n, SecretLen)}, nil
}

// RootDigest returns the SHA-256 of root's DER as DigestLen base36
// characters: the digest a token pins.
func RootDigest(root *x509.Certificate) string {
	if root == nil {
		return ""
	}
	sum := sha256.Sum256(root.Raw)
	return pad36(new(big.Int).SetBytes(sum[:]), DigestLen)
}

// pad36 renders n in lower-case base36, left-padded with '0' to width.
func pad36(n *big.Int, width int) string {
	s := n.Text(36)
	if len(s) < width {
		s = strings.Repeat("0", width-len(s)) + s
	}
	return s
}

// String returns the token text, SDSTKN-1-<digest>-<secret>. It contains
// the secret: show it once to the operator, never log it.
func (t Token) String() string {
	return TokenPrefix + "-" + TokenVersion + "-" + t.Digest + "-" + t.Secret
}

// ID returns the token's public ID: the first IDLen hex characters of the
// SHA-256 of the secret. It names the token in listings and logs and reveals
// nothing usable about the secret.
func (t Token) ID() string {
	h := t.SecretHash()
	return hex.EncodeToString(h[:IDLen/2])
}

// SecretHash returns the SHA-256 of the secret: what the registry stores
// instead of the secret.
func (t Token) SecretHash() []byte {
	h := sha256.Sum256([]byte(t.Secret))
	return h[:]
}

// PinsRoot returns the root among roots whose digest is the token's, compared
// in constant time, and whether there is one.
func (t Token) PinsRoot(roots []*x509.Certificate) (*x509.Certificate, bool) {
	var found *x509.Certificate
	for _, r := range roots {
		if r == nil {
			continue
		}
		if subtle.ConstantTimeCompare([]byte(RootDigest(r)), []byte(t.Digest)) == 1 && found == nil {
			found = r
		}
	}
	return found, found != nil
}

// Parse parses a token strictly: prefix, version 1, exact lengths and the
// lower-case base36 alphabet. Leading and trailing white space is ignored
// (tokens are often pasted). Errors say what is wrong but never repeat any of
// the input, which may be a secret.
func Parse(s string) (Token, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Token{}, errors.New("bootstrap token is empty")
	}
	parts := strings.Split(s, "-")
	if parts[0] != TokenPrefix {
		return Token{}, fmt.Errorf("bootstrap token does not start with %q", TokenPrefix+"-")
	}
	if len(parts) < 2 || parts[1] != TokenVersion {
		if len(parts) >= 2 && isVersion(parts[1]) {
			return Token{}, fmt.Errorf("bootstrap token has version %s; this server understands version %s", parts[1], TokenVersion)
		}
		return Token{}, fmt.Errorf("bootstrap token has no version after %q; want %q", TokenPrefix+"-", TokenPrefix+"-"+TokenVersion+"-")
	}
	if len(parts) != 4 {
		return Token{}, fmt.Errorf("bootstrap token has %d dash-separated parts; want 4 (%s-%s-<digest>-<secret>)", len(parts), TokenPrefix, TokenVersion)
	}
	t := Token{Digest: parts[2], Secret: parts[3]}
	if err := checkPart("root digest", t.Digest, DigestLen, maxDigest); err != nil {
		return Token{}, err
	}
	if err := checkPart("secret", t.Secret, SecretLen, maxSecret); err != nil {
		return Token{}, err
	}
	return t, nil
}

// checkPart checks one base36 part of a token without echoing it.
func checkPart(what, s string, n int, limit *big.Int) error {
	if len(s) != n {
		return fmt.Errorf("bootstrap token %s has %d characters; want %d", what, len(s), n)
	}
	if !isBase36(s) {
		return fmt.Errorf("bootstrap token %s has characters outside 0-9 and a-z", what)
	}
	v, ok := new(big.Int).SetString(s, 36)
	if !ok || v.Cmp(limit) >= 0 {
		return fmt.Errorf("bootstrap token %s is out of range", what)
	}
	return nil
}

// isVersion reports whether s looks like a version number: 1-3 digits, short
// enough that echoing it in an error cannot reveal a secret.
func isVersion(s string) bool {
	if s == "" || len(s) > 3 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func isBase36(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'z') {
			return false
		}
	}
	return true
}

// Redact returns s with the token secret replaced by "…", for logs:
// "SDSTKN-1-<digest>-…". Whatever s is, the result never contains more of it
// than a well-formed prefix, version and digest; anything else becomes "…".
func Redact(s string) string {
	s = strings.TrimSpace(s)
	parts := strings.SplitN(s, "-", 4)
	switch {
	case len(parts) == 0 || parts[0] != TokenPrefix:
		return redacted
	case len(parts) < 3 || parts[1] != TokenVersion:
		return TokenPrefix + "-" + redacted
	case len(parts[2]) != DigestLen || !isBase36(parts[2]):
		return TokenPrefix + "-" + TokenVersion + "-" + redacted
	default:
		return TokenPrefix + "-" + TokenVersion + "-" + parts[2] + "-" + redacted
	}
}
