"""Load benchmark: requests/s and added latency of TheRouter over calling the fake upstream directly.

    .venv/bin/python bench/run.py                      # defaults: 2000 requests, concurrency 32, 1 worker
    .venv/bin/python bench/run.py --requests 5000 --concurrency 64 --workers 2 --client httpx

It starts a private redis-server, a `therouter fake-upstream` (DeepSeek flavour, no artificial delay), and the gateway
(`therouter serve`) on free loopback ports, runs the same load against the upstream directly and through the gateway
(non-stream -- assembled from an upstream stream, the default for kind deepseek, and passed through as JSON -- and
stream), prints a table and writes bench/results/latest.json. Loopback only, bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from therouter.config import StoreConfig
from therouter.redisproc import RedisProcess, free_port
from therouter.store import Store

HERE = Path(__file__).resolve().parent
BODY = {"model": "deepseek/deepseek-v3.2", "messages": [{"role": "user", "content": "Benchmark me, please."}],
        "max_tokens": 64}


def start(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child writes to it until it exits
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def load(url: str, headers: dict[str, str], body: dict[str, Any], n: int, conc: int,
               stream: bool) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    payload = json.dumps({**body, "stream": stream}).encode()
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector) as s:
        queue = iter(range(n))

        async def worker() -> None:
            nonlocal errors
            for _ in queue:
                t0 = time.perf_counter()
                async with s.post(url, data=payload, headers={**headers, "content-type": "application/json"}) as r:
                    data = await r.read()
                    if r.status != 200 or (stream and not data.endswith(b"data: [DONE]\n\n")):
                        errors += 1
                lat.append(time.perf_counter() - t0)

        for _ in range(min(conc, 8)):  # warm-up
            async with s.post(url, data=payload, headers={**headers, "content-type": "application/json"}) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": n, "errors": errors, "rps": n / wall, "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="therouter-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    redis = RedisProcess(tmp / "redis", appendonly=False).start()
    try:
        up_port, gw_port = free_port(), free_port()
        procs.append(start([sys.executable, "-m", "therouter.fakeupstream", "--flavor", "deepseek", "--port",
                            str(up_port), "--models", "*"]))
        wait_http(f"http://127.0.0.1:{up_port}/health")
        cfg = {
            "server": {"upstream_client": a.client, "model_check_interval": 0},
            "store": {"redis_url": redis.url, "key_prefix": "bench:"},
            "data_dir": str(tmp / "data"),
            # the same upstream twice: a client's non-stream request assembled from an upstream stream (the default
            # for kind deepseek) or passed through as JSON
            "providers": {"up": {"kind": "deepseek", "base_url": f"http://127.0.0.1:{up_port}",
                                 "max_connections": 1024, "non_stream": "stream"},
                          "up-passthrough": {"kind": "deepseek", "base_url": f"http://127.0.0.1:{up_port}",
                                             "max_connections": 1024, "non_stream": "passthrough"}},
            "models": {m: {
                "context_length": 131072, "max_output_tokens": 32768,
                "supported_parameters": ["temperature", "max_tokens", "top_p", "stop"],
                "pricing": {"input": 0.96, "cached_input": 0.96, "output": 2.88},
                "deployments": [{"provider": p, "model": "deepseek-v3.2"}]}
                for m, p in (("deepseek/deepseek-v3.2", "up"), ("bench/passthrough", "up-passthrough"))},
        }
        (tmp / "bench.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(start([sys.executable, "-m", "therouter", "serve", "--config", str(tmp / "bench.yaml"),
                            "--port", str(gw_port), "--workers", str(a.workers)], env=dict(os.environ),
                           log=tmp / "gateway.log"))
        wait_http(f"http://127.0.0.1:{gw_port}/health")

        async def mk() -> str:
            st = Store(StoreConfig(redis_url=redis.url, key_prefix="bench:"))
            k, _ = await st.create_key("bench")
            await st.aclose()
            return k

        key = asyncio.run(mk())
        direct_url = f"http://127.0.0.1:{up_port}/chat/completions"
        gw_url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        results: dict[str, Any] = {}
        for stream in (False, True):
            name = "stream" if stream else "json"
            d = asyncio.run(load(direct_url, {}, {**BODY, "model": "deepseek-v3.2"}, a.requests, a.concurrency,
                                 stream))
            g = asyncio.run(load(gw_url, {"authorization": f"Bearer {key}"}, BODY, a.requests, a.concurrency,
                                 stream))
            results[name] = {"direct": d, "gateway": g,
                             "added_p50_ms": g["p50_ms"] - d["p50_ms"], "added_p99_ms": g["p99_ms"] - d["p99_ms"]}
            if not stream:  # the same JSON load, passed through instead of assembled: what assembly costs
                pt = asyncio.run(load(gw_url, {"authorization": f"Bearer {key}"},
                                      {**BODY, "model": "bench/passthrough"}, a.requests, a.concurrency, False))
                results["json-passthrough"] = {"direct": d, "gateway": pt, "added_p50_ms": pt["p50_ms"] - d["p50_ms"],
                                               "added_p99_ms": pt["p99_ms"] - d["p99_ms"]}
        meta = {"requests": a.requests, "concurrency": a.concurrency, "workers": a.workers, "client": a.client,
                "cpus": os.cpu_count(), "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d", time.gmtime())}
        out = {"meta": meta, "results": results}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))
        print(f"{a.requests} requests, concurrency {a.concurrency}, {a.workers} worker(s), upstream client "
              f"{a.client}, {os.cpu_count()} CPUs (load generator, upstream and gateway share them)")
        print(f"{'mode':<8} {'path':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for name, r in results.items():
            for path in ("direct", "gateway"):
                x = r[path]
                print(f"{name:<8} {path:<8} {x['rps']:>8.0f} {x['p50_ms']:>8.2f} {x['p99_ms']:>8.2f} "
                      f"{x['errors']:>7}")
            print(f"{name:<8} {'added':<8} {'':>8} {r['added_p50_ms']:>8.2f} {r['added_p99_ms']:>8.2f}")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.stop()


if __name__ == "__main__":
    raise SystemExit(main())
