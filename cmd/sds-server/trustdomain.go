package main

import (
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/viper"

	"github.com/meshid/sds-server/bootstrap"
	"github.com/meshid/sds-server/issuer"
)

// trustDomainSource names where the trust domain of cmd's configuration was
// given explicitly: the --trust-domain flag, SDS_TRUST_DOMAIN or the config
// file, in viper's precedence order. It returns "" when only the embedded
// default applies.
func trustDomainSource(cmd *cobra.Command) (string, error) {
	if cmd.Flags().Changed("trust-domain") {
		return "--trust-domain", nil
	}
	if os.Getenv("SDS_TRUST_DOMAIN") != "" {
		return "SDS_TRUST_DOMAIN", nil
	}
	if path, _ := cmd.Flags().GetString("config"); path != "" {
		v := viper.New()
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
			return "", fmt.Errorf("read config file %s: %w", path, err)
		}
		if v.InConfig("trust_domain") {
			return "trust_domain in " + path, nil
		}
	}
	return "", nil
}

// bootstrapTrustDomain is the trust domain a generated bootstrap pins the
// server to: the one in the server certificate FetchServer verified under
// the token's root. A trust domain given explicitly (source, see
// trustDomainSource) must agree with it: otherwise Envoy would refuse the
// server's certificate forever, silently.
func bootstrapTrustDomain(srv bootstrap.Server, addr, given, source string) (string, error) {
	if source == "" || given == srv.TrustDomain {
		return srv.TrustDomain, nil
	}
	return "", fmt.Errorf("trust domain mismatch: %s is %q, but the server at %s is in trust domain %q (its certificate, verified under the token's root, is %s); drop %s to use the server's, or fix the server's trust_domain; nothing was written",
		source, given, addr, srv.TrustDomain, issuer.ServerSPIFFEID(srv.TrustDomain), source)
}

// caTrustDomain returns the trust domain a CA certificate records in its
// subject organization (the built-in CA writes it there at creation), or ""
// when it records none.
func caTrustDomain(c *x509.Certificate) string {
	if len(c.Subject.Organization) != 1 {
		return ""
	}
	td := c.Subject.Organization[0]
	if issuer.ValidateTrustDomain(td) != nil {
		return ""
	}
	return td
}

// warnTrustDomainChange logs one warning when the configured trust domain
// differs from the one the existing CA was created for: every sidecar
// bootstrapped before pins the old one and will refuse the server.
func warnTrustDomainChange(log *slog.Logger, root *x509.Certificate, caDir, configured string) {
	created := caTrustDomain(root)
	switch {
	case created == "":
		log.Debug("the CA root records no trust domain; cannot check trust_domain against it", "ca_dir", caDir)
	case created != configured:
		log.Warn("trust_domain differs from the CA's: sidecars bootstrapped for the CA's trust domain will refuse this server; set trust_domain back, or re-bootstrap every sidecar",
			"trust_domain", configured, "ca_trust_domain", created, "ca_dir", caDir)
	}
}
