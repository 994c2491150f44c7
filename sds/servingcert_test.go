package sds

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeIssuer hands out serving certificates valid for ttl from the clock's
// now, numbered by serial, failing while fail is set.
type fakeIssuer struct {
	mu    sync.Mutex
	now   func() time.Time
	ttl   time.Duration
	calls int
	fail  bool
}

func (f *fakeIssuer) issue() (tls.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.fail {
		return tls.Certificate{}, errors.New("CA down")
	}
	return tls.Certificate{Leaf: &x509.Certificate{SerialNumber: big.NewInt(int64(f.calls)), NotAfter: f.now().Add(f.ttl)}}, nil
}

func TestServingCertRenewal(t *testing.T) {
	type step struct {
		advance    time.Duration
		fail       bool
		wantSerial int64
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{name: "kept before two thirds of its life", steps: []step{
			{advance: 0, wantSerial: 1}, {advance: 39 * time.Minute, wantSerial: 1},
		}},
		{name: "renewed after two thirds of its life", steps: []step{
			{advance: 41 * time.Minute, wantSerial: 2}, {advance: time.Minute, wantSerial: 2},
		}},
		{name: "failed renewal keeps the current one and retries after a minute", steps: []step{
			{advance: 41 * time.Minute, fail: true, wantSerial: 1},  // attempt 2 fails
			{advance: 30 * time.Second, fail: false, wantSerial: 1}, // too early to retry
			{advance: 31 * time.Second, fail: false, wantSerial: 3}, // retry succeeds
			{advance: 20 * time.Minute, fail: false, wantSerial: 3}, // fresh one kept
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock := &testClock{}
			f := &fakeIssuer{now: clock.Now, ttl: time.Hour}
			sc, err := NewServingCert(f.issue, clock.Now)
			if err != nil {
				t.Fatal(err)
			}
			for i, st := range tc.steps {
				clock.Advance(st.advance)
				f.mu.Lock()
				f.fail = st.fail
				f.mu.Unlock()
				c, err := sc.GetCertificate(nil)
				if err != nil || c == nil {
					t.Fatalf("step %d: GetCertificate = %v, %v", i, c, err)
				}
				if got := c.Leaf.SerialNumber.Int64(); got != st.wantSerial {
					t.Errorf("step %d: serving certificate %d, want %d", i, got, st.wantSerial)
				}
			}
		})
	}
}

func TestServingCertRefusesBadFirstCertificate(t *testing.T) {
	tests := []struct {
		name  string
		issue func() (tls.Certificate, error)
	}{
		{"issuer error", func() (tls.Certificate, error) { return tls.Certificate{}, errors.New("CA down") }},
		{"no parsed leaf", func() (tls.Certificate, error) { return tls.Certificate{Certificate: [][]byte{{1}}}, nil }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewServingCert(tc.issue, nil); err == nil || !strings.Contains(err.Error(), "SDS server certificate") {
				t.Errorf("NewServingCert error %v, want one naming the SDS server certificate", err)
			}
		})
	}
}

func TestServingCertTLSConfig(t *testing.T) {
	f := &fakeIssuer{now: time.Now, ttl: time.Hour}
	sc, err := NewServingCert(f.issue, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := sc.TLSConfig()
	if c.MinVersion < tls.VersionTLS12 || !slices.Contains(c.NextProtos, "h2") || c.GetCertificate == nil {
		t.Errorf("TLS config: min version %x, ALPN %v", c.MinVersion, c.NextProtos)
	}
}

func TestServingCertRenewSoon(t *testing.T) {
	clock := &testClock{}
	f := &fakeIssuer{now: clock.Now, ttl: time.Hour}
	sc, err := NewServingCert(f.issue, clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	serial := func() int64 {
		c, err := sc.GetCertificate(nil)
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf.SerialNumber.Int64()
	}
	if got := serial(); got != 1 {
		t.Fatalf("serial %d, want 1", got)
	}
	sc.RenewSoon()
	if got := serial(); got != 2 {
		t.Errorf("after RenewSoon: serial %d, want 2 (renewed at the next handshake)", got)
	}
	if got := serial(); got != 2 {
		t.Errorf("renewed again: serial %d, want 2", got)
	}
}
