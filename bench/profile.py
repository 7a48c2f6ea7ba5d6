"""Where the gateway's time goes: CPU per request, Redis round trips per request, and a py-spy profile.

    .venv/bin/python bench/profile.py                       # JSON and stream, 3000 requests each, concurrency 32
    .venv/bin/python bench/profile.py --mode json --requests 5000 --top 40

It starts what ``bench/run.py`` starts (a private redis-server, a python fake upstream, ``therouter serve`` with one
worker) and a key with a budget and RPM/TPM limits high enough not to trigger (so admission and settlement both run).
For each mode it loads the gateway, reads the worker's CPU time (``/proc``) and Redis ``INFO commandstats`` before and
after, and -- with py-spy installed (``pip install py-spy``) -- samples the worker while the load runs and prints the
functions with the most samples (own and cumulative). Loopback only; stops what it started, by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import redis as redis_lib
import yaml

from therouter.config import StoreConfig
from therouter.redisproc import RedisProcess, free_port
from therouter.store import Store

BODY = {"model": "deepseek/deepseek-v3.2", "messages": [{"role": "user", "content": "Benchmark me, please."}],
        "max_tokens": 64}
TICK = os.sysconf("SC_CLK_TCK")


def start(args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def commands(r: redis_lib.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def round_trips(r: redis_lib.Redis) -> int:
    """Requests the server has read from clients (one per round trip, a pipeline counts once)."""
    return int(r.info("stats").get("total_reads_processed", 0))


async def load(url: str, headers: dict[str, str], n: int, conc: int, stream: bool) -> tuple[float, int]:
    errors = 0
    payload = json.dumps({**BODY, "stream": stream}).encode()
    hdrs = {**headers, "content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        queue = iter(range(n))

        async def worker() -> None:
            nonlocal errors
            for _ in queue:
                async with s.post(url, data=payload, headers=hdrs) as r:
                    data = await r.read()
                    if r.status != 200 or (stream and not data.endswith(b"data: [DONE]\n\n")):
                        errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return time.perf_counter() - t0, errors


def summarize(raw: Path, top: int) -> None:
    """py-spy's raw (collapsed) output: one line per stack, `frame;frame;... count`."""
    own: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            cum[f] += n
    if not total:
        print("  (no samples)")
        return
    print(f"  {total} samples; own time:")
    for f, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f} %  {f}")
    print("  cumulative:")
    for f, n in cum.most_common(top):
        print(f"  {100 * n / total:5.1f} %  {f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--mode", choices=["json", "stream", "both"], default="both")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--no-spy", action="store_true", help="CPU and Redis figures only (no sampling overhead)")
    a = ap.parse_args()
    spy = None if a.no_spy else shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                                           if (Path(sys.executable).parent / "py-spy").exists()
                                                           else None)

    tmp = Path(tempfile.mkdtemp(prefix="therouter-profile-"))
    procs: list[subprocess.Popen[bytes]] = []
    redis = RedisProcess(tmp / "redis", appendonly=False).start()
    try:
        up_port, gw_port = free_port(), free_port()
        procs.append(start([sys.executable, "-m", "therouter.fakeupstream", "--flavor", "deepseek", "--port",
                            str(up_port), "--models", "*"]))
        wait_http(f"http://127.0.0.1:{up_port}/health")
        cfg = {
            "server": {"model_check_interval": 0},
            "store": {"redis_url": redis.url, "key_prefix": "bench:"},
            "data_dir": str(tmp / "data"),
            "providers": {"up": {"kind": "deepseek", "base_url": f"http://127.0.0.1:{up_port}",
                                 "max_connections": 1024, "non_stream": "passthrough"}},
            "models": {"deepseek/deepseek-v3.2": {
                "context_length": 131072, "max_output_tokens": 32768,
                "supported_parameters": ["temperature", "max_tokens", "top_p", "stop"],
                "pricing": {"input": 0.96, "cached_input": 0.96, "output": 2.88},
                "deployments": [{"provider": "up", "model": "deepseek-v3.2"}]}},
        }
        (tmp / "profile.yaml").write_text(yaml.safe_dump(cfg))
        gw = start([sys.executable, "-m", "therouter", "serve", "--config", str(tmp / "profile.yaml"),
                    "--port", str(gw_port), "--workers", "1"], log=tmp / "gateway.log")
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{gw_port}/health")

        async def mk() -> str:
            st = Store(StoreConfig(redis_url=redis.url, key_prefix="bench:"))
            k, _ = await st.create_key("profile", budget_nano=10**15, rpm=10**7, tpm=10**10)
            await st.aclose()
            return k

        key = asyncio.run(mk())
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        auth = {"authorization": f"Bearer {key}"}
        r = redis_lib.Redis.from_url(redis.url, decode_responses=True)
        for stream in {"json": [False], "stream": [True], "both": [False, True]}[a.mode]:
            name = "stream" if stream else "json"
            asyncio.run(load(url, auth, 200, a.concurrency, stream))  # warm-up
            c0, cmd0, rt0, rss0 = cpu_seconds(gw.pid), commands(r), round_trips(r), rss_mb(gw.pid)
            rec = None
            if spy:
                raw = tmp / f"{name}.txt"
                rec = subprocess.Popen([spy, "record", "--pid", str(gw.pid), "--format", "raw", "-o", str(raw),
                                        "--rate", "250", "--nonblocking"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            wall, errors = asyncio.run(load(url, auth, a.requests, a.concurrency, stream))
            c1, cmd1, rt1 = cpu_seconds(gw.pid), commands(r), round_trips(r)
            n = a.requests
            rtn = (rt1 - rt0) / n
            delta = {k: v - cmd0.get(k, 0) for k, v in cmd1.items() if v - cmd0.get(k, 0) > 0}
            per = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1])
                            if k not in ("info",))
            print(f"== {name}: {n} requests at concurrency {a.concurrency}: {n / wall:.0f} req/s, {errors} errors")
            print(f"  gateway CPU {1000 * (c1 - c0) / n:.3f} ms/request (incl. sampling overhead if profiled); "
                  f"RSS {rss0:.0f} -> {rss_mb(gw.pid):.0f} MB")
            print(f"  Redis round trips (reads processed, all clients) {rtn:.2f}/request; commands/request: {per}")
            if rec is not None:
                rec.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                rec.wait(60)
                summarize(tmp / f"{name}.txt", a.top)
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
