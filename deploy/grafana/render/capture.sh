#!/usr/bin/env bash
# Renders docs/dashboard.png from real data: the emojivoto demo (sds-server,
# real Envoy sidecars, 60 s certificates) runs for a few minutes while a real
# Prometheus scrapes it; meanwhile a client with a bogus token is refused
# (authentication failures) and a broken policy file comes and goes (policy
# errors). render.py then evaluates every panel's query on that Prometheus
# and draws it. Needs: make build demo-bin tools; a prometheus binary
# (PROMETHEUS_BIN, e.g. built from its Go module like promtool); python3 with
# matplotlib (PYTHON); curl.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
minutes=${MINUTES:-4}
prom_bin=${PROMETHEUS_BIN:?set PROMETHEUS_BIN to a prometheus binary}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

cp -r "$root/examples/emojivoto/policies" "$work/policies"
"$root/bin/emojivoto-demo" -server-bin "$root/bin/sds-server" -envoy-bin "$root/.tools/bin/envoy" \
	-app-bin "$root/bin/emojivoto" -policy-dir "$work/policies" -duration "$((minutes + 2))m" >"$work/demo.log" 2>&1 &
for _ in $(seq 120); do
	grep -q 'metrics on http://' "$work/demo.log" && break
	sleep 1
done
metrics=$(sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$work/demo.log" | head -1)
sds=$(sed -n 's|.*sds-server: SDS on \([^,]*\),.*|\1|p' "$work/demo.log" | head -1)
test -n "$metrics" || { echo "demo did not start:"; cat "$work/demo.log"; exit 1; }

cat >"$work/prometheus.yml" <<YAML
global: {scrape_interval: 5s, evaluation_interval: 5s}
rule_files: ["$root/deploy/prometheus/sds-server.rules.yml"]
scrape_configs:
  - job_name: sds-server
    static_configs: [{targets: ["$metrics"]}]
YAML
"$prom_bin" --config.file "$work/prometheus.yml" --storage.tsdb.path "$work/tsdb" \
	--web.listen-address 127.0.0.1:19090 >"$work/prometheus.log" 2>&1 &

# A minute in: a client with a bogus token, refused about 5 times a second
# for a minute; a broken policy file for two minutes.
sleep 60
for _ in $(seq 300); do
	curl -sk --http2 -o /dev/null -m 2 -X POST -H 'content-type: application/grpc' \
		-H 'authorization: Bearer SDSTKN-1.bogus' --data-binary '' \
		"https://$sds/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets" || true
	sleep 0.2
done &
echo '[{"permission": {"method": "GET"}, "allow": ["web"' >"$work/policies/default/broken.json"
sleep 120
rm -f "$work/policies/default/broken.json"
sleep $((minutes * 60 - 180))
"$python" "$root/deploy/grafana/render/render.py" --prometheus http://127.0.0.1:19090 \
	--dashboard "$root/deploy/grafana/sds-server.json" --minutes "$minutes" --out "$root/docs/dashboard.png"
echo "wrote $root/docs/dashboard.png"
