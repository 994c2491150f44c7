package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/meshid/sds-server/issuer/local"
)

// writeLegacyCA writes a CA of the first layout in dataDir/ca whose root
// and intermediate expire at the given times.
func writeLegacyCA(t *testing.T, dataDir string, rootNotAfter, interNotAfter time.Time) {
	t.Helper()
	dir := filepath.Join(dataDir, "ca")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	rootKey, interKey := newKey(), newKey()
	notBefore := time.Now().Add(-2 * 365 * 24 * time.Hour)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sds-server root CA", Organization: []string{"mesh.local"}},
		NotBefore: notBefore, NotAfter: rootNotAfter, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true, IsCA: true, MaxPathLen: 1}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	interTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "sds-server intermediate CA", Organization: []string{"mesh.local"}},
		NotBefore: notBefore, NotAfter: interNotAfter, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true}
	interDER, err := x509.CreateCertificate(rand.Reader, interTmpl, root, interKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte, mode os.FileMode) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
			t.Fatal(err)
		}
	}
	rk, _ := x509.MarshalPKCS8PrivateKey(rootKey)
	ik, _ := x509.MarshalPKCS8PrivateKey(interKey)
	write(local.RootCertFile, "CERTIFICATE", rootDER, 0o644)
	write(local.RootKeyFile, "PRIVATE KEY", rk, 0o600)
	write(local.IntermediateCertFile, "CERTIFICATE", interDER, 0o644)
	write(local.IntermediateKeyFile, "PRIVATE KEY", ik, 0o600)
}

func TestServeRenewsExpiredIntermediate(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	now := time.Now()
	writeLegacyCA(t, dataDir, now.Add(5*365*24*time.Hour), now.Add(-time.Hour))
	oldInter := readFiles(t, filepath.Join(dataDir, "ca"))[local.IntermediateCertFile]

	s := startServe(t, dataDir)
	m := sdsAddrRE.FindStringSubmatch(s.stdout.String())
	if m == nil {
		t.Fatalf("no sds address in %q", s.stdout)
	}
	// The listener serves a certificate of the new intermediate, whose
	// chain ends with the same root.
	conn, err := tls.Dial("tcp", m[1], &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}) // inspected below
	if err != nil {
		t.Fatal(err)
	}
	chain := conn.ConnectionState().PeerCertificates
	conn.Close()
	if len(chain) != 3 {
		t.Fatalf("served chain of %d certificates, want leaf, intermediate, root", len(chain))
	}
	if !time.Now().Before(chain[1].NotAfter) || chain[1].Subject.CommonName != "sds-server intermediate CA 2" {
		t.Errorf("served intermediate %q expires %s, want the renewed generation 2", chain[1].Subject.CommonName, chain[1].NotAfter)
	}
	if err := chain[0].CheckSignatureFrom(chain[1]); err != nil {
		t.Errorf("leaf not signed by the served intermediate: %v", err)
	}
	if code := s.stop(t); code != 0 {
		t.Fatalf("serve exited %d", code)
	}
	files := readFiles(t, filepath.Join(dataDir, "ca"))
	for _, f := range []string{local.StateFile, "intermediate-2.crt", "intermediate-2.key", local.RootCertFile, local.RootKeyFile} {
		if files[f] == "" {
			t.Errorf("no %s in the CA dir after renewal (has %v)", f, keys(files))
		}
	}
	if files[local.IntermediateCertFile] != "" && files[local.IntermediateCertFile] != oldInter {
		t.Error("the old intermediate file was rewritten")
	}
	if !strings.Contains(s.stderr.String(), "intermediate CA expired") {
		t.Errorf("no log line about the expired intermediate in %q", s.stderr)
	}
	// And it starts again from the new layout.
	serveOnceLayout(t, dataDir)
}

// serveOnceLayout starts and stops serve on dataDir.
func serveOnceLayout(t *testing.T, dataDir string) {
	t.Helper()
	s := startServe(t, dataDir)
	if code := s.stop(t); code != 0 {
		t.Fatalf("serve exited with %d\nstderr: %s", code, s.stderr)
	}
}

func TestServeRefusesExpiredIntermediateItCannotRenew(t *testing.T) {
	clearSDSEnv(t)
	dataDir := shortTempDir(t)
	now := time.Now()
	writeLegacyCA(t, dataDir, now.Add(-time.Minute), now.Add(-time.Hour))
	caDir := filepath.Join(dataDir, "ca")
	before := readFiles(t, caDir)

	serveFails(t, dataDir, filepath.Join(caDir, local.IntermediateCertFile), "expired at", "cannot be renewed", "root CA root.crt expired", "a new root is needed")

	if got := readFiles(t, caDir); !reflect.DeepEqual(got, before) {
		t.Errorf("CA dir changed by a failed start: has %v, want %v", keys(got), keys(before))
	}
}

func TestServeShortIntermediateTTLGate(t *testing.T) {
	clearSDSEnv(t)
	t.Setenv("SDS_CA_INTERMEDIATE_TTL", "90s")
	dataDir := shortTempDir(t)
	r := runCLI(t, "serve", "--data-dir", dataDir, "--listen-addr", "127.0.0.1:0", "--metrics-addr", "")
	checkOneLineError(t, r)
	for _, w := range []string{"ca.intermediate_ttl 1m30s", "allow_short_ttl"} {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr %q does not say %q", r.stderr, w)
		}
	}
	if _, err := os.Stat(filepath.Join(dataDir, "ca")); !os.IsNotExist(err) {
		t.Errorf("a CA was created despite the refused option (stat: %v)", err)
	}

	t.Setenv("SDS_CA_INTERMEDIATE_RENEW_BEFORE", "0.5")
	s := startServe(t, dataDir, "--allow-short-ttl")
	defer s.stop(t)
	inter := readFiles(t, filepath.Join(dataDir, "ca"))[local.IntermediateCertFile]
	b, _ := pem.Decode([]byte(inter))
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if life := c.NotAfter.Sub(c.NotBefore); life != 90*time.Second+time.Minute { // NotBefore is backdated 1m
		t.Errorf("intermediate lifetime %s, want 90s (+1m backdate)", life)
	}
}
