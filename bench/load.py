"""The load: wrk with bench/wrk.lua for throughput and latency (duration-bound), and a small aiohttp client for the
modes that need an exact number of requests (RSS, Redis round trips, slow streams)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from stack import pinned, tool

HERE = Path(__file__).resolve().parent
PROMPT = "Benchmark me, please: say something short."


def body(model: str, stream: bool) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64,
                         "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def wrk(url: str, req: dict[str, Any], key: str | None, connections: int, duration: float,
        cpus: str | None, threads: int = 1, delay_ms: float = 0) -> dict[str, Any]:
    """One wrk run; req/s, latency percentiles (ms) and errors (socket errors + non-2xx answers). ``delay_ms``: each
    connection waits that long after an answer before its next request (a paced load; 0: as fast as it can)."""
    env = {**os.environ, "BENCH_BODY": json.dumps(req), "BENCH_KEY": key or "", "BENCH_DELAY_MS": f"{delay_ms:g}"}
    args = pinned(cpus, [tool("wrk"), "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s",
                         "--timeout", "10s", "-s", str(HERE / "wrk.lua"), url])
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=duration + 120,
                         check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    r = json.loads(line.removeprefix("BENCH_RESULT "))
    secs = r["duration_us"] / 1e6
    socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {"requests": r["requests"], "rps": r["requests"] / secs if secs else 0.0,
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "errors": socket_errors + r["status"], "non_2xx": r["status"], "socket_errors": socket_errors,
            "seconds": secs}


@dataclass
class Tally:
    done: int = 0
    errors: int = 0
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)  # what went wrong: "status 503", "ClientOSError", ...
    open: int = 0  # answers whose headers arrived and whose body has not ended yet
    peak_open: int = 0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


async def requests(url: str, key: str | None, req: dict[str, Any], n: int, concurrency: int,
                   timeout: float = 300.0) -> Tally:
    """``n`` requests, ``concurrency`` at a time; an error is a non-200 answer, a stream that does not end with
    ``data: [DONE]``, or a failed connection."""
    payload = json.dumps(req).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    stream = bool(req.get("stream"))
    tally = Tally()
    todo = iter(range(n))
    conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:

        async def worker() -> None:
            for _ in todo:
                tally.done += 1
                try:
                    async with s.post(url, data=payload, headers=headers) as r:
                        tally.open += 1
                        tally.peak_open = max(tally.peak_open, tally.open)
                        try:
                            data = await r.read()
                        finally:
                            tally.open -= 1
                        if r.status != 200:
                            tally.error(f"status {r.status}")
                        elif stream and not data.rstrip().endswith(b"data: [DONE]"):
                            tally.error("stream without [DONE]")
                except (aiohttp.ClientError, TimeoutError) as e:
                    tally.error(type(e).__name__)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        tally.seconds = time.perf_counter() - t0
    return tally
