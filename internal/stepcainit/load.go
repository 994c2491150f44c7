package stepcainit

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"

	stepcatemplate "github.com/meshid/sds-server/deploy/step-ca"
)

// Load describes the step-ca directory dir that Init created earlier, from
// its config/defaults.json and config/ca.json, so that its sds-server
// configuration can be printed again. It checks that the root certificate
// still has the recorded fingerprint.
func Load(dir string) (*CA, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	var defaults struct {
		URL         string `json:"ca-url"`
		Fingerprint string `json:"fingerprint"`
		Root        string `json:"root"`
	}
	if err := readJSON(filepath.Join(dir, "config", "defaults.json"), &defaults); err != nil {
		return nil, err
	}
	var cfg struct {
		Address   string `json:"address"`
		Authority struct {
			Provisioners []struct {
				Type string `json:"type"`
				Name string `json:"name"`
			} `json:"provisioners"`
		} `json:"authority"`
		CRL *struct {
			Enabled bool   `json:"enabled"`
			IDPURL  string `json:"idpURL"`
		} `json:"crl"`
	}
	configFile := filepath.Join(dir, "config", "ca.json")
	if err := readJSON(configFile, &cfg); err != nil {
		return nil, err
	}
	ca := &CA{
		Dir:                     dir,
		ConfigFile:              configFile,
		PasswordFile:            filepath.Join(dir, "secrets", "password"),
		URL:                     defaults.URL,
		Address:                 cfg.Address,
		RootFile:                defaults.Root,
		Fingerprint:             defaults.Fingerprint,
		KeyFile:                 filepath.Join(dir, "secrets", "provisioner_key"),
		ProvisionerPasswordFile: filepath.Join(dir, "secrets", "provisioner_password"),
		TemplateFile:            filepath.Join(dir, "templates", "x509", stepcatemplate.FileName),
	}
	for _, p := range cfg.Authority.Provisioners {
		if p.Type == "JWK" {
			ca.Provisioner = p.Name
			break
		}
	}
	if cfg.CRL != nil && cfg.CRL.Enabled {
		ca.CRLURL = cfg.CRL.IDPURL
	}
	switch {
	case ca.URL == "" || ca.RootFile == "" || ca.Fingerprint == "":
		return nil, fmt.Errorf("stepcainit: %s lacks ca-url, root or fingerprint", filepath.Join(dir, "config", "defaults.json"))
	case ca.Provisioner == "":
		return nil, fmt.Errorf("stepcainit: %s has no JWK provisioner", configFile)
	}
	data, err := os.ReadFile(ca.RootFile)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("stepcainit: %s: no PEM certificate", ca.RootFile)
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return nil, fmt.Errorf("stepcainit: %s: %w", ca.RootFile, err)
	}
	if sum := sha256.Sum256(block.Bytes); hex.EncodeToString(sum[:]) != ca.Fingerprint {
		return nil, fmt.Errorf("stepcainit: %s does not have the fingerprint %s recorded in config/defaults.json", ca.RootFile, ca.Fingerprint)
	}
	return ca, nil
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("stepcainit: %w", err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("stepcainit: %s: %w", path, err)
	}
	return nil
}

// SDSServerConfig is the sds-server configuration file (YAML) that points
// at this step-ca: `sds-server serve --config FILE`.
func (ca *CA) SDSServerConfig() []byte {
	return fmt.Appendf(nil, `# sds-server configuration for the step-ca in %s
# (run it: step-ca --password-file %s %s)
ca:
  backend: stepca
  url: %q
  root_fingerprint: %s
  provisioner: %q
  key_file: %q
  password_file: %q
`, ca.Dir, ca.PasswordFile, ca.ConfigFile, ca.URL, ca.Fingerprint, ca.Provisioner, ca.KeyFile, ca.ProvisionerPasswordFile)
}
