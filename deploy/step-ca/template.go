// Package stepcatemplate ships the step-ca provisioner x509 template that
// sds-server needs (sds-server.tpl, beside this file), so tests and the
// step-ca init helper use the very file operators install.
package stepcatemplate

import _ "embed"

// X509 is the x509 template of sds-server's JWK provisioner in step-ca.
//
//go:embed sds-server.tpl
var X509 []byte

// FileName is the name the template is shipped and installed under.
const FileName = "sds-server.tpl"
