#!/bin/sh
# stepca-init.sh: the one-shot step before step-ca starts in
# docker-compose.yml. On the first run it creates a step-ca (root,
# intermediate, the JWK provisioner "sds-server" with the x509 template of
# deploy/step-ca, ca.json) with stepcainit (e2e/stepcainit, built into the
# init image); on every run it hands sds-server only what it needs: step-ca's
# root certificate, the provisioner's encrypted key and its password. The
# CA keys stay on step-ca's volume.
#
# Environment (defaults are the compose file's):
#   STEPCA_DIR      step-ca's $STEPPATH            (/stepca)
#   STEPCA_ADDRESS  where step-ca listens; its host is the CA's DNS name and
#                   the audience sds-server's tokens name (step-ca:9000)
#   SDS_CA_DIR      what sds-server mounts          (/sds-ca)
set -eu
dir=${STEPCA_DIR:-/stepca}
addr=${STEPCA_ADDRESS:-step-ca:9000}
out=${SDS_CA_DIR:-/sds-ca}

if [ ! -f "$dir/config/ca.json" ]; then
	# Certificates of 1 minute to 24 hours: sds-server asks for cert_ttl
	# plus its 1 minute backdate.
	stepcainit -dir "$dir" -address "$addr" -min-tls-cert-duration 1m -max-tls-cert-duration 24h
fi
for f in certs/root_ca.crt secrets/provisioner_key secrets/provisioner_password; do
	cp "$dir/$f" "$out/"
	chmod 0600 "$out/$(basename "$f")"
done
echo "stepca-init: step-ca in $dir; root, provisioner key and password copied to $out"
