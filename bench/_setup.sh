# Sourced by bench/run.sh and bench/profile.sh (from the repo root): installs what the benchmark needs from Debian
# when missing (bench/install-deps.sh), then the virtualenv with the package and its `bench` extra.
bench/install-deps.sh
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[bench]' 2>&1 | { grep -v '^WARNING: Location' || true; }
