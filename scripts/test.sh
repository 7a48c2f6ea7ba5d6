#!/usr/bin/env bash
# Installs everything the test suite needs (Debian's redis-server, a virtualenv with the package and its test
# extras) and runs the whole suite. The suite starts its own redis-server on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  echo "installing redis-server (Debian package)..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# (the filter drops pip's notes about this machine's unused local package folders; pip's own status still counts)
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | { grep -v '^WARNING: Location' || true; }
exec .venv/bin/python -m pytest "$@"
