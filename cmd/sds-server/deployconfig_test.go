package main

import (
	"os"
	"path/filepath"
	"testing"

	"sigs.k8s.io/yaml"
)

// TestDeployConfigsLoad loads the config files the deployments ship
// (deploy/systemd/config.yaml, and config.yaml of the Kubernetes ConfigMap)
// with the server's own loader, which refuses unknown keys, and validates
// them as serve does.
func TestDeployConfigsLoad(t *testing.T) {
	dir := t.TempDir()
	cm, err := os.ReadFile(filepath.Join("..", "..", "deploy", "kubernetes", "configmap-config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var configMap struct {
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(cm, &configMap); err != nil {
		t.Fatalf("configmap-config.yaml: %v", err)
	}
	k8sConfig := writeFile(t, filepath.Join(dir, "k8s.yaml"), configMap.Data["config.yaml"])

	cases := []struct {
		name, path string
		env        map[string]string
		dataDir    string
		policyDir  string
	}{
		{"systemd", filepath.Join("..", "..", "deploy", "systemd", "config.yaml"), nil, "/var/lib/sds-server", "/etc/sds-server/policies"},
		// The StatefulSet sets SDS_DATA_DIR.
		{"kubernetes", k8sConfig, map[string]string{"SDS_DATA_DIR": "/var/lib/sds-server/data"}, "/var/lib/sds-server/data", "/etc/sds-server/policies"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			clearSDSEnv(t)
			for k, v := range c.env {
				t.Setenv(k, v)
			}
			cfg, err := loadVia(t, "serve", "--config", c.path)
			if err != nil {
				t.Fatalf("load %s: %v", c.path, err)
			}
			if err := cfg.validate(); err != nil {
				t.Fatalf("%s: %v", c.path, err)
			}
			if cfg.DataDir != c.dataDir || cfg.PolicyDir != c.policyDir || cfg.AdminSocket != filepath.Join(c.dataDir, "admin.sock") {
				t.Errorf("data_dir %q, policy_dir %q, admin_socket %q; want %q, %q and the socket in the data dir",
					cfg.DataDir, cfg.PolicyDir, cfg.AdminSocket, c.dataDir, c.policyDir)
			}
		})
	}
}
