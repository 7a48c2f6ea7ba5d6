#!/usr/bin/env bash
# Static checks, as CI runs them (.ci/run, before the test suite): ruff on src, tests and bench, and mypy --strict on
# src/therouter (configuration in pyproject.toml: [tool.ruff], [tool.mypy]). Installs the package with its `dev`
# extra (ruff and mypy, pinned) into the same virtualenv as scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# (the filter drops pip's notes about this machine's unused local package folders; pip's own status still counts)
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
.venv/bin/python -m ruff check src tests bench
.venv/bin/python -m mypy
