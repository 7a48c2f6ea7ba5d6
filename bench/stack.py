"""What the benchmark starts, on free loopback ports, and stops again: nginx (the fake upstream), the slow python
upstream, a private redis-server, the bare pass-through and TheRouter. Every process is started in its own session
(its pid is its process group), optionally pinned to CPUs with taskset, logs into the run's temp folder, and is
stopped by its pid (SIGTERM, then SIGKILL to its own group) when the run ends, however it ends."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

import upstream

HERE = Path(__file__).resolve().parent

PREFIX = "bench:"
PUBLIC_MODEL = "bench/passthrough"  # non_stream: passthrough (JSON asked as JSON upstream)
ASSEMBLED_MODEL = "bench/assembled"  # non_stream: stream (JSON assembled from an upstream stream, DeepSeek's default)
UPSTREAM_KEY = "bench-upstream-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                       None)
    if not found:
        raise SystemExit(f"error: {name} is not installed; run bench/install-deps.sh (or bench/run.sh, which does)")
    return found


def pinned(cpus: str | None, args: list[str]) -> list[str]:
    return ([tool("taskset"), "-c", cpus] if cpus else []) + args


def http_ok(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status < 500)
    except (urllib.error.URLError, OSError):
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants, from /proc."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (VmRSS), bytes."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Gateway:
    name: str
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


@dataclass
class Stack:
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_url: str = ""
    overrides: list[str] = field(default_factory=list)  # "dotted.key=YAML value" put over the gateway's config

    # ---- processes ---------------------------------------------------------------------------------------------

    def start(self, name: str, args: list[str], cpus: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 -- the child holds it
        try:
            p = subprocess.Popen(pinned(cpus, args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, cwd=self.tmp)
        finally:
            log.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own group: start_new_session made pid == pgid
            p.wait(5)
        else:  # anything it left in its group (uvicorn's workers of a crashed parent, say)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)

    def wait_up(self, name: str, p: subprocess.Popen[bytes], ok: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                break
            if ok():
                return
            time.sleep(0.05)
        log = (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} did not come up (exit code {p.poll()}); its log ends:\n{log}")

    # ---- the parts ---------------------------------------------------------------------------------------------

    def nginx(self, cpus: str | None) -> int:
        port = free_port()
        folder = self.tmp / "nginx"
        conf = upstream.write_config(folder, port)
        args = upstream.command(folder, conf)
        args[0] = tool("nginx")
        p = self.start("nginx", args, cpus)
        self.wait_up("nginx", p, lambda: http_ok(f"http://127.0.0.1:{port}/health"))
        return port

    def slow_upstream(self, cpus: str | None, interval_ms: float) -> int:
        port = free_port()
        p = self.start("slow-upstream", [sys.executable, str(HERE / "slow_upstream.py"), "--port", str(port),
                                         "--interval-ms", str(interval_ms)], cpus)
        self.wait_up("slow-upstream", p, lambda: http_ok(f"http://127.0.0.1:{port}/health"))
        return port

    def redis(self, cpus: str | None) -> str:
        port = free_port()
        folder = self.tmp / "redis"
        folder.mkdir(exist_ok=True)
        p = self.start("redis", [tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(folder), "--daemonize", "no",
                                 "--loglevel", "warning", "--maxclients", "10000"], cpus)
        url = f"redis://127.0.0.1:{port}/0"

        def up() -> bool:
            try:
                return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
            except redis.RedisError:
                return False

        self.wait_up("redis", p, up)
        self.redis_url = url
        return url

    def bare(self, upstream_port: int, cpus: str | None) -> Gateway:
        port = free_port()
        env = {**os.environ, "BARE_UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1/chat/completions"}
        p = self.start("bare", [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "bare:app", "--host",
                                "127.0.0.1", "--port", str(port), "--workers", "1", "--no-access-log",
                                "--log-level", "warning", "--backlog", "4096"], cpus, env)
        self.wait_up("bare", p, lambda: _tcp_open(port))
        return Gateway("bare", p, port)

    def gateway_config(self, upstream_port: int) -> Path:
        """TheRouter's config: the nginx upstream as a DeepSeek provider twice (JSON passed through, and assembled
        from a stream), one model each at DeepSeek's prices; metering in the private Redis."""
        base = f"http://127.0.0.1:{upstream_port}/v1"
        card = {"context_length": 131072, "max_output_tokens": 32768,
                "supported_parameters": ["temperature", "max_tokens", "top_p", "stop"],
                "pricing": {"input": 0.28, "cached_input": 0.028, "output": 0.42}}
        cfg = {
            "server": {"model_check_interval": 0},
            "store": {"redis_url": self.redis_url, "key_prefix": PREFIX},
            "data_dir": str(self.tmp / f"data-{upstream_port}"),
            "providers": {
                name: {"kind": "deepseek", "base_url": base, "api_key_env": "BENCH_UPSTREAM_KEY",
                       "max_connections": 4096, "non_stream": mode}
                for name, mode in (("up", "passthrough"), ("up-assembled", "stream"))},
            "models": {
                PUBLIC_MODEL: {**card, "deployments": [{"provider": "up", "model": upstream.UPSTREAM_MODEL}]},
                ASSEMBLED_MODEL: {**card, "deployments": [{"provider": "up-assembled",
                                                           "model": upstream.UPSTREAM_MODEL}]}},
        }
        for item in self.overrides:
            dotted, _, value = item.partition("=")
            *parents, leaf = dotted.split(".")
            node: Any = cfg
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = yaml.safe_load(value)
        path = self.tmp / f"therouter-{upstream_port}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def therouter(self, config: Path, cpus: str | None, workers: int = 1, name: str = "therouter",
                  log_level: str = "info") -> Gateway:
        port = free_port()
        env = {**os.environ, "BENCH_UPSTREAM_KEY": UPSTREAM_KEY}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        p = self.start(name, [sys.executable, "-m", "therouter", "serve", "--config", str(config), "--port",
                              str(port), "--workers", str(workers), "--log-level", log_level], cpus, env)
        self.wait_up(name, p, lambda: http_ok(f"http://127.0.0.1:{port}/health"))
        return Gateway(name, p, port)

    def create_key(self, config: Path) -> tuple[str, str]:
        """A key with a budget and RPM / TPM limits far above what the load can reach (every check runs, none
        trips), made with `therouter keys create`: (the key, its id). The key is the last line of the output, the id
        is named in the line before it."""
        out = subprocess.run([sys.executable, "-m", "therouter", "--config", str(config), "keys", "create",
                              "--name", "bench", "--budget", "1000000", "--rpm", "1000000000",
                              "--tpm", "1000000000"], capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "BENCH_UPSTREAM_KEY": UPSTREAM_KEY})
        if out.returncode != 0:
            raise RuntimeError(f"therouter keys create failed: {out.stderr.strip()}")
        lines = out.stdout.strip().splitlines()
        ids = re.findall(r"\bkey_[A-Za-z0-9]+", "\n".join(lines[:-1]))
        if not ids:
            raise RuntimeError(f"no key id in the output of therouter keys create: {lines[:-1]}")
        return lines[-1].strip(), ids[0]


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def answers_not_ok(log: Path) -> dict[str, int]:
    """What the gateway's request log lines (INFO, text format) say about answers other than 200: "503
    store_unavailable" -> count. Best effort: {} when the log has no such lines (e.g. --log-level warning)."""
    out: dict[str, int] = {}
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for m in re.finditer(r"\bstatus=(\d{3})\b.*?\berror_code=(\S+)", text):
        if m.group(1) != "200":
            k = f"{m.group(1)} {m.group(2)}"
            out[k] = out.get(k, 0) + 1
    return out


def metering_check(redis_url: str, key_id: str, settle_wait: float = 30.0) -> dict[str, Any]:
    """Σ of the key's generation records (their cost and count) against the key's total counters, once nothing is
    reserved any more (every request settled). Read from the gateway's Redis layout (metering/layout.py):
    ``PREFIX{k:ID}:gen:GEN`` records, ``PREFIX{k:ID}:per:total`` counters, ``PREFIX{k:ID}:resv`` reservations."""
    r: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    tag = "{k:" + key_id + "}"
    deadline = time.monotonic() + settle_wait
    last: dict[str, Any] = {}
    while True:
        reserved = [k for k in r.hkeys(f"{PREFIX}{tag}:resv") if k.startswith("g:")]
        records, cost = 0, 0
        names = list(r.scan_iter(match=f"{PREFIX}{tag}:gen:*", count=5000))
        for i in range(0, len(names), 1000):
            for raw in r.mget(names[i:i + 1000]):
                if raw:
                    records += 1
                    cost += int(json.loads(raw)["cost_nano"])
        total = r.hgetall(f"{PREFIX}{tag}:per:total")
        last = {"records": records, "records_cost_nano": cost, "counter_requests": int(total.get("requests", 0)),
                "counter_cost_nano": int(total.get("cost", 0)), "in_flight": len(reserved)}
        last["exact"] = (records == last["counter_requests"] and cost == last["counter_cost_nano"]
                         and not reserved)
        if last["exact"] or time.monotonic() > deadline:
            r.close()
            return last
        time.sleep(0.5)
