"""The outage drill (README, "Outage drills"): a steady stream of SDK requests while the hosted upstream is killed,
brought back slow, then healed. Every client request succeeds; traffic moves to the self-hosted deployment and
returns; the generation records show each fail-over."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.integration.conftest import CANARY, make_key, stop
from tests.integration.routing_helpers import (
    admin,
    ask,
    config,
    deployment,
    fake_at,
    generation,
    kill,
    provider,
    sdk,
    start_routed_gateway,
)
from therouter.redisproc import RedisProcess

MODEL = "drill/chat"


@dataclass
class Shot:
    started: float
    provider: str | None = None
    attempts: int = 0
    gen_id: str = ""
    error: str | None = None


def test_outage_drill(redis_proc: RedisProcess, tmp_path: Path) -> None:
    ds = fake_at("deepseek", None, api_key=CANARY)
    vl = fake_at("vllm")
    port = ds.port
    cfg = config(redis_proc.url, tmp_path / "data",
                 {"deepseek": provider("deepseek", ds.url, connect=0.5, first_token=1.5, total=2),
                  "vllm-local": provider("vllm", vl.url)},
                 {MODEL: [{"provider": "deepseek", "priority": 0}, {"provider": "vllm-local", "priority": 1}]},
                 deadline=10)
    # breaker: 5 failures in a row eject for 1 s x ejections (the default is 5 s: a drill by hand takes longer)
    gw = start_routed_gateway(cfg, tmp_path, {"breaker": {"base_ejection": 1.0}})
    shots: list[Shot] = []
    stop_flag = threading.Event()
    try:
        key = asyncio.run(make_key(gw, "drill"))
        for stream in (False, True):  # warm both paths (first connections, lazy imports) before the clock starts
            assert ask(sdk(gw, key), MODEL, stream=stream)[0] == "deepseek"

        def traffic(i: int) -> None:
            client = sdk(gw, key)
            n = 0
            while not stop_flag.is_set():
                s = Shot(time.monotonic())
                try:
                    s.provider, s.attempts, s.gen_id = ask(client, MODEL, stream=(n + i) % 2 == 0)
                except Exception as e:  # noqa: BLE001 - reported below
                    s.error = repr(e)
                shots.append(s)
                n += 1
                time.sleep(0.05)

        threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.5)

        killed_at = time.monotonic()
        kill(ds)  # outage: connections refused
        time.sleep(2.0)

        slowed_at = time.monotonic()
        ds = fake_at("deepseek", port, "--latency-ms", "3000", api_key=CANARY)  # back, but slower than the timeouts
        time.sleep(3.0)

        healed_at = time.monotonic()
        ds.configure(latency_ms=0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until traffic is back on the hosted deployment for a while
            tail = [s.provider for s in shots if s.started > healed_at][-10:]
            if len(tail) == 10 and set(tail) == {"deepseek"}:
                break
            time.sleep(0.1)
        stop_flag.set()
        for t in threads:
            t.join(30)

        failures = [s.error for s in shots if s.error]
        assert not failures, failures[:3]  # every client request succeeded
        assert 60 <= len(shots) <= 400

        def served(a: float, b: float) -> set[str | None]:
            return {s.provider for s in shots if a <= s.started < b}

        assert served(0, killed_at - 0.2) == {"deepseek"}  # (a request reaches the gateway moments after it starts)
        assert served(killed_at + 0.5, healed_at) == {"vllm-local"}  # moved to the self-hosted deployment...
        assert [s.provider for s in shots][-10:] == ["deepseek"] * 10  # ...and back

        # the records show each fail-over: a refused connection while it was down, a timeout while it was slow
        failovers = [s for s in shots if s.attempts > 1]
        assert failovers
        codes: dict[str, set[str]] = {"down": set(), "slow": set()}
        for s in failovers:
            rec = generation(gw, key, s.gen_id)
            assert rec is not None
            first, last = rec["attempts"][0], rec["attempts"][-1]
            assert first["provider"] == "deepseek" and first["outcome"] == "error"
            assert last["provider"] == "vllm-local" and last["outcome"] == "ok" and rec["provider"] == "vllm-local"
            codes["down" if s.started < slowed_at else "slow"].add(first["code"])
        assert codes["down"] >= {"upstream_connect_error"}
        assert codes["slow"] & {"upstream_timeout", "first_token_timeout"}, codes
        skipped = generation(gw, key, next(s for s in shots if killed_at + 1 < s.started and s.attempts == 1
                                           and s.provider == "vllm-local").gen_id)
        assert skipped is not None and any(x["provider"] == "deepseek" and x["reason"].startswith("circuit")
                                           for x in skipped["skipped"])

        view = deployment(gw, "deepseek")
        assert view["state"] == "ok" and view["circuit"]["state"] == "closed" and view["in_flight"] == 0
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'therouter_failovers_total{from_provider="deepseek",to_provider="vllm-local"}' in metrics
        assert admin(gw, "GET", "/providers").status_code == 200
    finally:
        stop_flag.set()
        stop(gw.proc)
        for f in (ds, vl):
            stop(f.proc)
