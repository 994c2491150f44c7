package local

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer"
)

const testTrustDomain = "mesh.local"

// t0 is the pinned clock of every test; whole seconds, as certificates keep.
var t0 = time.Date(2031, 3, 4, 5, 6, 7, 0, time.UTC)

func at(t time.Time) func() time.Time { return func() time.Time { return t } }

func testOptions() Options { return Options{TrustDomain: testTrustDomain, Now: at(t0)} }

// newTestCA creates a CA in a fresh directory and returns it with the directory.
func newTestCA(t testing.TB, opts Options) (*CA, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := Open(context.Background(), dir, opts)
	if err != nil {
		t.Fatalf("Open(new dir): %v", err)
	}
	return ca, dir
}

type fileState struct {
	data []byte
	mode fs.FileMode
}

// snapshot records every entry of dir, to prove Open left it alone.
func snapshot(t *testing.T, dir string) map[string]fileState {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := make(map[string]fileState, len(entries))
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(p) // unreadable files compare by mode only
		s[e.Name()] = fileState{data, fi.Mode()}
	}
	return s
}

func assertUnchanged(t *testing.T, dir string, before map[string]fileState) {
	t.Helper()
	after := snapshot(t, dir)
	if len(after) != len(before) {
		t.Errorf("directory entries changed: before %d, after %d", len(before), len(after))
	}
	for name, b := range before {
		a, ok := after[name]
		if !ok || !bytes.Equal(a.data, b.data) || a.mode != b.mode {
			t.Errorf("%s was modified or removed", name)
		}
	}
}

func fileMode(t *testing.T, p string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestOpenCreatesCA(t *testing.T) {
	ca, dir := newTestCA(t, testOptions())
	root, inter := ca.Root(), ca.Intermediate()

	for _, tc := range []struct {
		name        string
		cert        *x509.Certificate
		cn          string
		notAfter    time.Time
		maxPathLen  int
		maxPathZero bool
	}{
		{"root", root, "sds-server root CA", t0.AddDate(10, 0, 0), 1, false},
		{"intermediate", inter, "sds-server intermediate CA", t0.Add(DefaultIntermediateTTL), 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.cert
			if c.Subject.CommonName != tc.cn || len(c.Subject.Organization) != 1 || c.Subject.Organization[0] != testTrustDomain {
				t.Errorf("subject = %v, want CN=%s, O=%s", c.Subject, tc.cn, testTrustDomain)
			}
			if !c.BasicConstraintsValid || !c.IsCA {
				t.Error("not a CA")
			}
			if c.MaxPathLen != tc.maxPathLen || c.MaxPathLenZero != tc.maxPathZero {
				t.Errorf("MaxPathLen = %d (zero %v), want %d (zero %v)", c.MaxPathLen, c.MaxPathLenZero, tc.maxPathLen, tc.maxPathZero)
			}
			if c.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
				t.Errorf("KeyUsage = %v, want CertSign|CRLSign", c.KeyUsage)
			}
			if !c.NotBefore.Equal(t0.Add(-issuer.Backdate)) || !c.NotAfter.Equal(tc.notAfter) {
				t.Errorf("validity %s..%s, want %s..%s", c.NotBefore, c.NotAfter, t0.Add(-issuer.Backdate), tc.notAfter)
			}
			if k, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
				t.Errorf("key %T, want ECDSA P-256", c.PublicKey)
			}
			if len(c.SubjectKeyId) == 0 {
				t.Error("no SubjectKeyId")
			}
		})
	}
	if err := inter.CheckSignatureFrom(root); err != nil {
		t.Errorf("intermediate not signed by root: %v", err)
	}
	if err := root.CheckSignatureFrom(root); err != nil {
		t.Errorf("root not self-signed: %v", err)
	}
	if !ca.IntermediateNotAfter().Equal(t0.Add(DefaultIntermediateTTL)) {
		t.Errorf("IntermediateNotAfter = %s", ca.IntermediateNotAfter())
	}

	if m := fileMode(t, dir); m != 0o700 {
		t.Errorf("dir mode %04o, want 0700", m)
	}
	wantModes := map[string]fs.FileMode{RootKeyFile: 0o600, IntermediateKeyFile: 0o600, RootCertFile: 0o644, IntermediateCertFile: 0o644}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(wantModes) {
		t.Errorf("dir holds %d entries, want exactly the 4 CA files (no temporary files left)", len(entries))
	}
	for name, want := range wantModes {
		p := filepath.Join(dir, name)
		if m := fileMode(t, p); m != want {
			t.Errorf("%s mode %04o, want %04o", name, m, want)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode(data)
		wantType := "CERTIFICATE"
		if strings.HasSuffix(name, ".key") {
			wantType = "PRIVATE KEY"
		}
		if block == nil || block.Type != wantType {
			t.Errorf("%s: want a %q PEM block", name, wantType)
		}
	}
}

func TestOpenTightensExistingEmptyDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), dir, testOptions()); err != nil {
		t.Fatal(err)
	}
	if m := fileMode(t, dir); m != 0o700 {
		t.Errorf("dir mode %04o, want 0700", m)
	}
}

func TestOpenReloadsSameCA(t *testing.T) {
	created, dir := newTestCA(t, testOptions())
	before := snapshot(t, dir)
	later := testOptions()
	later.Now = at(t0.Add(24 * time.Hour))
	loaded, err := Open(context.Background(), dir, later)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	assertUnchanged(t, dir, before)
	if !bytes.Equal(loaded.Root().Raw, created.Root().Raw) {
		t.Error("reloaded root differs")
	}
	if !bytes.Equal(loaded.Intermediate().Raw, created.Intermediate().Raw) {
		t.Error("reloaded intermediate differs")
	}
	if !loaded.IntermediateNotAfter().Equal(created.IntermediateNotAfter()) {
		t.Error("reloaded IntermediateNotAfter differs")
	}
	// The reloaded key signs leaves the original root trusts.
	cert, err := loaded.Issue(context.Background(), issuer.Request{Identity: testIdentity(), CSR: newCSR(t, newP256(t), nil), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	verifyLeaf(t, created, cert.Leaf, t0.Add(24*time.Hour), x509.ExtKeyUsageClientAuth)
}

func TestOpenPartialDirectory(t *testing.T) {
	for _, missing := range []string{RootCertFile, RootKeyFile, IntermediateCertFile, IntermediateKeyFile} {
		t.Run(missing, func(t *testing.T) {
			_, dir := newTestCA(t, testOptions())
			p := filepath.Join(dir, missing)
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			before := snapshot(t, dir)
			_, err := Open(context.Background(), dir, testOptions())
			if err == nil {
				t.Fatal("Open succeeded on a partial CA directory")
			}
			if !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "missing") {
				t.Errorf("error %q does not name the missing file %s", err, p)
			}
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("%s was regenerated", missing)
			}
			assertUnchanged(t, dir, before)
		})
	}
}

func TestOpenRejectsBadFiles(t *testing.T) {
	readFile := func(t *testing.T, p string) []byte {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	writeFile := func(t *testing.T, p string, data []byte) { // keeps the file's mode
		t.Helper()
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	chmod := func(name string, mode fs.FileMode) func(*testing.T, string) {
		return func(t *testing.T, dir string) {
			if err := os.Chmod(filepath.Join(dir, name), mode); err != nil {
				t.Fatal(err)
			}
		}
	}
	garbage := func(name string) func(*testing.T, string) {
		return func(t *testing.T, dir string) { writeFile(t, filepath.Join(dir, name), []byte("not a PEM file\n")) }
	}
	copyFile := func(from, to string) func(*testing.T, string) {
		return func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, to), readFile(t, filepath.Join(dir, from)))
		}
	}

	tests := []struct {
		name   string
		mutate func(t *testing.T, dir string)
		file   string // the path the error must name
		want   string // and a part of the reason
	}{
		{"garbage root cert", garbage(RootCertFile), RootCertFile, "no PEM block found"},
		{"garbage root key", garbage(RootKeyFile), RootKeyFile, "no PEM block found"},
		{"garbage intermediate cert", garbage(IntermediateCertFile), IntermediateCertFile, "no PEM block found"},
		{"garbage intermediate key", garbage(IntermediateKeyFile), IntermediateKeyFile, "no PEM block found"},
		{"empty intermediate cert", func(t *testing.T, dir string) { writeFile(t, filepath.Join(dir, IntermediateCertFile), nil) }, IntermediateCertFile, "no PEM block found"},
		{"corrupt DER in cert", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, RootCertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")}))
		}, RootCertFile, "not a valid certificate"},
		{"corrupt DER in key", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, IntermediateKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("junk")}))
		}, IntermediateKeyFile, "not a valid PKCS#8 private key"},
		{"key in cert file", copyFile(RootKeyFile, RootCertFile), RootCertFile, `PEM block is "PRIVATE KEY", want "CERTIFICATE"`},
		{"cert in key file", copyFile(RootCertFile, RootKeyFile), RootKeyFile, `PEM block is "CERTIFICATE", want "PRIVATE KEY"`},
		{"trailing data", func(t *testing.T, dir string) {
			p := filepath.Join(dir, IntermediateCertFile)
			writeFile(t, p, append(readFile(t, p), readFile(t, filepath.Join(dir, RootCertFile))...))
		}, IntermediateCertFile, "unexpected data after"},
		{"SEC1 key", func(t *testing.T, dir string) {
			p := filepath.Join(dir, IntermediateKeyFile)
			block, _ := pem.Decode(readFile(t, p))
			k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			der, err := x509.MarshalECPrivateKey(k.(*ecdsa.PrivateKey))
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, p, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}))
		}, IntermediateKeyFile, "openssl pkcs8 -topk8"},
		{"root key does not match", copyFile(IntermediateKeyFile, RootKeyFile), RootKeyFile, "does not match"},
		{"intermediate key does not match", copyFile(RootKeyFile, IntermediateKeyFile), IntermediateKeyFile, "does not match"},
		{"intermediate of another CA", func(t *testing.T, dir string) {
			_, other := newTestCA(t, testOptions())
			for _, name := range []string{IntermediateCertFile, IntermediateKeyFile} {
				writeFile(t, filepath.Join(dir, name), readFile(t, filepath.Join(other, name)))
			}
		}, IntermediateCertFile, "not signed by the root"},
		{"root is not a CA", func(t *testing.T, dir string) {
			key := newP256(t)
			tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "leaf"}, NotBefore: t0, NotAfter: t0.Add(time.Hour)}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
			if err != nil {
				t.Fatal(err)
			}
			keyDER, err := x509.MarshalPKCS8PrivateKey(key)
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(dir, RootCertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
			writeFile(t, filepath.Join(dir, RootKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
		}, RootCertFile, "not a CA"},
		{"root key mode 0644", chmod(RootKeyFile, 0o644), RootKeyFile, "permissions 0644 are too open"},
		{"intermediate key mode 0640", chmod(IntermediateKeyFile, 0o640), IntermediateKeyFile, "permissions 0640 are too open"},
		{"intermediate key mode 0604", chmod(IntermediateKeyFile, 0o604), IntermediateKeyFile, "permissions 0604 are too open"},
		{"cert file is a directory", func(t *testing.T, dir string) {
			p := filepath.Join(dir, RootCertFile)
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
		}, RootCertFile, "is a directory"},
		{"unreadable cert", chmod(RootCertFile, 0), RootCertFile, "permission denied"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.want == "permission denied" && os.Geteuid() == 0 {
				t.Skip("root reads any file")
			}
			_, dir := newTestCA(t, testOptions())
			tc.mutate(t, dir)
			before := snapshot(t, dir)
			_, err := Open(context.Background(), dir, testOptions())
			if err == nil {
				t.Fatal("Open succeeded")
			}
			p := filepath.Join(dir, tc.file)
			if !strings.Contains(err.Error(), p+":") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\nwant it to name %s and say %q", err, p, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "load CA: ") {
				t.Errorf("error %q lacks the load CA: prefix", err)
			}
			assertUnchanged(t, dir, before)
		})
	}
}

func TestOpenRejectsBadInput(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		ctx  context.Context
		dir  string
		td   string
		want string
	}{
		{"empty trust domain", context.Background(), filepath.Join(t.TempDir(), "ca"), "", "invalid trust domain"},
		{"bad trust domain", context.Background(), filepath.Join(t.TempDir(), "ca"), "Mesh/Local", "invalid trust domain"},
		{"canceled context", canceled, filepath.Join(t.TempDir(), "ca"), testTrustDomain, "context canceled"},
		{"dir is a file", context.Background(), notDir, testTrustDomain, notDir},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(tc.ctx, tc.dir, Options{TrustDomain: tc.td})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error = %v, want one containing %q", err, tc.want)
			}
			if tc.dir != notDir {
				if _, err := os.Stat(tc.dir); !os.IsNotExist(err) {
					t.Error("CA directory created despite the error")
				}
			}
		})
	}
}

func TestOpenDefaultClock(t *testing.T) {
	ca, _ := newTestCA(t, Options{TrustDomain: testTrustDomain})
	if now := time.Now(); ca.Root().NotBefore.After(now) || ca.Root().NotAfter.Before(now) {
		t.Errorf("root validity %s..%s does not cover now with the default clock", ca.Root().NotBefore, ca.Root().NotAfter)
	}
}

func TestRoots(t *testing.T) {
	ca, _ := newTestCA(t, testOptions())
	roots, err := ca.Roots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(roots) != 1 || roots[0] != ca.Root() {
		t.Fatalf("Roots = %v, want exactly the root", roots)
	}
	roots[0] = nil // a caller's slice is its own
	if again, _ := ca.Roots(context.Background()); again[0] != ca.Root() {
		t.Error("Roots shares its slice between calls")
	}
}
