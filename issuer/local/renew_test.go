package local

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer"
)

// fakeClock is a settable clock, safe for concurrent use.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// lifecycleOptions is a CA on clk with 30-day intermediates renewed when a
// third is left: 10 days of lead, a publish delay of one hour.
func lifecycleOptions(clk *fakeClock, events *eventLog) Options {
	o := Options{TrustDomain: testTrustDomain, Now: clk.Now, IntermediateTTL: 30 * 24 * time.Hour}
	if events != nil {
		o.Observe = events.add
	}
	return o
}

type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
}

func (l *eventLog) kinds() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, e := range l.events {
		out = append(out, fmt.Sprintf("%s:%d", e.Kind, e.Generation))
	}
	return out
}

// issueLeaf issues a workload certificate and returns it with its chain.
func issueLeaf(t testing.TB, ca *CA) *issuer.Certificate {
	t.Helper()
	c, err := ca.Issue(context.Background(), issuer.Request{Identity: testIdentity(), CSR: newCSR(t, newP256(t), nil), TTL: time.Hour})
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	return c
}

// verifyChain checks that c's chain PEM (leaf, intermediate) verifies
// against root at time at, and returns the intermediate that signed it.
func verifyChain(t testing.TB, c *issuer.Certificate, root *x509.Certificate, at time.Time) *x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for rest := c.ChainPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, cert)
	}
	if len(certs) != 2 {
		t.Fatalf("chain has %d certificates, want leaf and intermediate", len(certs))
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	inters.AddCert(certs[1])
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: at,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("leaf %x does not verify at %s: %v", certs[0].SerialNumber, at, err)
	}
	return certs[1]
}

// crlBlocks signs a revocation list and returns its PEM blocks parsed.
func crlBlocks(t testing.TB, ca *CA, now time.Time) []*x509.RevocationList {
	t.Helper()
	crl, err := ca.SignCRL(context.Background(), big.NewInt(1), nil, now.Add(-time.Minute), now.Add(time.Hour))
	if err != nil {
		t.Fatalf("SignCRL: %v", err)
	}
	var out []*x509.RevocationList
	for rest := crl.PEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		l, err := x509.ParseRevocationList(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, l)
	}
	return out
}

// crlIssuers names the intermediates (by common name) that signed lists,
// each list's signature checked against the CA's certificates.
func crlIssuers(t testing.TB, ca *CA, lists []*x509.RevocationList) []string {
	t.Helper()
	var names []string
	for _, l := range lists {
		ok := false
		for _, c := range ca.Certificates() {
			if l.CheckSignatureFrom(c.Cert) == nil {
				ok = true
				names = append(names, c.Cert.Subject.CommonName)
			}
		}
		if !ok {
			t.Errorf("list of %s verifies against no CA certificate", l.Issuer)
		}
	}
	slices.Sort(names)
	return names
}

func TestRenewalLifecycle(t *testing.T) {
	clk := &fakeClock{t: t0}
	events := &eventLog{}
	ca, dir := newTestCA(t, lifecycleOptions(clk, events))
	ctx := context.Background()
	gen1 := ca.Intermediate()
	root := ca.Root()
	oldLeaf := issueLeaf(t, ca)
	renewAt := gen1.NotAfter.Add(-10 * 24 * time.Hour) // a third of 30 days left
	pd := ca.publishDelay(ca.state.Load().active)
	if pd != time.Hour {
		t.Fatalf("publish delay %s, want 1h (capped)", pd)
	}

	if next := ca.step(ctx); !next.Equal(minTime(renewAt, t0.Add(time.Minute))) {
		t.Errorf("first check: next at %s, want %s", next, t0.Add(time.Minute))
	}
	clk.Set(renewAt.Add(-time.Second))
	if next := ca.step(ctx); !next.Equal(renewAt) {
		t.Errorf("a second before renewal: next at %s, want %s", next, renewAt)
	}
	if _, err := os.Stat(filepath.Join(dir, StateFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state file written before any renewal (stat: %v)", err)
	}

	// Renewal: a successor is staged, not yet signing certificates.
	clk.Set(renewAt)
	ca.step(ctx)
	if got := roles(ca); got != "root intermediate:1 intermediate_staged:2" {
		t.Fatalf("after renewal: %s", got)
	}
	if in := verifyChain(t, issueLeaf(t, ca), root, clk.Now()); !in.Equal(gen1) {
		t.Error("a staged intermediate signed a certificate before its revocation list was out")
	}
	// It waits for its first revocation list, however long that takes.
	clk.Add(3 * pd)
	ca.step(ctx)
	if ca.state.Load().staged == nil {
		t.Fatal("staged intermediate activated before any revocation list it signed")
	}
	if got := crlIssuers(t, ca, crlBlocks(t, ca, clk.Now())); fmt.Sprint(got) != "[sds-server intermediate CA sds-server intermediate CA 2]" {
		t.Errorf("lists signed by %v, want both intermediates", got)
	}
	published := clk.Now()
	clk.Set(published.Add(pd - time.Second))
	if next := ca.step(ctx); !next.Equal(published.Add(pd)) || ca.state.Load().staged == nil {
		t.Fatalf("before the publish delay: next %s (want %s), staged %v", next, published.Add(pd), ca.state.Load().staged != nil)
	}

	// Activation: new certificates chain to generation 2; old ones verify.
	clk.Set(published.Add(pd))
	ca.step(ctx)
	if got := roles(ca); got != "root intermediate:2 intermediate_retired:1" {
		t.Fatalf("after activation: %s", got)
	}
	newLeaf := issueLeaf(t, ca)
	if in := verifyChain(t, newLeaf, root, clk.Now()); in.Equal(gen1) || !in.Equal(ca.Intermediate()) {
		t.Error("new certificate does not chain to the new intermediate")
	}
	verifyChain(t, oldLeaf, root, oldLeaf.Leaf.NotAfter.Add(-time.Second))
	if got := crlIssuers(t, ca, crlBlocks(t, ca, clk.Now())); len(got) != 2 {
		t.Errorf("lists signed by %v, want the active and the retired intermediate", got)
	}
	// A revoked certificate of the retired intermediate is on the list
	// that intermediate signed, the one a sidecar checks it against.
	crl, err := ca.SignCRL(ctx, big.NewInt(7), []issuer.RevokedCertificate{{SerialNumber: oldLeaf.Leaf.SerialNumber, RevokedAt: clk.Now()}},
		clk.Now(), clk.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	onOldList := false
	for rest := crl.PEM; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		l, err := x509.ParseRevocationList(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if l.CheckSignatureFrom(gen1) == nil && l.Issuer.String() == gen1.Subject.String() {
			for _, e := range l.RevokedCertificateEntries {
				onOldList = onOldList || e.SerialNumber.Cmp(oldLeaf.Leaf.SerialNumber) == 0
			}
		}
	}
	if !onOldList {
		t.Error("a revoked certificate of the retired intermediate is not on that intermediate's list")
	}
	if ca.IntermediateNotAfter().Sub(clk.Now()) < 29*24*time.Hour {
		t.Errorf("new intermediate expires at %s", ca.IntermediateNotAfter())
	}

	// A restart resumes from the state file.
	re, err := Open(ctx, dir, lifecycleOptions(clk, nil))
	if err != nil {
		t.Fatalf("reopen after renewal: %v", err)
	}
	if got := roles(re); got != "root intermediate:2 intermediate_retired:1" {
		t.Errorf("reopened: %s", got)
	}

	// The retired one is dropped when it expires, with its files.
	clk.Set(gen1.NotAfter)
	ca.step(ctx)
	if got := roles(ca); got != "root intermediate:2" {
		t.Fatalf("after the old one expired: %s", got)
	}
	for _, f := range []string{IntermediateCertFile, IntermediateKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s of the expired intermediate still there (stat: %v)", f, err)
		}
	}
	if got := crlIssuers(t, ca, crlBlocks(t, ca, clk.Now())); fmt.Sprint(got) != "[sds-server intermediate CA 2]" {
		t.Errorf("lists signed by %v, want generation 2 alone", got)
	}
	if got := fmt.Sprint(events.kinds()); got != "[staged:2 activated:2 pruned:1]" {
		t.Errorf("events %s", got)
	}

	// And the next renewal comes a lifetime later, to generation 3.
	clk.Set(ca.renewAt(ca.state.Load().active))
	ca.step(ctx)
	crlBlocks(t, ca, clk.Now())
	clk.Add(pd)
	ca.step(ctx)
	if got := roles(ca); got != "root intermediate:3 intermediate_retired:2" {
		t.Errorf("second renewal: %s", got)
	}
}

// roles summarises the CA's certificates.
func roles(ca *CA) string {
	var parts []string
	for _, c := range ca.Certificates() {
		if c.Generation == 0 {
			parts = append(parts, c.Role)
		} else {
			parts = append(parts, fmt.Sprintf("%s:%d", c.Role, c.Generation))
		}
	}
	return strings.Join(parts, " ")
}

var errCrash = errors.New("simulated crash")

// drive takes ca through one whole renewal from now: staged (if due),
// published, activated, and the old generation pruned.
func drive(t *testing.T, ctx context.Context, ca *CA, clk *fakeClock) {
	t.Helper()
	ca.step(ctx)
	crlBlocks(t, ca, clk.Now())
	clk.Add(ca.publishDelay(ca.state.Load().active))
	ca.step(ctx)
	if st := ca.state.Load(); len(st.retired) > 0 {
		clk.Set(st.retired[0].cert.NotAfter)
	}
	ca.step(ctx)
}

func TestRenewalCrashAtEveryStep(t *testing.T) {
	ctx := context.Background()
	clk := &fakeClock{t: t0}
	pristine, pdir := newTestCA(t, lifecycleOptions(clk, nil))
	oldLeaf := issueLeaf(t, pristine)
	root := pristine.Root()
	start := pristine.renewAt(pristine.state.Load().active)

	// Record every step of a whole renewal.
	var steps []string
	{
		dir := copyDir(t, pdir)
		clk.Set(start)
		ca, err := Open(ctx, dir, lifecycleOptions(clk, nil))
		if err != nil {
			t.Fatal(err)
		}
		ca.disk.hook = func(s string) error { steps = append(steps, s); return nil }
		drive(t, ctx, ca, clk)
		if got := roles(ca); got != "root intermediate:2" {
			t.Fatalf("uninterrupted renewal ends with %s", got)
		}
	}
	if len(steps) < 12 {
		t.Fatalf("only %d steps recorded: %q", len(steps), steps)
	}
	for i, name := range steps {
		t.Run(fmt.Sprintf("%02d %s", i, name), func(t *testing.T) {
			dir := copyDir(t, pdir)
			clk.Set(start)
			ca, err := Open(ctx, dir, lifecycleOptions(clk, nil))
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			ca.disk.hook = func(string) error {
				if n++; n > i {
					return errCrash
				}
				return nil
			}
			drive(t, ctx, ca, clk)

			// The CA directory as the crash left it opens, and signs.
			re, err := Open(ctx, dir, lifecycleOptions(clk, nil))
			if err != nil {
				t.Fatalf("open after a crash at %q: %v", name, err)
			}
			verifyChain(t, issueLeaf(t, re), root, clk.Now())
			// And it resumes: a whole renewal from there ends on a new
			// generation, with the old certificates verifying until then.
			before := roles(re)
			if len(re.state.Load().retired) == 0 || re.state.Load().retired[0].cert.NotAfter.After(clk.Now()) {
				verifyChain(t, oldLeaf, root, oldLeaf.Leaf.NotAfter.Add(-time.Second))
			}
			drive(t, ctx, re, clk)
			st := re.state.Load()
			if st.active.gen < 2 || st.staged != nil || len(st.retired) != 0 {
				t.Fatalf("after a crash at %q (state then: %s), resuming ends with %s", name, before, roles(re))
			}
			verifyChain(t, issueLeaf(t, re), root, clk.Now())
			if _, err := Open(ctx, dir, lifecycleOptions(clk, nil)); err != nil {
				t.Fatalf("open after resuming: %v", err)
			}
		})
	}
}

// copyDir copies the CA directory src into a new temporary directory.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "ca")
	if err := os.Mkdir(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := e.Info()
		if err := os.WriteFile(filepath.Join(dst, e.Name()), data, fi.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func TestIssueDuringRenewal(t *testing.T) {
	ctx := context.Background()
	clk := &fakeClock{t: t0}
	ca, _ := newTestCA(t, lifecycleOptions(clk, nil))
	root := ca.Root()
	csr := newCSR(t, newP256(t), nil)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var issued atomic.Int64
	errs := make(chan error, 4)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := ca.Issue(ctx, issuer.Request{Identity: testIdentity(), CSR: csr, TTL: time.Hour})
				if err == nil {
					// The chain's intermediate is the one that signed it.
					b, _ := pem.Decode(c.ChainPEM[len(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Leaf.Raw})):])
					var in *x509.Certificate
					if b != nil {
						in, err = x509.ParseCertificate(b.Bytes)
					}
					if err == nil && (in == nil || c.Leaf.CheckSignatureFrom(in) != nil || in.CheckSignatureFrom(root) != nil) {
						err = fmt.Errorf("leaf %x does not chain through its own chain's intermediate", c.Leaf.SerialNumber)
					}
				}
				if err != nil {
					errs <- err
					return
				}
				issued.Add(1)
			}
		}()
	}
	for i := 0; i < 3; i++ {
		clk.Set(ca.renewAt(ca.state.Load().active))
		drive(t, ctx, ca, clk)
		if _, err := ca.ServerCertificate([]string{"localhost"}, time.Hour); err != nil {
			t.Error(err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := ca.state.Load().active.gen; got != 4 {
		t.Errorf("after 3 renewals generation %d is active, want 4", got)
	}
	t.Logf("%d certificates issued during 3 renewals", issued.Load())
}

func TestOpenRenewsExpiredIntermediate(t *testing.T) {
	ctx := context.Background()
	clk := &fakeClock{t: t0}
	events := &eventLog{}
	ca, dir := newTestCA(t, lifecycleOptions(clk, nil))
	root, old := ca.Root(), ca.Intermediate()

	clk.Set(old.NotAfter.Add(time.Hour))
	re, err := Open(ctx, dir, lifecycleOptions(clk, events))
	if err != nil {
		t.Fatalf("Open with an expired intermediate and a usable root: %v", err)
	}
	if re.Intermediate().Equal(old) || !re.Root().Equal(root) {
		t.Fatal("the expired intermediate was not replaced under the same root")
	}
	verifyChain(t, issueLeaf(t, re), root, clk.Now())
	if got := fmt.Sprint(events.kinds()); got != "[staged:2 activated:2]" {
		t.Errorf("events %s", got)
	}
	if _, err := Open(ctx, dir, lifecycleOptions(clk, nil)); err != nil {
		t.Errorf("reopen: %v", err)
	}
}

func TestOpenRefusesExpiredIntermediateItCannotRenew(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name    string
		now     func(ca *CA) time.Time
		breakIt func(t *testing.T, dir string)
		want    []string
	}{
		{"root expired", func(ca *CA) time.Time { return ca.Root().NotAfter.Add(time.Hour) }, nil,
			[]string{"expired at", "cannot be renewed", "root CA root.crt expired", "a new root is needed"}},
		{"root key missing", func(ca *CA) time.Time { return ca.Intermediate().NotAfter }, func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, RootKeyFile)); err != nil {
				t.Fatal(err)
			}
		}, []string{RootKeyFile, "missing"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clk := &fakeClock{t: t0}
			ca, dir := newTestCA(t, lifecycleOptions(clk, nil))
			if tc.breakIt != nil {
				tc.breakIt(t, dir)
			}
			clk.Set(tc.now(ca))
			before := snapshot(t, dir)
			_, err := Open(ctx, dir, lifecycleOptions(clk, nil))
			if err == nil {
				t.Fatal("Open succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if after := snapshot(t, dir); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("the CA directory changed: %v -> %v", before, after)
			}
		})
	}
}

func TestIntermediateLifetimeOptions(t *testing.T) {
	tests := []struct {
		name        string
		ttl         time.Duration
		renewBefore float64
		allowShort  bool
		want        string // "" = accepted
	}{
		{"default", DefaultIntermediateTTL, DefaultIntermediateRenewBefore, false, ""},
		{"a day", 24 * time.Hour, 0.5, false, ""},
		{"short without the flag", 90 * time.Second, 0.3, false, "set allow_short_ttl"},
		{"short with the flag", 90 * time.Second, 0.3, true, ""},
		{"too short even with the flag", 10 * time.Second, 0.3, true, "want at least 30s"},
		{"renew before zero", 48 * time.Hour, -0.1, false, "ca.intermediate_renew_before"},
		{"renew before one", 48 * time.Hour, 1, false, "between 0 and 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateLifecycle(tc.ttl, tc.renewBefore, tc.allowShort)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
			} else if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
			dir := filepath.Join(t.TempDir(), "ca")
			ca, err := Open(context.Background(), dir, Options{TrustDomain: testTrustDomain, Now: at(t0),
				IntermediateTTL: tc.ttl, IntermediateRenewBefore: tc.renewBefore, AllowShortTTL: tc.allowShort})
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("Open error %v, want one saying %q", err, tc.want)
				}
				if _, serr := os.Stat(dir); !errors.Is(serr, os.ErrNotExist) {
					t.Errorf("Open created %s with a refused option", dir)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := ca.IntermediateNotAfter(); !got.Equal(t0.Add(tc.ttl)) {
				t.Errorf("intermediate expires at %s, want %s", got, t0.Add(tc.ttl))
			}
		})
	}
}

func TestStateFileRejected(t *testing.T) {
	ctx := context.Background()
	clk := &fakeClock{t: t0}
	ca, dir := newTestCA(t, lifecycleOptions(clk, nil))
	clk.Set(ca.renewAt(ca.state.Load().active))
	ca.step(ctx) // writes a state file
	good, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, from, to, want string }{
		{"newer format", `"format": 1`, `"format": 3`, "written by a newer version"},
		{"rotation status in format 1", `"status": "staged"`, `"status": "incoming"`, "which is active, not incoming"},
		{"incoming root without a rotation", `"status": "active"
    }
  ],`, `"status": "incoming"
    }
  ],`, "needs format 2"},
		{"unknown field", `"format": 1`, `"format": 1, "phase": "x"`, "corrupt state file"},
		{"path in a name", `"cert": "intermediate-2.crt"`, `"cert": "../intermediate-2.crt"`, "not a plain file name"},
		{"two active", `"status": "staged"`, `"status": "active"`, "exactly one active"},
		{"unknown root", `"root": "root"`, `"root": "other"`, "not in the file"},
		{"missing generation file", `"cert": "intermediate-2.crt"`, `"cert": "intermediate-9.crt"`, "intermediate-9.crt"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bad := strings.Replace(string(good), tc.from, tc.to, 1)
			if bad == string(good) {
				t.Fatalf("%q not in the state file:\n%s", tc.from, good)
			}
			if err := os.WriteFile(filepath.Join(dir, StateFile), []byte(bad), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Open(ctx, dir, lifecycleOptions(clk, nil))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Open error %v, want one saying %q", err, tc.want)
			}
		})
	}
}
