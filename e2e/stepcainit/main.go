// Command stepcainit creates a local step-ca for sds-server (root,
// intermediate, the JWK provisioner with deploy/step-ca/sds-server.tpl, and
// ca.json) and prints how to run it and point sds-server at it. `make stepca`
// runs it; an existing directory is left as it is.
//
//	go run ./e2e/stepcainit -dir .tools/stepca -address 127.0.0.1:9000
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/meshid/sds-server/internal/stepcainit"
)

func main() {
	dir := flag.String("dir", ".tools/stepca", "step-ca directory to create ($STEPPATH layout)")
	addr := flag.String("address", "127.0.0.1:9000", "address step-ca listens on")
	prov := flag.String("provisioner", "sds-server", "name of the JWK provisioner")
	minDur := flag.Duration("min-tls-cert-duration", 10*time.Second, "provisioner claim minTLSCertDuration (0: step-ca's default, 5m)")
	maxDur := flag.Duration("max-tls-cert-duration", 24*time.Hour, "provisioner claim maxTLSCertDuration (0: step-ca's default, 24h)")
	noDB := flag.Bool("no-db", false, "run step-ca without a database (default: a bbolt file in <dir>/db)")
	flag.Parse()

	cfgFile := filepath.Join(*dir, "config", "ca.json")
	if _, err := os.Stat(cfgFile); err == nil {
		fmt.Printf("stepcainit: %s exists; leaving it as it is (remove %s to start over)\n", cfgFile, *dir)
		return
	} else if !errors.Is(err, fs.ErrNotExist) {
		fail(err)
	}
	ca, err := stepcainit.Init(stepcainit.Options{
		Dir: *dir, Address: *addr, Provisioner: *prov, NoDB: *noDB,
		MinTLSCertDuration: *minDur, MaxTLSCertDuration: *maxDur,
	})
	if err != nil {
		fail(err)
	}
	fmt.Printf(`stepcainit: created a step-ca in %s
  run it:   step-ca --password-file %s %s
  root:     %s (sha256 %s)

sds-server config (YAML) for it:
  ca:
    backend: stepca
    url: %s
    root_fingerprint: %s
    provisioner: %s
    key_file: %s
    password_file: %s
`, ca.Dir, ca.PasswordFile, ca.ConfigFile, ca.RootFile, ca.Fingerprint,
		ca.URL, ca.Fingerprint, ca.Provisioner, ca.KeyFile, ca.ProvisionerPasswordFile)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "stepcainit:", err)
	os.Exit(1)
}
