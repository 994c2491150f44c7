package stepca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/sds-server/internal/stepcainit"
	"github.com/meshid/sds-server/issuer"
)

func readPEMCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRootRotationFollowsStepCA walks step-ca through the README's root
// rotation (add root B, switch to B's intermediate, remove root A), with a
// restart of step-ca at each step: the issuer keeps issuing, its trust
// bundle follows step-ca's roots, it says when the intermediate changed,
// and a new issuer still pinning A by fingerprint opens afterwards thanks
// to the state file (and fails without it).
func TestRootRotationFollowsStepCA(t *testing.T) {
	tc := startCA(t, stepcainit.Options{})
	opts := tc.options()
	opts.StateFile = filepath.Join(t.TempDir(), "data", "stepca-roots.json")
	iss := open(t, opts)
	var changes atomic.Int32
	iss.OnIntermediateChange(func() { changes.Add(1) })
	rootA := readPEMCert(t, tc.RootFile)
	ctx := context.Background()

	issue := func(step string, want *x509.Certificate) {
		t.Helper()
		csr, _ := workloadCSR(t, testID)
		c, err := iss.Issue(ctx, issuer.Request{Identity: testID, CSR: csr, TTL: opts.TTL})
		if err != nil {
			t.Fatalf("%s: Issue: %v", step, err)
		}
		chain := parseChain(t, c.ChainPEM)
		if err := chain[len(chain)-1].CheckSignatureFrom(want); err != nil {
			t.Fatalf("%s: the workload chain does not end under %s: %v", step, want.Subject, err)
		}
	}
	roots := func(step string, want ...*x509.Certificate) {
		t.Helper()
		got, err := iss.Roots(ctx)
		if err != nil {
			t.Fatalf("%s: Roots: %v", step, err)
		}
		if len(got) != len(want) {
			t.Fatalf("%s: %d roots, want %d", step, len(got), len(want))
		}
		for i := range want {
			if !got[i].Equal(want[i]) {
				t.Fatalf("%s: root %d is %s, want %s", step, i, got[i].Subject, want[i].Subject)
			}
		}
		if !iss.Root().Equal(want[0]) {
			t.Fatalf("%s: Root() is %s, want %s", step, iss.Root().Subject, want[0].Subject)
		}
	}
	restart := func() {
		t.Helper()
		tc.stop()
		tc.start(t)
	}

	issue("start", rootA)
	roots("start", rootA)

	b, err := stepcainit.AddRoot(tc.CA, "sds-server test B", "b")
	if err != nil {
		t.Fatal(err)
	}
	rootB := readPEMCert(t, b.RootFile)
	if err := stepcainit.SetRoots(tc.ConfigFile, tc.RootFile, b.RootFile); err != nil {
		t.Fatal(err)
	}
	restart()
	roots("roots {A, B}", rootA, rootB)
	issue("roots {A, B}", rootA)
	if n := changes.Load(); n != 0 {
		t.Fatalf("intermediate change reported %d times before it changed", n)
	}

	if err := stepcainit.SetIntermediate(tc.ConfigFile, b.IntermediateCert, b.IntermediateKey); err != nil {
		t.Fatal(err)
	}
	restart()
	issue("B's intermediate", rootB)
	if n := changes.Load(); n != 1 {
		t.Fatalf("intermediate change reported %d times, want 1", n)
	}
	sc, err := iss.ServerCertificate([]string{"127.0.0.1"}, 0)
	if err == nil {
		t.Fatal("ServerCertificate with ttl 0 succeeded")
	}
	sc, err = iss.ServerCertificate([]string{"127.0.0.1"}, opts.TTL)
	if err != nil {
		t.Fatal(err)
	}
	if last, _ := x509.ParseCertificate(sc.Certificate[len(sc.Certificate)-1]); !last.Equal(rootB) {
		t.Fatalf("the SDS listener's chain ends with %s, want root B (bootstrap clients pin what it shows)", last.Subject)
	}
	roots("B's intermediate", rootB, rootA) // new tokens pin what the listener shows

	if err := stepcainit.SetRoots(tc.ConfigFile, b.RootFile); err != nil {
		t.Fatal(err)
	}
	restart()
	roots("roots {B}", rootB)
	issue("roots {B}", rootB)

	// A new sds-server process, its configuration still pinning A.
	again := open(t, opts)
	if !again.Root().Equal(rootB) {
		t.Fatalf("reopened on the state file: Root() is %s, want B", again.Root().Subject)
	}
	noState := opts
	noState.StateFile = filepath.Join(t.TempDir(), "none.json")
	if _, err := Open(ctx, noState); err == nil || !strings.Contains(err.Error(), "has no root with fingerprint") {
		t.Fatalf("Open pinning A without the state file: %v, want the fingerprint error", err)
	}
	if err := os.WriteFile(opts.StateFile, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, opts); err == nil || !strings.Contains(err.Error(), opts.StateFile) || !strings.Contains(err.Error(), "delete it") {
		t.Fatalf("Open with a corrupt state file: %v, want an error naming the file and the fix", err)
	}
}

// TestTrustState: the state file round-trips, is ignored for another pin,
// and is written 0600.
func TestTrustState(t *testing.T) {
	tc := startCA(t, stepcainit.Options{})
	root := readPEMCert(t, tc.RootFile)
	path := filepath.Join(t.TempDir(), "sub", "state.json")
	if got, err := loadTrustState(path, []string{"a"}); err != nil || got != nil {
		t.Fatalf("missing file: %v, %v; want nothing", got, err)
	}
	if err := saveTrustState(path, []string{"a"}, []*x509.Certificate{root}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v, %v; want mode 0600", fi, err)
	}
	tests := []struct {
		name string
		pin  []string
		want int
	}{
		{"same pin", []string{"a"}, 1},
		{"other pin", []string{"b"}, 0},
		{"more pins", []string{"a", "b"}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loadTrustState(path, tt.pin)
			if err != nil || len(got) != tt.want {
				t.Fatalf("got %d roots, %v; want %d", len(got), err, tt.want)
			}
			if tt.want > 0 && !got[0].Equal(root) {
				t.Fatal("the root read back differs")
			}
		})
	}
}

// TestOrderRoots: the listener's root first, else the intermediate's, then
// the roots trusted so far, then new ones; roots step-ca no longer serves
// are dropped.
func TestOrderRoots(t *testing.T) {
	a, b, c := selfSigned(t, "A"), selfSigned(t, "B"), selfSigned(t, "C")
	names := func(cs []*x509.Certificate) string {
		var s []string
		for _, x := range cs {
			s = append(s, x.Subject.CommonName)
		}
		return strings.Join(s, ",")
	}
	tests := []struct {
		name            string
		served, trusted []*x509.Certificate
		serving, inter  *x509.Certificate
		want            string
	}{
		{"unchanged", []*x509.Certificate{a}, []*x509.Certificate{a}, nil, nil, "A"},
		{"added keeps the trusted first", []*x509.Certificate{b, a}, []*x509.Certificate{a}, nil, nil, "A,B"},
		{"listener's root first", []*x509.Certificate{a, b}, []*x509.Certificate{a, b}, b, nil, "B,A"},
		{"removed dropped", []*x509.Certificate{b}, []*x509.Certificate{a, b}, a, nil, "B"},
		{"new roots in step-ca's order", []*x509.Certificate{c, b, a}, []*x509.Certificate{a}, nil, nil, "A,C,B"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := names(orderRoots(tt.served, tt.trusted, tt.serving, tt.inter)); got != tt.want {
				t.Errorf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func selfSigned(t *testing.T, cn string) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
