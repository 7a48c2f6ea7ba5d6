"""OpenRouter's field names, added beside ours on ``/v1/key``, ``/v1/generation`` and ``/v1/models``.

Tools written for OpenRouter (usage dashboards, cost trackers) read these; our own fields stay as they are. Pure
functions of what the meter and the config already hold: amounts of USD are exact JSON numbers or decimal strings
made from integer nano-USD, never floats.

Where the two conventions meet on one name, ours is kept: a generation's ``usage`` stays our token object (OpenRouter
puts its cost there; read ``total_cost``), and ``model`` is the canonical model id in both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from therouter.config import ModelConfig
from therouter.metering.prices import nano_to_usd

_PER_TOKEN = Decimal(10) ** -15  # nano-USD per 1M tokens -> USD per token
_RESET = {"day": "daily", "month": "monthly"}


def usd(nano: int) -> orjson.Fragment:
    """USD as an exact JSON number."""
    return orjson.Fragment(nano_to_usd(nano).encode())


def per_token(nano_per_m: int) -> str:
    """USD per token as OpenRouter writes it ("0.00000096"), exactly, from integer nano-USD per 1M tokens."""
    return format((Decimal(nano_per_m) * _PER_TOKEN).normalize(), "f")


def interval(window_ms: int) -> str:
    return "1m" if window_ms == 60_000 else f"{window_ms // 1000}s"


def key_fields(summary: dict[str, Any], *, label: str, rpm: int | None, window_ms: int) -> dict[str, Any]:
    """``GET /key``: spend so far (all time), the budget and what is left of it in its period, and the RPM limit
    (``requests: -1`` when the key has none)."""
    budget, left = summary["budget_nano"], summary["budget_left_nano"]
    return {
        "label": label,
        "usage": usd(summary["total_spend_nano"]),
        "limit": None if budget is None else usd(budget),
        "limit_remaining": None if left is None else usd(left),
        "limit_reset": _RESET.get(summary["budget_period"]) if budget is not None else None,
        "rate_limit": {"requests": -1 if rpm is None else rpm, "interval": interval(window_ms)},
        "is_free_tier": False,
    }


def generation_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """``GET /generation``: a stored generation record's facts under OpenRouter's names. ``latency`` is the time to
    the first token (for an answer the upstream did not stream, the whole answer's time); ``generation_time`` the
    whole request's."""
    usage = rec.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    total_ms = int(rec.get("latency_ms") or 0)
    ttft = rec.get("ttft_ms")
    return {
        "total_cost": usd(int(rec.get("cost_nano") or 0)),
        "tokens_prompt": prompt,
        "tokens_completion": completion,
        "native_tokens_prompt": prompt,
        "native_tokens_completion": completion,
        "native_tokens_cached": cached,
        "native_tokens_reasoning": reasoning,
        "latency": total_ms if ttft is None else int(ttft),
        "generation_time": total_ms,
        "provider_name": rec.get("provider") or None,
        "finish_reason": rec.get("finish_reason"),
        "created_at": datetime.fromtimestamp(int(rec.get("created") or 0), UTC).isoformat(),
        "streamed": bool(rec.get("stream")),
        "cancelled": rec.get("outcome") == "client_cancelled",
        "origin": "",
        "app_id": None,
    }


def model_fields(card: ModelConfig, input_nano: int, cached_nano: int, output_nano: int) -> dict[str, Any]:
    """``/models`` entries: prices per token (merged into ``pricing``), the primary deployment's limits and the
    modalities."""
    first = min(card.deployments, key=lambda d: d.priority)
    inputs, outputs = list(card.modalities.input), list(card.modalities.output)
    return {
        "pricing": {"prompt": per_token(input_nano), "completion": per_token(output_nano),
                    "input_cache_read": per_token(cached_nano)},
        "top_provider": {"context_length": first.context_length or card.context_length,
                         "max_completion_tokens": card.max_output_tokens, "is_moderated": False},
        "architecture": {"modality": "+".join(inputs) + "->" + "+".join(outputs), "input_modalities": inputs,
                         "output_modalities": outputs},
    }
