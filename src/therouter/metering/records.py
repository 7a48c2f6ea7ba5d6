"""The generation record: the durable fact of one request, from which every counter can be rebuilt.

``to_dict()`` is JSON-friendly and is exactly what is stored (Redis record, usage streams, journal): usage in
OpenAI's shape (``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``, plus an
``estimated`` flag), cost as integer nano-USD plus a ``cost_usd`` decimal string for display only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from therouter.metering.prices import nano_to_usd
from therouter.protocol.usage import Usage

# upstream_cut: a stream's connection broke or stalled after its first byte; upstream_error: the provider sent
# something unusable after it (an in-band error, a malformed, oversized or wrong-shaped event); gateway_lost: the
# gateway process serving it died, and another instance settled it from its last checkpoint
Outcome = Literal["completed", "client_cancelled", "upstream_cut", "upstream_error", "rejected", "failed",
                  "gateway_lost"]
OUTCOMES: tuple[str, ...] = ("completed", "client_cancelled", "upstream_cut", "upstream_error", "rejected", "failed",
                             "gateway_lost")
# the fields of every counter hash (per:total, per:d:*, per:m:*; "MODEL|field" in bymodel:*), in settle.lua's order
COUNTER_FIELDS = ("cost", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


@dataclass(slots=True)
class GenerationRecord:
    id: str
    key_id: str
    model: str
    provider: str  # the deployment's provider name ("" when no attempt was made)
    upstream_model: str
    usage: Usage
    created: int  # unix seconds
    latency_ms: int
    outcome: Outcome
    stream: bool
    ttft_ms: int | None = None  # to the first chunk; None when the upstream was not streamed (passthrough answers)
    cost_nano: int = 0  # filled by Meter.settle
    price_version: int = 0  # filled by Meter.settle
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {provider, outcome, latency_ms, status?, error?,
    skipped: list[dict[str, Any]] = field(default_factory=list)  # possibly_accepted?} / {provider, reason}
    request_id: str = ""  # the client's x-request-id (or the one the gateway gave the request)
    dropped_params: list[str] = field(default_factory=list)  # hints the serving deployment did not honour
    downgraded: list[str] = field(default_factory=list)  # e.g. json_schema served in JSON mode with an instruction
    finish_reason: str | None = None  # the upstream's (first choice's), None when it never said

    def counters(self) -> dict[str, int]:
        """What this record adds to each counter hash (settle and rebuild both use it)."""
        return dict(zip(COUNTER_FIELDS, self.counter_values(), strict=True))

    def counter_values(self) -> tuple[int, int, int, int, int, int]:
        """:meth:`counters`' values, in ``COUNTER_FIELDS`` order (settle's arguments, without building a dict)."""
        u = self.usage
        prompt = max(u.prompt_tokens, 0)
        return (self.cost_nano, 1, prompt, max(u.completion_tokens, 0), min(max(u.cached_tokens, 0), prompt),
                max(u.reasoning_tokens, 0))

    def to_dict(self) -> dict[str, Any]:
        usage = self.usage.to_openai()
        usage["estimated"] = self.usage.estimated
        return {
            "id": self.id, "key_id": self.key_id, "model": self.model, "provider": self.provider,
            "upstream_model": self.upstream_model, "usage": usage, "cost_nano": self.cost_nano,
            "cost_usd": nano_to_usd(self.cost_nano), "price_version": self.price_version, "created": self.created,
            "latency_ms": self.latency_ms, "ttft_ms": self.ttft_ms, "outcome": self.outcome, "stream": self.stream,
            "attempts": [dict(a) for a in self.attempts], "skipped": [dict(s) for s in self.skipped],
            "request_id": self.request_id, "finish_reason": self.finish_reason,
            "dropped_params": list(self.dropped_params), "downgraded": list(self.downgraded),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRecord:
        raw_usage = dict(d.get("usage") or {})
        usage = Usage.from_openai(raw_usage)
        usage.estimated = bool(raw_usage.get("estimated", False))
        outcome = d.get("outcome", "completed")
        ttft = d.get("ttft_ms")
        return cls(
            id=str(d["id"]), key_id=str(d["key_id"]), model=str(d["model"]), provider=str(d.get("provider", "")),
            upstream_model=str(d.get("upstream_model", "")), usage=usage, created=int(d.get("created", 0)),
            latency_ms=int(d.get("latency_ms", 0)), ttft_ms=None if ttft is None else int(ttft),
            outcome=outcome if outcome in OUTCOMES else "failed",
            stream=bool(d.get("stream", False)), cost_nano=int(d.get("cost_nano", 0)),
            price_version=int(d.get("price_version", 0)),
            attempts=[dict(a) for a in d.get("attempts") or []], skipped=[dict(s) for s in d.get("skipped") or []],
            request_id=str(d.get("request_id") or ""),
            dropped_params=[str(x) for x in d.get("dropped_params") or []],
            downgraded=[str(x) for x in d.get("downgraded") or []],
            finish_reason=d["finish_reason"] if isinstance(d.get("finish_reason"), str) else None,
        )
