{{- /*
  step-ca x509 template for sds-server's JWK provisioner.

  Every name comes from the one-time token sds-server signs, never from the
  CSR (step-ca only checks that the CSR's names match the token's):
    - SANs from the token's "sans": the SPIFFE ID for a workload; DNS names,
      IPs and spiffe://<trust_domain>/sds-server for the server itself;
    - Subject CN from the token's subject (the node ID, or "sds-server");
      OU and O from the custom claim "sds" (service and environment).
  The claim's "kind" is "server" for the SDS listener's own certificate
  (serverAuth only) and "workload" otherwise (serverAuth + clientAuth).
  Its "crl", when step-ca publishes a CRL, is the distribution point that
  CRL is marked with: a TLS peer applies step-ca's CRL only to certificates
  that name it.
*/ -}}
{{- $sds := dict }}
{{- if .Token }}{{ if hasKey .Token "sds" }}{{ $sds = .Token.sds }}{{ end }}{{ end }}
{
	"subject": {
		"commonName": {{ toJson .Subject.CommonName }}
{{- if get $sds "ou" }},
		"organizationalUnit": {{ toJson (get $sds "ou") }}
{{- end }}
{{- if get $sds "o" }},
		"organization": {{ toJson (get $sds "o") }}
{{- end }}
	},
	"sans": {{ toJson .SANs }},
{{- if typeIs "*rsa.PublicKey" .Insecure.CR.PublicKey }}
	"keyUsage": ["keyEncipherment", "digitalSignature"],
{{- else }}
	"keyUsage": ["digitalSignature"],
{{- end }}
{{- if eq (get $sds "kind") "server" }}
	"extKeyUsage": ["serverAuth"],
{{- else }}
	"extKeyUsage": ["serverAuth", "clientAuth"],
{{- end }}
{{- if get $sds "crl" }}
	"crlDistributionPoints": [{{ toJson (get $sds "crl") }}],
{{- end }}
	"basicConstraints": {"isCA": false}
}
