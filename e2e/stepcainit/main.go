// Command stepcainit creates a local step-ca for sds-server (root,
// intermediate, the JWK provisioner with deploy/step-ca/sds-server.tpl, and
// ca.json) and prints how to run it and point sds-server at it. `make stepca`
// runs it; an existing directory is left as it is. With -sds-config FILE it
// also writes the sds-server configuration for that step-ca (new or
// existing) to FILE.
//
//	go run ./e2e/stepcainit -dir .tools/stepca -address 127.0.0.1:9000 -sds-config .tools/stepca/sds-server.yaml
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
	sdsConfig := flag.String("sds-config", "", "also write the sds-server config (YAML) for this step-ca to this file")
	stepca := flag.String("stepca-bin", "step-ca", "step-ca command to show in the instructions")
	flag.Parse()

	cfgFile := filepath.Join(*dir, "config", "ca.json")
	var ca *stepcainit.CA
	_, err := os.Stat(cfgFile)
	switch {
	case err == nil:
		if *sdsConfig == "" {
			fmt.Printf("stepcainit: %s exists; leaving it as it is (remove %s to start over)\n", cfgFile, *dir)
			return
		}
		if ca, err = stepcainit.Load(*dir); err != nil {
			fail(fmt.Errorf("%w (remove %s to start over)", err, *dir))
		}
		fmt.Printf("stepcainit: using the existing step-ca in %s\n", ca.Dir)
	case errors.Is(err, fs.ErrNotExist):
		ca, err = stepcainit.Init(stepcainit.Options{
			Dir: *dir, Address: *addr, Provisioner: *prov, NoDB: *noDB,
			MinTLSCertDuration: *minDur, MaxTLSCertDuration: *maxDur,
		})
		if err != nil {
			fail(err)
		}
		fmt.Printf("stepcainit: created a step-ca in %s\n", ca.Dir)
	default:
		fail(err)
	}
	fmt.Printf("  run it:   %s --password-file %s %s\n  root:     %s (sha256 %s)\n",
		*stepca, ca.PasswordFile, ca.ConfigFile, ca.RootFile, ca.Fingerprint)
	if *sdsConfig != "" {
		if err := os.WriteFile(*sdsConfig, ca.SDSServerConfig(), 0o644); err != nil {
			fail(err)
		}
		fmt.Printf("  sds-server config: %s\n", *sdsConfig)
		return
	}
	fmt.Printf("\nsds-server config (YAML) for it:\n%s", ca.SDSServerConfig())
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "stepcainit:", err)
	os.Exit(1)
}
