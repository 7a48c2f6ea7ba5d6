#!/bin/sh
# Renders Prometheus's config from the gateway's port and /metrics token, then runs the given command.
set -eu
src="${PROMETHEUS_TEMPLATE:-/etc/therouter/prometheus.yml}"
out="${PROMETHEUS_CONFIG:-/tmp/prometheus.yml}"
sed "s/__THEROUTER_PORT__/${THEROUTER_PORT:-8080}/g" "$src" > "$out"
if [ -n "${METRICS_TOKEN:-}" ]; then
  printf '    authorization:\n      type: Bearer\n      credentials: "%s"\n' "$METRICS_TOKEN" >> "$out"
fi
exec "$@"
