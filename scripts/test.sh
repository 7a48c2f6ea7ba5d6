#!/usr/bin/env bash
# Installs everything the test suite needs (Debian's redis-server, and redis-tools for redis-cli, with which the
# suite builds a three-node Redis Cluster; nginx, njs and wrk for the benchmark's smoke test; a virtualenv with the
# package and its test extras) and runs the whole
# suite. The suite starts its own redis-server processes on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || [ -x /usr/bin/redis-cli ] || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # the TLS transport tests make their own certificate
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# nginx + its njs module and wrk, for the benchmark's smoke test (tests/bench); no system nginx is left running
bench/install-deps.sh

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# (the filter drops pip's notes about this machine's unused local package folders; pip's own status still counts)
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | { grep -v '^WARNING: Location' || true; }
exec .venv/bin/python -m pytest "$@"
