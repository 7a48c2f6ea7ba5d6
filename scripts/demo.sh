#!/usr/bin/env bash
# Installs TheRouter and starts a working demo with no API key: a private redis-server (data under .demo/),
# simulated DeepSeek / vLLM / SGLang upstreams, the gateway on 127.0.0.1:${PORT:-8080}, and a demo key.
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
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | { grep -v '^WARNING: Location' || true; }
exec .venv/bin/therouter demo --port "${PORT:-8080}" "$@"
