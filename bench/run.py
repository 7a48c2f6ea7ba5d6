"""TheRouter's benchmark: what the gateway costs next to the upstream alone and next to a proxy that does nothing.

    bench/run.sh                          # installs nginx, njs, wrk, redis-server (Debian) and the venv, then runs:
    .venv/bin/python bench/run.py [MODE ...] [--duration 10] [--rounds 1] [--connections 32,128]

Modes (default: latency; `all` = every one but profile):
  latency  nginx direct / bare pass-through (bench/bare.py) / TheRouter, JSON and 52-event streams at each connection
           count, interleaved (each scenario runs its targets back to back, round after round; the median is kept),
           plus TheRouter's JSON assembled from an upstream stream (`non_stream: stream`); req/s, p50, p99, errors,
           CPU ms per request, the ratios TheRouter / bare and TheRouter / direct and the p50 added over direct.
  paced    the latency each target adds below saturation: --paced-connections connections, each waiting
           --paced-delay-ms on average between an answer and its next request; p50 / p99 and the p50 added over
           direct, for nginx direct, the bare pass-through and TheRouter, JSON and streams, interleaved.
  rss      the gateway's RSS after the first --rss-first streams and after --rss-total.
  slow     --slow-streams concurrent streams from an upstream paced at --slow-interval-ms per event: peak RSS, errors.
  redis    Redis round trips (read events) and commands per request, JSON / assembled JSON / stream.
  scale    1 worker vs 2 workers on the whole box, and two 1-worker gateways sharing one Redis (load split across
           them); each followed by the metering check (sum of the key's generation records == its counters).
  profile  py-spy record of the gateway during a wrk run (bench/profile.sh installs py-spy and runs this).

Everything runs on loopback on free ports, in a temp folder, and is stopped by pid when the run ends. With two or
more CPUs the gateway (and the bare proxy) are pinned to CPU 0, wrk, nginx, redis-server and this script to CPU 1
(--no-pin: no pinning; the scale mode never pins). Results: a table on stdout, JSON in bench/results/latest.json
(each mode's entry replaced, the others kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import load  # bench/ is the script's folder, first on sys.path
import upstream
from stack import ASSEMBLED_MODEL, PUBLIC_MODEL, Gateway, Stack, answers_not_ok, cpu_seconds, metering_check, rss_bytes

HERE = Path(__file__).resolve().parent

MODES = ("latency", "paced", "rss", "slow", "redis", "scale", "profile")
TARGET_NAMES = {"direct": "nginx direct", "bare": "bare pass-through", "therouter": "TheRouter",
                "assembled": "TheRouter, assembled"}
MB = 1024 * 1024


class Cpus:
    """Where things run: the gateway on one CPU, the load (wrk, nginx, redis, this script) on another."""

    def __init__(self, pin: bool) -> None:
        self.all = sorted(os.sched_getaffinity(0))
        self.pin = pin and len(self.all) >= 2
        self.gateway = str(self.all[0]) if self.pin else None
        self.load = str(self.all[1]) if self.pin else None

    def describe(self) -> str:
        if not self.pin:
            return f"{len(self.all)} CPU(s), nothing pinned"
        return (f"{len(self.all)} CPUs; gateway / bare proxy pinned to CPU {self.gateway}, wrk + nginx + redis to "
                f"CPU {self.load}")

    def pin_self(self, on: bool) -> None:
        os.sched_setaffinity(0, {int(self.load)} if on and self.load else set(self.all))


def scenarios(a: argparse.Namespace) -> list[tuple[str, int]]:
    return [(kind, c) for kind in ("json", "stream") for c in a.connections]


def label(kind: str, conns: int) -> str:
    return f"{kind} @{conns}"


def measured(pid: int, *wrk_args: Any) -> dict[str, Any]:
    """A wrk run (load.wrk's arguments), with the CPU time the target (pid's process tree) spent per request."""
    c0 = cpu_seconds(pid)
    r = load.wrk(*wrk_args)
    r["cpu_ms_per_req"] = (cpu_seconds(pid) - c0) * 1000 / r["requests"] if r["requests"] else None
    return r


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs)
                           for k in ("rps", "p50_ms", "p90_ms", "p99_ms")}
    cpu = [r["cpu_ms_per_req"] for r in runs if r.get("cpu_ms_per_req") is not None]
    out["cpu_ms_per_req"] = statistics.median(cpu) if cpu else None
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    out["non_2xx"] = sum(r["non_2xx"] for r in runs)
    out["socket_errors"] = sum(r["socket_errors"] for r in runs)
    out["runs"] = [round(r["rps"], 1) for r in runs]
    return out


def per_round(xs: list[dict[str, Any]], ys: list[dict[str, Any]],
              fn: Callable[[dict[str, Any], dict[str, Any]], float | None]) -> float | None:
    """The median over rounds of fn(x, y) for each round's pair of runs."""
    vals = [v for v in (fn(x, y) for x, y in zip(xs, ys, strict=True)) if v is not None]
    return statistics.median(vals) if vals else None


# ---- latency -------------------------------------------------------------------------------------------------


@dataclass
class Targets:
    """nginx, Redis, the bare proxy and TheRouter (with its key) started side by side."""

    nginx_port: int
    nginx_pid: int
    bare: Gateway
    gw: Gateway
    key: str
    key_id: str

    @property
    def direct_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}/v1/chat/completions"


def start_targets(a: argparse.Namespace, st: Stack, cpus: Cpus) -> Targets:
    up = st.nginx(cpus.load)
    nginx_pid = st.procs[-1].pid
    st.redis(cpus.load)
    cfg = st.gateway_config(up)
    bare = st.bare(up, cpus.gateway)
    gw = st.therouter(cfg, cpus.gateway, log_level=a.log_level)
    key, key_id = st.create_key(cfg)
    return Targets(up, nginx_pid, bare, gw, key, key_id)


def mode_latency(a: argparse.Namespace, st: Stack, cpus: Cpus) -> dict[str, Any]:
    t = start_targets(a, st, cpus)
    gw, key, key_id = t.gw, t.key, t.key_id
    # (name, url, model, key, pid whose CPU is counted, json only)
    targets = [("direct", t.direct_url, upstream.UPSTREAM_MODEL, None, t.nginx_pid, False),
               ("bare", t.bare.url, upstream.UPSTREAM_MODEL, None, t.bare.proc.pid, False),
               ("therouter", gw.url, PUBLIC_MODEL, key, gw.proc.pid, False),
               ("assembled", gw.url, ASSEMBLED_MODEL, key, gw.proc.pid, True)]
    if a.warmup > 0:
        for name, url, model, k, _, json_only in targets:
            for stream in (False,) if json_only else (False, True):
                load.wrk(url, load.body(model, stream), k, 16, a.warmup, cpus.load)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rnd in range(a.rounds):
        for kind, conns in scenarios(a):
            stream = kind == "stream"
            for name, url, model, k, pid, json_only in targets:
                if json_only and stream:
                    continue
                r = measured(pid, url, load.body(model, stream), k, conns, a.duration, cpus.load)
                runs.setdefault(label(kind, conns), {}).setdefault(name, []).append(r)
                print(f"  round {rnd + 1}/{a.rounds} {label(kind, conns):<11} {TARGET_NAMES[name]:<21} "
                      f"{r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.2f} ms  errors {r['errors']}", flush=True)
    results: dict[str, Any] = {}
    for scen, per_target in runs.items():
        res: dict[str, Any] = {name: median_of(rs) for name, rs in per_target.items()}
        d, b, t = per_target["direct"], per_target["bare"], per_target["therouter"]
        # ratios per round (its targets ran back to back, under the same noise), then the median over rounds
        res["ratios"] = {
            "therouter_over_bare": per_round(t, b, lambda x, y: x["rps"] / y["rps"] if y["rps"] else None),
            "therouter_over_direct": per_round(t, d, lambda x, y: x["rps"] / y["rps"] if y["rps"] else None),
            "added_p50_ms": per_round(t, d, lambda x, y: x["p50_ms"] - y["p50_ms"]),
            "bare_added_p50_ms": per_round(b, d, lambda x, y: x["p50_ms"] - y["p50_ms"]),
        }
        if "assembled" in per_target:
            asm = per_target["assembled"]
            res["ratios"]["assembled_over_passthrough"] = per_round(
                asm, t, lambda x, y: x["rps"] / y["rps"] if y["rps"] else None)
            res["ratios"]["assembled_over_bare"] = per_round(
                asm, b, lambda x, y: x["rps"] / y["rps"] if y["rps"] else None)
        results[scen] = res
    meter = metering_check(st.redis_url, key_id)
    refused = answers_not_ok(st.tmp / f"{gw.name}.log")
    print_latency(a, cpus, results, meter, refused)
    return {"results": results, "metering": meter, "therouter_answers_not_ok": refused}


def print_latency(a: argparse.Namespace, cpus: Cpus, results: dict[str, Any], meter: dict[str, Any],
                  refused: dict[str, int]) -> None:
    print(f"\nlatency: {cpus.describe()}; wrk, {a.duration:g} s per run, {a.rounds} round(s), median shown")
    print(f"{'scenario':<12}{'target':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'CPU ms/req':>12}")
    for scen, res in results.items():
        for i, name in enumerate(n for n in TARGET_NAMES if n in res):
            x = res[name]
            cpu = "-" if x["cpu_ms_per_req"] is None else f"{x['cpu_ms_per_req']:.3f}"
            print(f"{scen if i == 0 else '':<12}{TARGET_NAMES[name]:<22}{x['rps']:>10,.0f}{x['p50_ms']:>9.2f}"
                  f"{x['p99_ms']:>9.2f}{x['errors']:>8}{cpu:>12}")
    print("\nratios and added latency: per round (its runs back to back), median over the rounds")
    print(f"{'scenario':<12}{'TheRouter/bare':>16}{'TheRouter/direct':>18}{'added p50 vs direct':>21}"
          f"{'bare added p50':>16}{'assembled/passthrough':>23}")
    for scen, res in results.items():
        r = res["ratios"]
        asm = r.get("assembled_over_passthrough")
        print(f"{scen:<12}{_x(r['therouter_over_bare']):>16}{_x(r['therouter_over_direct']):>18}"
              f"{r['added_p50_ms']:>+18.2f} ms{r['bare_added_p50_ms']:>+13.2f} ms{_x(asm):>23}")
    if refused:
        print("TheRouter's answers other than 200 (its request log, warm-ups included; 499: the client left, as wrk "
              "does at the end of each run): " + ", ".join(f"{n} x {k}" for k, n in sorted(refused.items())))
    print_metering("metering", meter)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_metering(what: str, m: dict[str, Any]) -> None:
    verdict = "EXACT" if m["exact"] else "MISMATCH"
    print(f"{what}: {m['records']:,} generation records, sum {m['records_cost_nano']:,} nano-USD; key counters: "
          f"{m['counter_requests']:,} requests, {m['counter_cost_nano']:,} nano-USD; unsettled {m['in_flight']} "
          f"-> {verdict}")


# ---- paced ----------------------------------------------------------------------------------------------------


def mode_paced(a: argparse.Namespace, st: Stack, cpus: Cpus) -> dict[str, Any]:
    """The latency each target adds when it is not saturated: --paced-connections connections, each waiting
    --paced-delay-ms on average (uniformly 0 to twice that, so requests do not come in waves) after an answer before
    its next request -- a load well below every target's capacity -- so the p50 is the time a request takes through
    it, not queueing. nginx direct, the bare proxy and TheRouter back to
    back, JSON and streams, round after round; the added p50 over direct is each round's difference, median."""
    t = start_targets(a, st, cpus)
    targets = [("direct", t.direct_url, upstream.UPSTREAM_MODEL, None),
               ("bare", t.bare.url, upstream.UPSTREAM_MODEL, None), ("therouter", t.gw.url, PUBLIC_MODEL, t.key)]
    conns, pace = a.paced_connections, a.paced_delay_ms
    if a.warmup > 0:
        for _, url, model, k in targets:
            for stream in (False, True):
                load.wrk(url, load.body(model, stream), k, 16, a.warmup, cpus.load)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rnd in range(a.rounds):
        for kind in ("json", "stream"):
            for name, url, model, k in targets:
                r = load.wrk(url, load.body(model, kind == "stream"), k, conns, a.duration, cpus.load,
                             delay_ms=pace)
                runs.setdefault(kind, {}).setdefault(name, []).append(r)
                print(f"  round {rnd + 1}/{a.rounds} paced {kind:<6} {TARGET_NAMES[name]:<21} {r['rps']:>7,.0f} "
                      f"req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}", flush=True)
    results: dict[str, Any] = {}
    print(f"\npaced: {conns} connections, each waiting {pace:g} ms on average between an answer and its next request; "
          f"{a.duration:g} s per run, {a.rounds} round(s), median shown")
    print(f"{'scenario':<10}{'target':<22}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'added p50 ms':>14}")
    for kind, per_target in runs.items():
        d = per_target["direct"]
        res: dict[str, Any] = {}
        for i, (name, rs) in enumerate(per_target.items()):
            m = median_of(rs)
            m["errors"] = sum(r["errors"] for r in rs)
            m["added_p50_ms"] = None if name == "direct" else per_round(
                rs, d, lambda x, y: x["p50_ms"] - y["p50_ms"])
            res[name] = m
            added = "" if m["added_p50_ms"] is None else f"{m['added_p50_ms']:+.2f}"
            print(f"{kind if i == 0 else '':<10}{TARGET_NAMES[name]:<22}{m['rps']:>8,.0f}{m['p50_ms']:>9.2f}"
                  f"{m['p99_ms']:>9.2f}{m['errors']:>8}{added:>14}")
        results[kind] = res
    meter = metering_check(st.redis_url, t.key_id)
    print_metering("metering", meter)
    return {"connections": conns, "delay_ms": pace, "results": results, "metering": meter}


# ---- rss / slow ----------------------------------------------------------------------------------------------


def mode_rss(a: argparse.Namespace, st: Stack, cpus: Cpus) -> dict[str, Any]:
    up = st.nginx(cpus.load)
    st.redis(cpus.load)
    cfg = st.gateway_config(up)
    gw = st.therouter(cfg, cpus.gateway, log_level=a.log_level)
    key, key_id = st.create_key(cfg)
    req = load.body(PUBLIC_MODEL, True)
    start = rss_bytes(gw.proc.pid)
    first = asyncio.run(load.requests(gw.url, key, req, a.rss_first, 32))
    after_first = rss_bytes(gw.proc.pid)
    rest = asyncio.run(load.requests(gw.url, key, req, a.rss_total - a.rss_first, 32))
    after_total = rss_bytes(gw.proc.pid)
    out = {"streams_first": a.rss_first, "streams_total": a.rss_total, "rss_start_mb": start / MB,
           "rss_after_first_mb": after_first / MB, "rss_after_total_mb": after_total / MB,
           "growth_mb": (after_total - after_first) / MB, "errors": first.errors + rest.errors,
           "streams_per_s": (first.done + rest.done) / (first.seconds + rest.seconds)}
    out["metering"] = metering_check(st.redis_url, key_id)
    print(f"\nrss: gateway RSS at start {out['rss_start_mb']:.1f} MB, after {a.rss_first:,} streams "
          f"{out['rss_after_first_mb']:.1f} MB, after {a.rss_total:,} {out['rss_after_total_mb']:.1f} MB "
          f"(growth {out['growth_mb']:+.1f} MB; target: within 50 MB); errors {out['errors']}; "
          f"{out['streams_per_s']:,.0f} streams/s (32 at a time)")
    print_metering("metering", out["metering"])
    return out


def mode_slow(a: argparse.Namespace, st: Stack, cpus: Cpus) -> dict[str, Any]:
    up = st.slow_upstream(cpus.load, a.slow_interval_ms)
    st.redis(cpus.load)
    cfg = st.gateway_config(up)
    gw = st.therouter(cfg, cpus.gateway, log_level=a.log_level)
    key, key_id = st.create_key(cfg)
    req = load.body(PUBLIC_MODEL, True)
    asyncio.run(load.requests(gw.url, key, req, 16, 16))  # warm-up: pools, caches
    start = rss_bytes(gw.proc.pid)
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_bytes(gw.proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t = asyncio.run(load.requests(gw.url, key, req, a.slow_streams, a.slow_streams, timeout=600))
    finally:
        stop.set()
        sampler.join()
    out = {"streams": a.slow_streams, "interval_ms": a.slow_interval_ms, "events": 52, "errors": t.errors,
           "error_kinds": t.kinds, "peak_open_streams": t.peak_open,
           "seconds": t.seconds, "rss_start_mb": start / MB, "peak_rss_mb": peak[0] / MB,
           "min_stream_s": 52 * a.slow_interval_ms / 1000}
    out["metering"] = metering_check(st.redis_url, key_id)
    out["therouter_answers_not_ok"] = answers_not_ok(st.tmp / f"{gw.name}.log")
    print(f"\nslow: {a.slow_streams:,} concurrent streams, upstream paced at {a.slow_interval_ms:g} ms per event "
          f"(>= {out['min_stream_s']:.2f} s each): at most {t.peak_open:,} open at once, all done in {t.seconds:.1f} s, "
          f"errors {t.errors} {out['therouter_answers_not_ok'] or t.kinds or ''}; gateway RSS "
          f"{out['rss_start_mb']:.1f} MB before, peak {out['peak_rss_mb']:.1f} MB (target: < 300 MB, no error)")
    print_metering("metering", out["metering"])
    return out


# ---- redis round trips ---------------------------------------------------------------------------------------


def redis_snapshot(url: str) -> tuple[float, int, dict[str, int]]:
    import redis

    r = redis.Redis.from_url(url)
    info = r.info("all")
    r.close()
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")}
    return time.monotonic(), int(info["total_reads_processed"]), calls


def redis_delta(a0: tuple[float, int, dict[str, int]],
                a1: tuple[float, int, dict[str, int]]) -> tuple[float, int, dict[str, int]]:
    calls = {k: v - a0[2].get(k, 0) for k, v in a1[2].items() if k != "info"}
    return a1[0] - a0[0], a1[1] - a0[1] - 1, {k: v for k, v in calls.items() if v}


def mode_redis(a: argparse.Namespace, st: Stack, cpus: Cpus) -> dict[str, Any]:
    up = st.nginx(cpus.load)
    url = st.redis(cpus.load)
    cfg = st.gateway_config(up)
    gw = st.therouter(cfg, cpus.gateway, log_level=a.log_level)
    key, _ = st.create_key(cfg)
    n = a.redis_requests
    for stream in (False, True):  # warm-up: the key cache, pools
        asyncio.run(load.requests(gw.url, key, load.body(PUBLIC_MODEL, stream), 50, 8))
    s0 = redis_snapshot(url)
    time.sleep(3)
    idle_s, idle_reads, idle_calls = redis_delta(s0, redis_snapshot(url))
    out: dict[str, Any] = {"requests": n, "idle_reads_per_s": idle_reads / idle_s}
    print(f"\nredis: {n:,} requests each, 8 at a time; background traffic (heartbeats, checkpoints, caches) measured "
          f"idle for {idle_s:.1f} s and subtracted: {idle_reads / idle_s:.1f} round trips/s")
    print(f"{'request':<16}{'round trips/req':>16}{'commands/req':>14}  commands per request (script calls inside "
          f"EVALSHA counted too)")
    for name, model, stream in (("json", PUBLIC_MODEL, False), ("json assembled", ASSEMBLED_MODEL, False),
                                ("stream", PUBLIC_MODEL, True)):
        s0 = redis_snapshot(url)
        t = asyncio.run(load.requests(gw.url, key, load.body(model, stream), n, 8))
        time.sleep(0.5)  # settlement that left the response path
        secs, reads, calls = redis_delta(s0, redis_snapshot(url))
        per = {c: (v - idle_calls.get(c, 0) / idle_s * secs) / n for c, v in sorted(calls.items())}
        per = {c: round(v, 3) for c, v in per.items() if v > 0.005}
        trips = (reads - idle_reads / idle_s * secs) / n
        out[name] = {"round_trips_per_req": trips, "commands_per_req": per, "errors": t.errors}
        detail = ", ".join(f"{c} {v:g}" for c, v in sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"{name:<16}{trips:>16.2f}{sum(per.values()):>14.2f}  {detail}  (errors {t.errors})")
    print("(target: at most 2 round trips per request on the request path: admission and settlement)")
    return out


# ---- scale-out -----------------------------------------------------------------------------------------------


def wrk_split(gws: list[Gateway], req: dict[str, Any], key: str, conns: int, duration: float) -> dict[str, Any]:
    """wrk against each gateway at once, the connections split between them; req/s and errors summed, the worst
    p50 / p99 of the parts."""
    parts: list[dict[str, Any]] = [{} for _ in gws]

    def one(i: int) -> None:
        parts[i] = load.wrk(gws[i].url, req, key, max(conns // len(gws), 1), duration, None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(gws))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if any(not p for p in parts):
        raise RuntimeError("a wrk run failed")
    return {"requests": sum(p["requests"] for p in parts), "rps": sum(p["rps"] for p in parts),
            "p50_ms": max(p["p50_ms"] for p in parts), "p90_ms": max(p["p90_ms"] for p in parts),
            "p99_ms": max(p["p99_ms"] for p in parts), "errors": sum(p["errors"] for p in parts),
            "non_2xx": sum(p["non_2xx"] for p in parts), "socket_errors": sum(p["socket_errors"] for p in parts),
            "per_instance_rps": [p["rps"] for p in parts]}


def mode_scale(a: argparse.Namespace, st: Stack, cpus: Cpus) -> dict[str, Any]:
    cpus.pin_self(False)
    up = st.nginx(None)
    st.redis(None)
    cfg = st.gateway_config(up)
    out: dict[str, Any] = {}
    for setup, workers, instances in (("1 worker", 1, 1), ("2 workers", 2, 1), ("2 instances, 1 Redis", 1, 2)):
        gws = [st.therouter(cfg, None, workers=workers, name=f"therouter-{i}", log_level=a.log_level)
               for i in range(instances)]
        key, key_id = st.create_key(cfg)
        for gw in gws:
            if a.warmup > 0:
                load.wrk(gw.url, load.body(PUBLIC_MODEL, False), key, 16, a.warmup, None)
        res: dict[str, Any] = {}
        for kind, conns in scenarios(a):
            r = wrk_split(gws, load.body(PUBLIC_MODEL, kind == "stream"), key, conns, a.duration)
            res[label(kind, conns)] = r
            print(f"  {setup:<21} {label(kind, conns):<11} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                  f"errors {r['errors']}", flush=True)
        res["metering"] = metering_check(st.redis_url, key_id)
        out[setup] = res
        for gw in gws:
            st.stop(gw.proc)
    print(f"\nscale: the whole box ({len(cpus.all)} CPUs) shared by the gateway(s), wrk, nginx and redis; nothing "
          f"pinned; {a.duration:g} s per run")
    scen = [label(k, c) for k, c in scenarios(a)]
    print(f"{'setup':<23}" + "".join(f"{s + ' req/s':>18}" for s in scen) + f"{'errors':>8}")
    for setup, res in out.items():
        print(f"{setup:<23}" + "".join(f"{res[s]['rps']:>18,.0f}" for s in scen)
              + f"{sum(res[s]['errors'] for s in scen):>8}")
    for setup, res in out.items():
        print_metering(f"metering ({setup})", res["metering"])
    return out


# ---- profile -------------------------------------------------------------------------------------------------


def mode_profile(a: argparse.Namespace, st: Stack, cpus: Cpus) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(pyspy):
        raise SystemExit("error: py-spy is not installed: .venv/bin/python -m pip install -e '.[bench]' "
                         "(bench/profile.sh does it)")
    up = st.nginx(cpus.load)
    st.redis(cpus.load)
    cfg = st.gateway_config(up)
    gw = st.therouter(cfg, cpus.gateway, log_level=a.log_level)
    key, _ = st.create_key(cfg)
    model = ASSEMBLED_MODEL if a.profile_scenario == "assembled" else PUBLIC_MODEL
    req = load.body(model, a.profile_scenario == "stream")
    load.wrk(gw.url, req, key, 16, max(a.warmup, 1), cpus.load)
    outfile = Path(a.profile_out).resolve()
    outfile.parent.mkdir(parents=True, exist_ok=True)
    spy = st.start("py-spy", [pyspy, "record", "--pid", str(gw.proc.pid), "--duration", f"{a.profile_seconds:g}",
                              "--rate", "200", "--nonblocking", "--format", a.profile_format, "-o", str(outfile)],
                   cpus.load)
    time.sleep(1)  # py-spy attaches
    r = load.wrk(gw.url, req, key, a.profile_connections, a.profile_seconds, cpus.load)
    spy.wait(a.profile_seconds + 60)
    st.procs.remove(spy)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {(st.tmp / 'py-spy.log').read_text()[-2000:]}")
    print(f"\nprofile: {a.profile_scenario} @{a.profile_connections}, {a.profile_seconds:g} s: {r['rps']:,.0f} "
          f"req/s while sampled (py-spy costs some); {a.profile_format} written to {outfile}")
    if a.profile_format == "raw":
        print_top_frames(outfile)
    return {"scenario": a.profile_scenario, "connections": a.profile_connections, "seconds": a.profile_seconds,
            "rps_while_sampled": r["rps"], "file": str(outfile)}


def print_top_frames(raw: Path, n: int = 15) -> None:
    """From py-spy's raw (collapsed) stacks: the frames with the most samples of their own, and the share of
    samples spent anywhere under each module of therouter."""
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f for f in stack.split(";")]  # no line numbers
        own[frames[-1]] = own.get(frames[-1], 0) + c
        mods = {f.split("(", 1)[1][:-1] for f in frames if "(therouter/" in f}
        for mod in mods - {"therouter/cli.py", "therouter/__main__.py"}:
            under[mod] = under.get(mod, 0) + c
    if not total:
        return
    print(f"{'own samples':>12}  frame")
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        print(f"{100 * c / total:>11.1f}%  {f}")
    print(f"{'under':>12}  therouter module")
    for m, c in sorted(under.items(), key=lambda kv: -kv[1])[:n]:
        print(f"{100 * c / total:>11.1f}%  {m}")


# ---- main ----------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="*", default=["latency"], metavar="MODE",
                    help="latency (default), paced, rss, slow, redis, scale, profile, or all (every one but "
                    "profile)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median is kept (default 1)")
    ap.add_argument("--connections", default="32,128", help="comma-separated connection counts (default 32,128)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target (default 2; 0: none)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--log-level", default="info", help="the gateway's --log-level (default info, as `serve`)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="put a setting over the gateway's config, e.g. --set store.max_connections=256 "
                    "(dotted path, YAML value; repeatable)")
    ap.add_argument("--paced-connections", type=int, default=32)
    ap.add_argument("--paced-delay-ms", type=float, default=100.0)
    ap.add_argument("--rss-first", type=int, default=1000)
    ap.add_argument("--rss-total", type=int, default=10000)
    ap.add_argument("--slow-streams", type=int, default=1000)
    ap.add_argument("--slow-interval-ms", type=float, default=20.0)
    ap.add_argument("--redis-requests", type=int, default=2000)
    ap.add_argument("--profile-scenario", choices=["json", "stream", "assembled"], default="stream")
    ap.add_argument("--profile-connections", type=int, default=32)
    ap.add_argument("--profile-seconds", type=float, default=20.0)
    ap.add_argument("--profile-format", choices=["flamegraph", "speedscope", "raw"], default="flamegraph")
    ap.add_argument("--profile-out", default=str(HERE / "results" / "profile.svg"))
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"), help="JSON results file")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp folder (configs, logs)")
    a = ap.parse_args(argv)
    a.connections = [int(c) for c in str(a.connections).split(",") if c.strip()]
    unknown = [m for m in a.modes if m not in (*MODES, "all")]
    if unknown:
        ap.error(f"unknown mode {unknown[0]!r}: choose from {', '.join(MODES)}, all")
    modes = [m for m in a.modes if m != "all"] + (list(MODES[:-1]) if "all" in a.modes else [])
    a.modes = list(dict.fromkeys(modes))
    if a.rss_total <= a.rss_first:
        ap.error("--rss-total must be more than --rss-first")
    return a


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    cpus = Cpus(not a.no_pin)
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "cpus": len(cpus.all), "pinned": cpus.pin,
            "python": platform.python_version(), "duration_s": a.duration, "rounds": a.rounds,
            "connections": a.connections, "overrides": a.overrides, "command": " ".join(["bench/run.py", *(argv or sys.argv[1:])])}
    print(f"TheRouter benchmark {meta['date']}: {cpus.describe()}; modes {', '.join(a.modes)}", flush=True)
    out_path = Path(a.out)
    try:
        saved = json.loads(out_path.read_text()) if out_path.exists() else {}
        saved = saved if isinstance(saved, dict) and "modes" in saved else {}
    except (OSError, ValueError):
        saved = {}
    saved.setdefault("modes", {})
    fns = {"latency": mode_latency, "paced": mode_paced, "rss": mode_rss, "slow": mode_slow, "redis": mode_redis, "scale": mode_scale,
           "profile": mode_profile}
    for mode in a.modes:
        tmp = Path(tempfile.mkdtemp(prefix=f"therouter-bench-{mode}-"))
        st = Stack(tmp, overrides=a.overrides)
        cpus.pin_self(True)
        try:
            result = fns[mode](a, st, cpus)
        finally:
            st.stop_all()
            if not a.keep_tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                print(f"(temp folder kept: {tmp})")
        saved["modes"][mode] = {"meta": meta, **result}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\nresults: {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
