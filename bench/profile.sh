#!/usr/bin/env bash
# A py-spy profile of the gateway (one worker, pinned like the benchmark) under wrk load:
#   bench/profile.sh                                   # stream @32 for 20 s -> bench/results/profile.svg
#   bench/profile.sh --profile-scenario json --profile-seconds 30 --profile-format speedscope \
#       --profile-out bench/results/profile.json
# Installs what bench/run.sh installs, plus py-spy (the `bench` extra), then runs `bench/run.py profile`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/_setup.sh
exec .venv/bin/python bench/run.py profile "$@"
