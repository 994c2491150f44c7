package stepcainit

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Root is a root CA and its intermediate made by AddRoot, in files step-ca
// can use: what a root rotation of step-ca adds to ca.json.
type Root struct {
	RootFile         string // certs/root_ca_<suffix>.crt
	IntermediateCert string // certs/intermediate_ca_<suffix>.crt
	IntermediateKey  string // secrets/intermediate_ca_<suffix>_key, encrypted under the CA password
}

// AddRoot makes a new root "<name> Root CA" and its intermediate in the
// step-ca directory of c, with the intermediate key encrypted under c's
// password (step-ca decrypts every key with the one --password-file). It
// does not change ca.json: SetRoots and SetIntermediate do, step by step.
func AddRoot(c *CA, name, suffix string) (*Root, error) {
	if suffix == "" || strings.ContainsAny(suffix, "/\\. ") {
		return nil, fmt.Errorf("stepcainit: root suffix %q: use letters and digits", suffix)
	}
	pass, err := os.ReadFile(c.PasswordFile)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: %w", err)
	}
	pass = []byte(strings.TrimSpace(string(pass)))
	now := time.Now().Truncate(time.Second)
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	root, err := newCA(name+" Root CA", now, now.AddDate(10, 0, 0), 1, rootKey.Public(), nil, rootKey)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: root: %w", err)
	}
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	inter, err := newCA(name+" Intermediate CA", now, now.AddDate(10, 0, 0), 0, interKey.Public(), root, rootKey)
	if err != nil {
		return nil, fmt.Errorf("stepcainit: intermediate: %w", err)
	}
	r := &Root{
		RootFile:         filepath.Join(c.Dir, "certs", "root_ca_"+suffix+".crt"),
		IntermediateCert: filepath.Join(c.Dir, "certs", "intermediate_ca_"+suffix+".crt"),
		IntermediateKey:  filepath.Join(c.Dir, "secrets", "intermediate_ca_"+suffix+"_key"),
	}
	rootKeyPEM, err := encryptKey(rootKey, pass)
	if err != nil {
		return nil, err
	}
	interKeyPEM, err := encryptKey(interKey, pass)
	if err != nil {
		return nil, err
	}
	for _, f := range []struct {
		path string
		data []byte
		perm os.FileMode
	}{
		{r.RootFile, certPEM(root), 0o644},
		{r.IntermediateCert, certPEM(inter), 0o644},
		{filepath.Join(c.Dir, "secrets", "root_ca_"+suffix+"_key"), rootKeyPEM, 0o600},
		{r.IntermediateKey, interKeyPEM, 0o600},
	} {
		if err := os.WriteFile(f.path, f.data, f.perm); err != nil {
			return nil, fmt.Errorf("stepcainit: %w", err)
		}
	}
	return r, nil
}

// SetRoots sets ca.json's "root" to the given root files (step-ca serves
// them all at /roots and trusts them all), keeping every other setting.
func SetRoots(configFile string, rootFiles ...string) error {
	if len(rootFiles) == 0 {
		return fmt.Errorf("stepcainit: SetRoots: no root file")
	}
	return editConfig(configFile, func(cfg map[string]any) {
		roots := make([]any, len(rootFiles))
		for i, f := range rootFiles {
			roots[i] = f
		}
		cfg["root"] = roots
	})
}

// SetIntermediate sets ca.json's "crt" and "key": the intermediate step-ca
// signs with.
func SetIntermediate(configFile, crt, key string) error {
	return editConfig(configFile, func(cfg map[string]any) {
		cfg["crt"], cfg["key"] = crt, key
	})
}

// editConfig rewrites ca.json through edit, atomically (a complete
// temporary file renamed over it), so step-ca never reads half a file.
func editConfig(path string, edit func(map[string]any)) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("stepcainit: %w", err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(data, &cfg); err != nil {
		return fmt.Errorf("stepcainit: %s: %w", path, err)
	}
	edit(cfg)
	out, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(out, '\n'), 0o644); err != nil {
		return fmt.Errorf("stepcainit: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("stepcainit: %w", err)
	}
	return nil
}
