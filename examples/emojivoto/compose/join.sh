#!/bin/sh
# join.sh SERVICE [sds-server bootstrap envoy flags...]
#
# The init step of one sidecar in docker-compose.yml (the registration
# authority's job): wait until sds-server answers on its admin socket, create
# a single-use bootstrap token for SERVICE, and write the sidecar's Envoy
# bootstrap with `sds-server bootstrap envoy`, which refuses the server's
# root CA unless it matches the digest inside the token. The token goes into
# the bootstrap only (mode 0600, on a volume only that sidecar mounts); it is
# never printed.
#
# Environment (defaults are the compose file's):
#   SDS_SERVER         sds-server's SDS address      (sds-server:8443)
#   SDS_ADMIN_SOCKET   its admin socket              (set by the compose file)
#   SDS_BOOTSTRAP_DIR  where SERVICE.yaml goes       (/bootstrap)
#   SDS_JOIN_TRIES     seconds to wait for the server (60)
set -eu
if [ $# -lt 1 ]; then
	echo "usage: join.sh SERVICE [bootstrap envoy flags...]" >&2
	exit 2
fi
svc=$1
shift
server=${SDS_SERVER:-sds-server:8443}
out=${SDS_BOOTSTRAP_DIR:-/bootstrap}/$svc.yaml
tries=${SDS_JOIN_TRIES:-60}

i=0
until tok=$(sds-server token create --service "$svc" --ttl 10m --uses 1 2>/dev/null); do
	i=$((i + 1))
	if [ "$i" -ge "$tries" ]; then
		echo "join $svc: sds-server's admin API did not answer within ${tries}s" >&2
		exit 1
	fi
	sleep 1
done
# The token goes in the environment, not on the command line, where every
# process could read it.
SDS_TOKEN=$tok sds-server bootstrap envoy --server "$server" --node-id "$svc-1" -o "$out" "$@"
echo "join $svc: wrote $out (identity spiffe://mesh.local/ns/default/sa/$svc)"
