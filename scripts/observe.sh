#!/usr/bin/env bash
# Start Prometheus on 127.0.0.1:9090, scraping the local cluster that `make run` started
# (Ray writes the list of its metrics endpoints to prom_metrics_service_discovery.json).
# Grafana is not in the package registries here: import deploy/grafana/zeroserve-dashboard.json
# into a Grafana you run (README, "Watch the pool").
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=.run
[ -f "$RUN/cluster.json" ] || { echo "no local cluster: run make run first"; exit 1; }
if ! command -v prometheus >/dev/null; then
  echo "installing Debian's prometheus..."
  apt-get install -y -q prometheus >/dev/null || { echo "could not install prometheus"; exit 1; }
fi
temp_dir=$(python3 -c "import json; print(json.load(open('$RUN/cluster.json'))['temp_dir'])")
sd="$temp_dir/prom_metrics_service_discovery.json"
[ -f "$sd" ] || sd=$(ls -1 "$temp_dir"/session_latest/prom_metrics_service_discovery.json 2>/dev/null || true)
[ -n "$sd" ] && [ -f "$sd" ] || { echo "Ray's service discovery file was not found under $temp_dir"; exit 1; }
mkdir -p "$RUN/prometheus"
cat > "$RUN/prometheus/prometheus.yml" <<YAML
global: {scrape_interval: 5s}
scrape_configs:
  - job_name: ray
    file_sd_configs: [{files: ["$sd"]}]
YAML
if [ -f "$RUN/prometheus.pid" ] && kill -0 "$(cat "$RUN/prometheus.pid")" 2>/dev/null; then
  echo "Prometheus already running: http://127.0.0.1:9090"; exit 0
fi
setsid prometheus --config.file="$RUN/prometheus/prometheus.yml" --storage.tsdb.path="$RUN/prometheus/data" \
  --web.listen-address=127.0.0.1:9090 > "$RUN/prometheus.log" 2>&1 &
echo $! > "$RUN/prometheus.pid"
echo "Prometheus: http://127.0.0.1:9090 (try: ray_zeroserve_requests_total); stop with make stop"
