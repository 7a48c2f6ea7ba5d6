"""Routing unit-test helpers: settings and providers built the way the app builds them, a fake clock."""

from __future__ import annotations

import random
from typing import Any

from therouter.config import Settings, parse_settings
from therouter.providers import Provider, Transport, UpstreamRequest, UpstreamResponse, build_provider
from therouter.routing.options import RoutingOptions
from therouter.routing.router import Router
from therouter.routing.state import RoutingState

CARD: dict[str, Any] = {"context_length": 8192, "max_output_tokens": 1024,
                        "pricing": {"input": 1, "cached_input": 0.5, "output": 2}}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class NullTransport(Transport):
    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        raise AssertionError("routing unit tests never send")

    async def aclose(self) -> None:
        pass


def settings(models: dict[str, list[dict[str, Any]]], providers: dict[str, str] | None = None) -> Settings:
    """models: id -> deployments; providers: name -> kind (default: every provider named in a deployment, as vllm)."""
    names = {d["provider"] for deps in models.values() for d in deps}
    kinds = providers or {}
    raw = {
        "store": {"redis_url": "redis://127.0.0.1:1"},
        "providers": {n: {"kind": kinds.get(n, "vllm"), "base_url": f"http://{n}.internal/v1"}
                      for n in sorted(names | set(kinds))},
        "models": {mid: {**CARD, "deployments": [{"model": "m", **d} for d in deps]} for mid, deps in models.items()},
    }
    return parse_settings(raw, "test", env={})


def router(s: Settings, options: RoutingOptions | None = None, clock: FakeClock | None = None,
           seed: int = 7) -> Router:
    providers: dict[str, Provider] = {n: build_provider(n, c, NullTransport()) for n, c in s.providers.items()}
    state = RoutingState(options or RoutingOptions(), clock=clock or FakeClock())
    return Router(s, providers, rng=random.Random(seed), state=state)
