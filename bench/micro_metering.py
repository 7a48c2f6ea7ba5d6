"""Micro-benchmark of metering's per-request cost, in process, against a private redis-server (never run by CI).

    nice -n 19 .venv/bin/python bench/micro_metering.py [--rounds 40] [--concurrency 50]

Rounds of ``concurrency`` metered requests (a key with a budget and a TPM limit) admitted together, as a loaded
worker group-commits them; then their settlements, in rounds of the same size (so each phase's Redis CPU is apart). Reports, per request: this process's CPU (admission and
settlement separately, event loop included), redis-server's CPU (INFO cpu), the commands Redis ran (INFO
commandstats: those the scripts run included) and those sent to it, and the round trips per round (Store.send calls).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from therouter.config import StoreConfig, parse_settings
from therouter.keys import KeyRecord
from therouter.metering import GenerationRecord, Meter, MeterOptions
from therouter.protocol.usage import Usage
from therouter.redisproc import RedisProcess
from therouter.store import Store

SETTINGS: dict[str, Any] = {
    "store": {"redis_url": "redis://127.0.0.1:1/0"},
    "providers": {"deepseek": {"kind": "deepseek", "base_url": "https://api.deepseek.com"}},
    "models": {"deepseek-chat": {"context_length": 131072, "max_output_tokens": 8192,
                                 "pricing": {"input": "0.28", "cached_input": "0.028", "output": "0.42"},
                                 "deployments": [{"provider": "deepseek", "model": "deepseek-chat"}]}},
}


class CountingStore(Store):
    sends = 0
    commands = 0

    async def send(self, commands: Any) -> list[Any]:
        self.sends += 1
        self.commands += len(commands)
        return await super().send(commands)


def record(gen_id: str) -> GenerationRecord:
    return GenerationRecord(
        id=gen_id, key_id="", model="", provider="deepseek", upstream_model="deepseek-chat",
        usage=Usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024, reasoning_tokens=0),
        created=int(time.time()), latency_ms=120, outcome="completed", stream=True, ttft_ms=40,
        attempts=[{"provider": "deepseek", "outcome": "completed", "latency_ms": 120, "status": 200}],
        request_id="req-" + gen_id,
    )


async def redis_stats(r: Any) -> tuple[float, int]:
    cpu = await r.info("cpu")
    stats = await r.info("commandstats")
    calls = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), int(calls)


async def run(url: str, rounds: int, concurrency: int) -> dict[str, float]:
    settings = parse_settings(SETTINGS, "bench", env={})
    store = CountingStore(StoreConfig(redis_url=url, key_prefix=f"b{uuid.uuid4().hex[:6]}:", socket_timeout=5.0))
    meter = Meter(store, settings, Path(tempfile.mkdtemp()) / "journal",
                  options=MeterOptions(tick=3600, heartbeat_interval=3600, checkpoint_interval=3600))
    await meter.start()
    admin = aioredis.Redis.from_url(url)
    keys = [KeyRecord(id=f"key_{i:04d}", name="b", hint="x", budget_nano=10**15, tpm=10**9) for i in range(20)]

    def admit_all(gens: list[str]) -> Any:
        return asyncio.gather(*(meter.admit(keys[i % len(keys)], "deepseek-chat", 1200, 300, g, prompt_bound=1500)
                                for i, g in enumerate(gens)))

    await asyncio.gather(*(meter.settle(a, record(a.gen_id)) for a in await admit_all(
        [uuid.uuid4().hex for _ in range(concurrency)])))  # warm (scripts loaded, connections open)
    # the admissions, round after round, then their settlements: each phase's own Redis CPU
    stats = [await redis_stats(admin)]
    sends0, commands0 = store.sends, store.commands
    t0 = time.process_time()
    admitted = []
    for _ in range(rounds):
        admitted.append(await admit_all([uuid.uuid4().hex for _ in range(concurrency)]))
    t1 = time.process_time()
    stats.append(await redis_stats(admin))
    t2 = time.process_time()
    for adms in admitted:
        await asyncio.gather(*(meter.settle(a, record(a.gen_id)) for a in adms))
    t3 = time.process_time()
    stats.append(await redis_stats(admin))
    n = rounds * concurrency
    out = {"admission us": (t1 - t0) / n * 1e6, "settlement us": (t3 - t2) / n * 1e6,
           "both us": (t1 - t0 + t3 - t2) / n * 1e6, "redis admission us": (stats[1][0] - stats[0][0]) / n * 1e6,
           "redis settlement us": (stats[2][0] - stats[1][0]) / n * 1e6, "redis us": (stats[2][0] - stats[0][0]) / n * 1e6,
           "redis commands": (stats[2][1] - stats[0][1]) / n,
           "commands sent": (store.commands - commands0) / n, "round trips per round": (store.sends - sends0) / rounds}
    print("  ".join(f"{k} {v:6.1f}" for k, v in out.items()))
    assert meter.journal_writes_total == 0
    await admin.aclose()
    await meter.aclose()
    await store.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc = RedisProcess(d, appendonly=False).start()
        try:
            runs = [asyncio.run(run(proc.url, a.rounds, a.concurrency)) for _ in range(a.repeat)]
            print(f"per request, {a.rounds} rounds of {a.concurrency}, the best / the median of {a.repeat} runs:")
            for k in runs[0]:
                values = sorted(r[k] for r in runs)
                print(f"  {k:22s} {values[0]:7.1f} / {statistics.median(values):7.1f}")
        finally:
            proc.stop()


if __name__ == "__main__":
    main()
