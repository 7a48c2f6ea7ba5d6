"""Helpers for the routing integration tests: fakes on a chosen port (to kill and bring back), a gateway launched
with explicit routing options, and small client helpers.

Routing options are not in the config file yet, so :func:`start_routed_gateway` runs the real app through this
module (``python -m tests.integration.routing_helpers``): the app is built by ``create_app`` exactly as ``therouter
serve`` builds it, then ``RoutingOptions`` are applied once its services exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from tests.integration.conftest import ADMIN_KEY, CANARY, Fake, Gateway, stop
from therouter.redisproc import free_port

CARD: dict[str, Any] = {
    "context_length": 4096, "max_output_tokens": 1024,
    "supported_parameters": ["temperature", "max_tokens", "tools", "tool_choice", "response_format", "stop"],
    "pricing": {"input": 0.96, "cached_input": 0.24, "output": 2.88},
}
HELLO = [{"role": "user", "content": "hello there"}]


# ---- fakes --------------------------------------------------------------------------------------------------------


def fake_at(flavor: str, port: int | None = None, *extra: str, api_key: str | None = None) -> Fake:
    """A fake upstream process on ``port`` (a free one if None); ``--models '*'`` so any upstream id is served."""
    port = port or free_port()
    args = [sys.executable, "-m", "therouter.fakeupstream", "--flavor", flavor, "--port", str(port),
            "--models", "*", *extra]
    if api_key:
        args += ["--api-key", api_key]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the port may take a moment to be free again after a kill
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if "listening on" in line:
                return Fake(flavor, port, proc)
            if not line and proc.poll() is not None:
                break
        time.sleep(0.1)
    raise RuntimeError(f"fake upstream {flavor} did not start on port {port}")


def kill(fake: Fake) -> None:
    """An outage: the process dies at once (connections refused from now on)."""
    fake.proc.kill()
    fake.proc.wait(5)


# ---- gateway --------------------------------------------------------------------------------------------------------


def provider(kind: str, url: str, **timeouts: float) -> dict[str, Any]:
    t = {"connect": 0.5, "first_token": 2, "idle": 2, "total": 10, **timeouts}
    p: dict[str, Any] = {"kind": kind, "base_url": url if kind in ("deepseek", "openai") else url + "/v1",
                         "timeouts": t}
    if kind == "deepseek":
        p["api_key_env"] = "TEST_DEEPSEEK_KEY"
    return p


def config(redis_url: str, data_dir: Path, providers: dict[str, Any], models: dict[str, list[dict[str, Any]]],
           deadline: float = 15) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "request_deadline": deadline, "model_check_interval": 0},
        "store": {"redis_url": redis_url, "key_prefix": f"rt{uuid.uuid4().hex[:8]}:"},
        "data_dir": str(data_dir),
        "providers": providers,
        "models": {mid: {**CARD, "deployments": [{"model": "m-" + mid.replace("/", "-"), **d} for d in deps]}
                   for mid, deps in models.items()},
    }


def start_routed_gateway(cfg: dict[str, Any], tmp: Path, options: dict[str, Any] | None = None,
                         workers: int = 1) -> Gateway:
    port = free_port()
    cfg_path = tmp / f"gateway-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = tmp / f"gateway-{port}.log"
    env = {**os.environ, "TEST_DEEPSEEK_KEY": CANARY, "THEROUTER_ADMIN_KEY": ADMIN_KEY,
           "THEROUTER_CONFIG": str(cfg_path), "TEST_ROUTING_OPTIONS": json.dumps(options or {})}
    args = [sys.executable, "-m", "tests.integration.routing_helpers", "--port", str(port), "--workers",
            str(workers)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                return Gateway(url, cfg["store"]["key_prefix"], cfg["store"]["redis_url"], proc, log_path,
                               cfg_path, env)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"gateway did not start: {log_path.read_text()}")


def app_factory() -> Any:
    """uvicorn factory: the app exactly as `therouter serve` builds it, plus routing options from the environment."""
    from contextlib import asynccontextmanager
    from typing import AsyncIterator

    from therouter.app import create_app
    from therouter.config import load_settings
    from therouter.routing.options import RoutingOptions

    options = RoutingOptions.from_dict(json.loads(os.environ.get("TEST_ROUTING_OPTIONS") or "{}"))
    app = create_app(load_settings(os.environ["THEROUTER_CONFIG"]))
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[None]:
        async with inner(a):
            a.state.services.routing.apply(options)
            yield

    app.router.lifespan_context = lifespan
    return app


# ---- clients ------------------------------------------------------------------------------------------------------


def admin(gw: Gateway, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, gw.url + "/admin" + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=10, **kw)


def deployment(gw: Gateway, provider_name: str) -> dict[str, Any]:
    data = admin(gw, "GET", "/providers").json()["data"]
    p = next(p for p in data if p["provider"] == provider_name)
    return p["deployments"][0]  # type: ignore[no-any-return]


def sdk(gw: Gateway, key: str, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=timeout)


def ask(client: openai.OpenAI, model: str, stream: bool = False, **extra: Any) -> tuple[str, int, str]:
    """One request: (x-therouter-provider, x-therouter-attempts, generation id)."""
    kw: dict[str, Any] = {"extra_body": extra} if extra else {}
    if stream:
        with client.chat.completions.with_streaming_response.create(model=model, messages=HELLO, stream=True,
                                                                   **kw) as raw:
            chunks = list(raw.parse())
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return raw.headers["x-therouter-provider"], int(raw.headers["x-therouter-attempts"]), chunks[0].id
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, **kw)
    r = raw.parse()
    assert r.choices[0].message.content
    return raw.headers["x-therouter-provider"], int(raw.headers["x-therouter-attempts"]), r.id


def generation(gw: Gateway, key: str, gen_id: str, wait: float = 5) -> dict[str, Any] | None:
    """The generation record (metering's GET /v1/generation), or None if that endpoint does not answer."""
    deadline = time.monotonic() + wait
    while True:
        r = httpx.get(gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {key}"},
                      timeout=5)
        if r.status_code == 200:
            return r.json()["data"]  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


if __name__ == "__main__":
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    uvicorn.run("tests.integration.routing_helpers:app_factory", factory=True, host="127.0.0.1", port=a.port,
                workers=a.workers, log_level="info", timeout_graceful_shutdown=2)
