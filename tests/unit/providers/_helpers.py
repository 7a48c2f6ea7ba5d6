"""Helpers for adapter tests: providers built the way the app builds them, over a transport that never sends."""

from __future__ import annotations

from typing import Any

from therouter.config import Deployment, ProviderConfig
from therouter.providers import Provider, Transport, UpstreamRequest, UpstreamResponse, build_provider

CANARY = "sk-CANARY-7f3a9c1e5b2d4a6f8e0c"
BASE = {
    "deepseek": "https://api.deepseek.com",
    "vllm": "http://vllm.internal:8000/v1",
    "sglang": "http://sglang.internal:30000/v1",
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "openai_compatible": "http://lmdeploy.internal:23333/v1",
}


class NullTransport(Transport):
    """Adapters only build requests and parse answers; sending is never expected here."""

    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        raise AssertionError("adapter tests must not send")

    async def aclose(self) -> None:
        pass


def make_provider(kind: str, *, api_key: str | None = CANARY, name: str | None = None, **cfg: Any) -> Provider:
    config = ProviderConfig(kind=kind, base_url=cfg.pop("base_url", BASE[kind]), api_key=api_key, **cfg)
    return build_provider(name or f"{kind}-1", config, NullTransport())


def dep(kind: str = "deepseek", model: str = "upstream-model", **kw: Any) -> Deployment:
    return Deployment(provider=f"{kind}-1", model=model, **kw)
