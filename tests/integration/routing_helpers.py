"""Helpers for the routing integration tests: fakes on a chosen port (to kill and bring back), a gateway started
with explicit routing options (the config's `routing:` section), and small client helpers."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.integration.conftest import ADMIN_KEY, Fake, Gateway, start_gateway
from therouter.demo import start_fake_upstream
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
    deadline = time.monotonic() + 20
    while True:  # the port may take a moment to be free again after a kill
        try:
            return Fake(flavor, port, start_fake_upstream(flavor, port, api_key, "--models", "*", *extra))
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


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
    """The real `therouter serve`, with the routing options in the config's `routing:` section."""
    return start_gateway({**cfg, "routing": options or {}}, tmp, workers=workers)


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

