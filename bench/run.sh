#!/usr/bin/env bash
# The benchmark in one command, on a fresh Debian machine: installs nginx + njs, wrk and redis-server from Debian
# when missing (bench/install-deps.sh), the virtualenv with the package, then runs bench/run.py with the arguments
# given (default: the latency table; `bench/run.sh all` for every mode, `--help` for the options). Everything it
# starts listens on loopback and is stopped by pid when it ends (Ctrl-C included).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/_setup.sh
exec .venv/bin/python bench/run.py "$@"
