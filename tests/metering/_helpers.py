"""Helpers shared by the metering tests (settings with two priced models, an injectable clock, records)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from therouter.config import Settings, parse_settings
from therouter.metering import GenerationRecord, Meter
from therouter.metering.admission import Admission
from therouter.protocol.usage import Usage

T0 = datetime(2025, 1, 31, 23, 59, 0, tzinfo=UTC).timestamp()  # one minute before a day and month end


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(**pricing: dict[str, str]) -> Settings:
    """Two models; ``pricing`` overrides a model's prices (USD per 1M tokens) by model name."""
    raw: dict[str, Any] = {
        "store": {"redis_url": "redis://127.0.0.1:1/0"},
        "providers": {
            "deepseek": {"kind": "deepseek", "base_url": "https://api.deepseek.com"},
            "local": {"kind": "vllm", "base_url": "http://127.0.0.1:8000/v1"},
        },
        "models": {
            # DeepSeek list prices: cache miss 0.28, cache hit 0.028, output 0.42 USD per 1M tokens
            "deepseek-chat": {"context_length": 131072, "max_output_tokens": 8192,
                              "pricing": {"input": "0.28", "cached_input": "0.028", "output": "0.42"},
                              "deployments": [{"provider": "deepseek", "model": "deepseek-chat"}]},
            "qwen": {"context_length": 32768, "max_output_tokens": 4096,
                     "pricing": {"input": "0.10", "cached_input": "0.05", "output": "0.20"},
                     "deployments": [{"provider": "local", "model": "Qwen/Qwen2.5-7B-Instruct"}]},
        },
    }
    for model, p in pricing.items():
        raw["models"][model]["pricing"] = p
    return parse_settings(raw, "test", env={})


def record(gen_id: str, prompt: int = 100, completion: int = 10, cached: int = 0, reasoning: int = 0,
           outcome: str = "completed", stream: bool = False) -> GenerationRecord:
    return GenerationRecord(
        id=gen_id, key_id="", model="", provider="deepseek", upstream_model="deepseek-chat",
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                    reasoning_tokens=reasoning),
        created=int(T0), latency_ms=120, outcome=outcome, stream=stream,  # type: ignore[arg-type]
        ttft_ms=40 if stream else None,
        attempts=[{"provider": "deepseek", "outcome": "completed", "latency_ms": 120, "status": 200}],
    )


async def settle_failed(meter: Meter, adm: Admission) -> int:
    """A request that got no answer, settled as the gateway settles it: a record without usage, which gives the
    whole reservation (budget and TPM tokens) back."""
    return await meter.settle(adm, record(adm.gen_id, prompt=0, completion=0, outcome="failed"))


def gen() -> str:
    return "gen-" + uuid.uuid4().hex


def record_sends(monkeypatch: Any, store: Any) -> list[list[tuple[Any, ...]]]:
    """Every batch ``store.send`` gets from now on (a test counts round trips and their commands with it)."""
    sent: list[list[tuple[Any, ...]]] = []
    real_send = store.send

    async def counting_send(commands: list[tuple[Any, ...]]) -> list[Any]:
        sent.append(list(commands))
        return await real_send(commands)

    monkeypatch.setattr(store, "send", counting_send)
    return sent
