#!/usr/bin/env bash
# make loadtest: the standard matrix of sds-load (README "Figures"). For each
# N in $SIZES, the bare baseline and then the real sds-server (built-in CA,
# fresh data dir, loopback) are loaded with N sidecars, each on its own TLS
# connection, $CONC opening at once, followed by a trust-bundle push; the
# table gives every figure as a ratio to the baseline of the same run.
# Usage: loadtest.sh BIN_DIR OUT_DIR   (env: SIZES="1000 10000", CONC=100)
set -euo pipefail
bin=${1:?bin dir}; out=${2:?out dir}
sizes=${SIZES:-1000 10000}; conc=${CONC:-100}
mkdir -p "$out"; out=$(cd "$out" && pwd)
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# wait_for FILE PATTERN WHAT: up to 30 s for PATTERN in FILE.
wait_for() {
	for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
	echo "loadtest: timed out waiting for $3; log:" >&2; tail -20 "$1" >&2; return 1
}

results=()
for n in $sizes; do
	# The baseline.
	d="$work/base-$n"; mkdir -p "$d"
	"$bin/sds-load" baseline -ca-out "$d/ca.pem" -addr-out "$d/addr" >"$d/log" 2>&1 & bp=$!; pids+=("$bp")
	wait_for "$d/log" "listening" "the baseline to listen"
	echo any >"$d/token"
	"$bin/sds-load" run -label baseline -n "$n" -concurrency "$conc" -addr "$(cat "$d/addr")" -ca-file "$d/ca.pem" \
		-token-file "$d/token" -server-pid "$bp" -push -push-cmd "kill -HUP $bp" -json "$out/baseline-$n.json" || true
	kill "$bp"; wait "$bp" 2>/dev/null || true
	results+=("$out/baseline-$n.json")

	# The real server.
	d="$work/server-$n"; mkdir -p "$d"
	SDS_LIMITS_MAX_CONNECTIONS=$((n + 100)) "$bin/sds-server" serve --data-dir "$d/data" --listen-addr 127.0.0.1:0 \
		--metrics-addr "" --default-policy allow >"$d/log" 2>&1 & sp=$!; pids+=("$sp")
	wait_for "$d/log" "^ *sds: " "sds-server to listen"
	addr=$(sed -nE 's/^ *sds: +([^ ]+).*/\1/p' "$d/log" | head -1)
	"$bin/sds-server" token create --service load --uses 0 --data-dir "$d/data" >"$d/token" 2>/dev/null
	# A node outside the N: revoking it re-signs the CRL carried in ROOTCA,
	# which is the push every sidecar gets.
	"$bin/sds-load" run -label victim -n 1 -node-prefix victim- -addr "$addr" -ca-file "$d/data/ca/root.crt" \
		-token-file "$d/token" >/dev/null
	victim=$("$bin/sds-server" node list --data-dir "$d/data" | awk '/victim-0/ {print $1; exit}')
	"$bin/sds-load" run -label sds-server -n "$n" -concurrency "$conc" -addr "$addr" -ca-file "$d/data/ca/root.crt" \
		-token-file "$d/token" -server-pid "$sp" -push \
		-push-cmd "'$bin/sds-server' node revoke '$victim' --keep-token --data-dir '$d/data' >/dev/null" -json "$out/sds-server-$n.json" || true
	kill "$sp"; wait "$sp" 2>/dev/null || true
	results+=("$out/sds-server-$n.json")
done
echo
"$bin/sds-load" table "${results[@]}"
