"""`therouter demo`: a private redis-server, three simulated upstreams (DeepSeek, vLLM, SGLang flavours), the gateway
and a demo key, all on loopback, with no API key needed. Ctrl-C stops everything it started."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

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


def _snippets(port: int, key: str) -> str:
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

Spend of the demo key: curl -s {base}/key -H "Authorization: Bearer {key}"
"""


def run_demo(port: int = 8080, data_dir: str = ".demo", config: str = "config/demo.yaml") -> int:
    import uvicorn

    from therouter.app import create_app
    from therouter.config import ConfigError, load_settings
    from therouter.store import Store

    data = Path(data_dir).resolve()
    redis = RedisProcess(data / "redis", appendonly=True)
    children: list[subprocess.Popen[str]] = []
    try:
        redis.start()
        ports = {f: free_port() for f in ("deepseek", "vllm", "sglang", "anthropic")}
        children.append(start_fake_upstream("deepseek", ports["deepseek"], DEMO_UPSTREAM_KEY, "--chunk-delay-ms",
                                            "20"))
        children.append(start_fake_upstream("vllm", ports["vllm"], None, "--chunk-delay-ms", "20"))
        children.append(start_fake_upstream("sglang", ports["sglang"], None, "--chunk-delay-ms", "20"))
        children.append(start_fake_upstream("anthropic", ports["anthropic"], DEMO_UPSTREAM_KEY, "--chunk-delay-ms",
                                            "20"))
        os.environ.update({
            "REDIS_URL": redis.url, "DEMO_PORT": str(port), "DEMO_DATA_DIR": str(data),
            "DEMO_DEEPSEEK_PORT": str(ports["deepseek"]), "DEMO_VLLM_PORT": str(ports["vllm"]),
            "DEMO_SGLANG_PORT": str(ports["sglang"]), "DEMO_ANTHROPIC_PORT": str(ports["anthropic"]),
            "DEMO_UPSTREAM_KEY": DEMO_UPSTREAM_KEY,
        })
        try:
            settings = load_settings(config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

        async def make_key() -> str:
            store = Store(settings.store)
            try:
                key, _ = await store.create_key("demo")
                return key
            finally:
                await store.aclose()

        key = asyncio.run(make_key())
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False))

        async def serve() -> None:
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                print(_snippets(port, key), flush=True)
            await task

        asyncio.run(serve())
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for c in children:
            c.terminate()
        for c in children:
            try:
                c.wait(5)
            except subprocess.TimeoutExpired:
                c.kill()
        redis.stop()
