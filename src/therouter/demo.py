"""`therouter demo`: a private redis-server, three simulated upstreams (DeepSeek, vLLM, SGLang flavours), the gateway
and a demo key, all on loopback, with no API key needed. Ctrl-C stops everything it started.

Before it starts anything it claims the gateway's port (a busy port: one line, nothing started) and locks its data
folder (one demo per folder). It says what it is doing as it starts, then prints a demo key, an admin key and the
``export REDIS_URL=... THEROUTER_ADMIN_KEY=...`` line with which ``therouter keys``, ``therouter usage`` and the
``/admin`` endpoints work against the demo's own Redis."""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from therouter.redisproc import RedisProcess, free_port

DEMO_UPSTREAM_KEY = "demo-upstream-key"


def start_fake_upstream(flavor: str, port: int, api_key: str | None = None, *extra: str,
                        timeout: float = 20.0) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "therouter.fakeupstream", "--flavor", flavor, "--port", str(port), *extra]
    if api_key:
        args += ["--api-key", api_key]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"fake upstream ({flavor}) did not start")


def _snippets(port: int, key: str, redis_url: str, admin_key: str) -> str:
    base = f"http://127.0.0.1:{port}/v1"
    return f"""
TheRouter demo is running at {base}  (Ctrl-C to stop)

Demo key: {key}

Try it with curl:
  curl -s {base}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "deepseek/deepseek-v3.2", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

Or with the OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{key}")
  r = client.chat.completions.create(model="deepseek/deepseek-v3.2",
                                     messages=[{{"role": "user", "content": "Hello!"}}])
  print(r.choices[0].message.content, r.usage)
  for chunk in client.chat.completions.create(model="deepseek/deepseek-v3.2", stream=True,
                                              messages=[{{"role": "user", "content": "Hi"}}]):
      print(chunk.choices[0].delta.content or "", end="")

The same code reaches a Claude-routed model (a simulated Anthropic Messages API, no key needed):
  r = client.chat.completions.create(model="anthropic/claude-opus-4.7",
                                     messages=[{{"role": "user", "content": "Hello!"}}])

Claude Code or the Anthropic SDK (pip install anthropic), on deepseek/deepseek-v3.2 (every claude-* id is an alias):
  ANTHROPIC_BASE_URL=http://127.0.0.1:{port} ANTHROPIC_AUTH_TOKEN={key} claude
  import anthropic
  client = anthropic.Anthropic(base_url="http://127.0.0.1:{port}", api_key="{key}")
  m = client.messages.create(model="claude-sonnet-4-6", max_tokens=256,
                             messages=[{{"role": "user", "content": "Hello!"}}])

Spend of the demo key: curl -s {base}/key -H "Authorization: Bearer {key}"

Operate it from another terminal (keys, usage and the /admin endpoints, against this demo's Redis):
  export REDIS_URL={redis_url} THEROUTER_ADMIN_KEY={admin_key}
  .venv/bin/therouter keys list
  .venv/bin/therouter usage
  curl -s http://127.0.0.1:{port}/admin/keys -H "Authorization: Bearer $THEROUTER_ADMIN_KEY"
"""


class DemoError(Exception):
    """Something the demo cannot start with, said in one line (nothing was started)."""


def claim_port(port: int) -> socket.socket:
    """Bind the gateway's port before anything starts; the socket is handed to the server (no race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        raise DemoError(f"port {port} on 127.0.0.1 is not free ({e.strerror}); stop what uses it, or pick another "
                        f"port: PORT=8090 ./scripts/demo.sh (or therouter demo --port 8090). Nothing was started.") \
            from None
    sock.set_inheritable(True)
    return sock


def lock_data_dir(data: Path) -> TextIO:
    """One demo per data folder (two would share one Redis data folder): an exclusive lock held while it runs."""
    data.mkdir(parents=True, exist_ok=True)
    f = open(data / "demo.lock", "a+")  # noqa: SIM115 -- held open for the demo's whole life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise DemoError(f"another `therouter demo` (pid {pid}) is using {data}; stop it, or give this one its own "
                        "folder with --data-dir. Nothing was started.") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def step(what: str) -> None:
    print(what + "...", end=" ", flush=True)


def run_demo(port: int = 8080, data_dir: str = ".demo", config: str = "config/demo.yaml") -> int:
    try:
        sock = claim_port(port)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = Path(data_dir).resolve()
    try:
        lock = lock_data_dir(data)
    except DemoError as e:
        sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _run(sock, port, data, config)
    finally:
        sock.close()
        lock.close()


def _run(sock: socket.socket, port: int, data: Path, config: str) -> int:
    import uvicorn

    from therouter.app import create_app
    from therouter.config import ConfigError, load_settings
    from therouter.logs import setup_logging
    from therouter.server import uvicorn_options
    from therouter.store import Store

    redis = RedisProcess(data / "redis", appendonly=True)
    children: list[subprocess.Popen[str]] = []
    try:
        step(f"starting a private redis-server (data in {data / 'redis'})")
        redis.start()
        print(f"ok, {redis.url}")
        step("starting simulated DeepSeek, vLLM, SGLang and Anthropic upstreams")
        ports = {f: free_port() for f in ("deepseek", "vllm", "sglang", "anthropic")}
        children.append(start_fake_upstream("deepseek", ports["deepseek"], DEMO_UPSTREAM_KEY, "--chunk-delay-ms",
                                            "20"))
        children.append(start_fake_upstream("vllm", ports["vllm"], None, "--chunk-delay-ms", "20"))
        children.append(start_fake_upstream("sglang", ports["sglang"], None, "--chunk-delay-ms", "20"))
        children.append(start_fake_upstream("anthropic", ports["anthropic"], DEMO_UPSTREAM_KEY, "--chunk-delay-ms",
                                            "20"))
        print("ok")
        admin_key = os.environ.get("THEROUTER_ADMIN_KEY") or "admin-" + secrets.token_urlsafe(24)
        os.environ.update({
            "REDIS_URL": redis.url, "DEMO_PORT": str(port), "DEMO_DATA_DIR": str(data),
            "DEMO_DEEPSEEK_PORT": str(ports["deepseek"]), "DEMO_VLLM_PORT": str(ports["vllm"]),
            "DEMO_SGLANG_PORT": str(ports["sglang"]), "DEMO_ANTHROPIC_PORT": str(ports["anthropic"]),
            "DEMO_UPSTREAM_KEY": DEMO_UPSTREAM_KEY, "THEROUTER_ADMIN_KEY": admin_key,
        })
        try:
            settings = load_settings(config)
        except ConfigError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 2

        async def make_key() -> str:
            store = Store(settings.store)
            try:
                key, _ = await store.create_key("demo")
                return key
            finally:
                await store.aclose()

        step("creating a demo key")
        key = asyncio.run(make_key())
        print("ok")
        step(f"starting the gateway on http://127.0.0.1:{port}")
        setup_logging(level="WARNING")  # the demo's own lines are its interface: only problems are logged
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", **uvicorn_options(settings)))

        async def serve() -> None:
            task = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                print("ok")
                print(_snippets(port, key, redis.url, admin_key), flush=True)
            await task

        asyncio.run(serve())
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # a part that would not start (redis-server missing, a simulator that died)
        print(f"failed\nerror: {e}", file=sys.stderr)
        return 1
    finally:
        for c in children:
            c.terminate()
        for c in children:
            try:
                c.wait(5)
            except subprocess.TimeoutExpired:
                c.kill()
        redis.stop()
