"""Helpers for the misbehaving-upstream tests: a gateway of their own (fresh memory baseline, its own limits),
generation records, SSE events, the gateway process's peak memory."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.integration.conftest import (
    ADMIN_KEY,
    CANARY,
    Fake,
    Gateway,
    make_key,
    own_config,
    running,
    start_gateway,
)
from therouter.redisproc import RedisProcess

MODEL = "deepseek/deepseek-v3.2"  # deepseek (CANARY key) first, then vllm-local, then sglang-local
NOWHERE_MODEL = "test/only-nowhere"  # one deployment on a closed port, no health check: every request tries it
UNHEALTHY_MODEL = "test/only-unhealthy"  # one deployment on a closed port whose health check fails: skipped
EVENT_LIMIT = 256 * 1024  # server.max_upstream_event_bytes of this gateway
BODY_LIMIT = 4 * 1024 * 1024  # server.max_upstream_body_bytes of this gateway

# what the fake's echo_request puts in its errors (therouter.fakeupstream.misbehave), none of which may reach a client
ECHO_PATH = "/srv/fake-upstream/config/server.yaml"
ECHO_PEER = "10.20.30.40:8000"


def start_own_gateway(redis_url: str, fakes: dict[str, Fake], tmp: Path) -> Gateway:
    cfg = own_config(redis_url, fakes, tmp, "up")
    cfg["server"]["max_upstream_event_bytes"] = EVENT_LIMIT
    cfg["server"]["max_upstream_body_bytes"] = BODY_LIMIT
    # the non-stream cases here are about the passthrough body reader (answers assembled from a stream are read as
    # the stream cases are): deepseek forwards non-stream requests as they come
    cfg["providers"]["deepseek"]["non_stream"] = "passthrough"
    card = {k: v for k, v in cfg["models"][MODEL].items() if k != "deployments"}
    closed = cfg["providers"]["nowhere"]["base_url"].removesuffix("/v1")  # a free port nothing listens on
    cfg["providers"]["nowhere-hosted"] = {"kind": "deepseek", "base_url": closed,
                                          "timeouts": cfg["providers"]["nowhere"]["timeouts"]}
    cfg["models"][NOWHERE_MODEL] = {**card, "deployments": [{"provider": "nowhere-hosted", "model": "m"}]}
    cfg["models"][UNHEALTHY_MODEL] = {**card, "deployments": [{"provider": "nowhere", "model": "m"}]}
    return start_gateway(cfg, tmp)


def module_fixtures(name: str) -> tuple[Any, Any, Any]:
    """The fixtures of an upstream test module, as ``gw, _fresh_routing, key = module_fixtures(NAME)``: the
    module's own gateway (:func:`start_own_gateway`); each test starts as after an operator's reset of every
    provider (the faults count toward circuits); a new key per test."""

    @pytest.fixture(scope="module")
    def gw(redis_proc: RedisProcess, fakes: dict[str, Fake],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
        with running(start_own_gateway(redis_proc.url, fakes, tmp_path_factory.mktemp(name))) as g:
            yield g

    @pytest.fixture(autouse=True)
    def _fresh_routing(gw: Gateway) -> Iterator[None]:
        yield
        reset_routing(gw)

    @pytest.fixture
    async def key(gw: Gateway) -> str:
        return await make_key(gw, name)

    return gw, _fresh_routing, key


def leaks(client_key: str) -> list[str]:
    """What must never be in anything a client receives."""
    return [CANARY, base64.b64encode(CANARY.encode()).decode()[:20], quote(CANARY, safe=""), client_key,
            "http://", "10.20.30.40", "127.0.0.1", "/srv/", "Traceback", "handlers.py", "RuntimeError", "gpu-0"]


def secrets_in(text: str, client_key: str) -> list[str]:
    """Secrets found in ``text`` (logs and records may keep locations, never these)."""
    forms = [CANARY, base64.b64encode(CANARY.encode()).decode()[:20], quote(CANARY, safe=""), client_key]
    return [f for f in forms if f in text]


def record(gw: Gateway, key: str, gen_id: str) -> dict[str, Any]:
    r = httpx.get(gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {key}"},
                  timeout=5)
    r.raise_for_status()
    return r.json()["data"]  # type: ignore[no-any-return]


def reset_routing(gw: Gateway) -> None:
    for provider in ("deepseek", "vllm-local", "sglang-local", "nowhere", "nowhere-hosted"):
        httpx.post(f"{gw.url}/admin/providers/{provider}/reset", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   timeout=5).raise_for_status()


def provider_report(gw: Gateway, provider: str) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/admin/providers", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
    r.raise_for_status()
    return next(p for p in r.json()["data"] if p["provider"] == provider)  # type: ignore[no-any-return]


def stream_raw(gw: Gateway, key: str, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    """POST a stream with raw httpx; the response and its ``data:`` payloads."""
    with httpx.stream("POST", gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={**body, "stream": True}, timeout=30) as r:
        text = r.read().decode()
    return r, [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


def error_event(events: list[str]) -> dict[str, Any]:
    last = json.loads(events[-1])
    assert set(last) == {"error"}, last
    assert "[DONE]" not in events  # a broken answer never looks complete
    return last["error"]  # type: ignore[no-any-return]


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")
