#!/usr/bin/env bash
# The benchmark in one command, on a fresh Debian machine: installs nginx + njs, wrk and redis-server from Debian
# when missing (bench/install-deps.sh), the virtualenv with the package, then runs bench/run.py with the arguments
# given (default: the latency table; `bench/run.sh all` for every mode, `--help` for the options). Everything it
# starts listens on loopback and is stopped by pid when it ends (Ctrl-C included).
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install-deps.sh
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[bench]' 2>&1 | { grep -v '^WARNING: Location' || true; }
exec .venv/bin/python bench/run.py "$@"
