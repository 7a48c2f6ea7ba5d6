"""Smoke of the benchmark (bench/run.py): it starts nginx, redis-server, the bare proxy and the gateway, drives each
with wrk for a moment, prints the table and writes its JSON. It checks that everything served (requests counted, no
error of any target) and that metering stayed exact; it asserts no speed (speed is what the benchmark reports).
Needs nginx with njs and wrk: scripts/test.sh installs them (bench/install-deps.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TARGETS = ("nginx direct", "bare pass-through", "TheRouter", "TheRouter, assembled")


@pytest.mark.timeout(180)
def test_benchmark_starts_serves_and_prints_its_table(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    run = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "run.py"), "--duration", "2", "--rounds", "1", "--warmup", "0",
         "--connections", "16", "--out", str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=170, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    table = run.stdout
    assert "TheRouter/bare" in table and "TheRouter/direct" in table and "added p50 vs direct" in table
    for target in TARGETS:
        assert target in table
    assert "-> EXACT" in table

    latency = json.loads(out.read_text())["modes"]["latency"]
    results = latency["results"]
    assert set(results) == {"json @16", "stream @16"}
    for scenario, res in results.items():
        expected = {"direct", "bare", "therouter"} | ({"assembled"} if scenario.startswith("json") else set())
        assert expected <= set(res), scenario
        for target in expected:
            assert res[target]["requests"] > 0 and res[target]["rps"] > 0, (scenario, target, res[target])
            assert res[target]["errors"] == 0, (scenario, target, res[target])
        assert res["ratios"]["therouter_over_bare"] > 0
    meter = latency["metering"]
    assert meter["exact"] and meter["records"] > 0, meter
