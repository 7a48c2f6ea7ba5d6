#!/usr/bin/env bash
# Installs TheRouter and starts a working demo with no API key: a private redis-server (data under .demo/),
# simulated DeepSeek / vLLM / SGLang upstreams, the gateway on 127.0.0.1:${PORT:-8080}, a demo key and an admin key.
# PORT picks the gateway's port; any other arguments go to `therouter demo` (see `therouter demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-8080}"
PY="${PYTHON:-python3}"

# the port first: a busy port is reported before anything is installed or started
if ! "$PY" - "$PORT" <<'EOF'
import socket, sys
port = int(sys.argv[1])
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        sys.exit(f"error: port {port} on 127.0.0.1 is not free ({e.strerror}); stop what uses it, or pick another "
                 f"port: PORT=8090 ./scripts/demo.sh. Nothing was started.")
EOF
then
  exit 1
fi

if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  echo "installing redis-server (Debian package)..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "creating a virtualenv in .venv..."
  "$PY" -m venv .venv
fi
echo "installing TheRouter into .venv (the first run downloads its dependencies: a minute or two)..."
# (the filter drops pip's notes about this machine's unused local package folders; pip's own status still counts)
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | { grep -v '^WARNING: Location' || true; }
echo "starting the demo..."
exec .venv/bin/therouter demo --port "$PORT" "$@"
