"""OpenRouter's field names (api/openrouter.py): exact money from integer nano-USD, pure functions of our records."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from therouter.api.openrouter import (
    generation_fields,
    key_fields,
    model_fields,
    per_token,
)
from therouter.config import ModelConfig


@pytest.mark.parametrize("nano_per_m,text", [
    (960_000_000, "0.00000096"), (2_880_000_000, "0.00000288"), (2_800_000, "0.0000000028"), (0, "0"),
    (1, "0.000000000000001"), (1_000_000 * 10**9, "1"), (435_000_000, "0.000000435"),
])
def test_per_token_prices_are_exact_decimal_strings(nano_per_m: int, text: str) -> None:
    assert per_token(nano_per_m) == text
    assert Decimal(text) * 10**6 * 10**9 == nano_per_m  # nothing lost on the way


def summary(**kw: Any) -> dict[str, Any]:
    return {"budget_nano": None, "budget_left_nano": None, "budget_period": "total", "total_spend_nano": 0, **kw}


def test_key_fields() -> None:
    out = key_fields(summary(budget_nano=5 * 10**9, budget_left_nano=1_234_000_000_001, budget_period="month",
                             total_spend_nano=123_456_789), label="app", rpm=60, window_ms=60_000)
    raw = orjson.dumps(out)
    assert b'"usage":0.123456789' in raw and b'"limit":5.00' in raw  # exact JSON numbers, never floats' digits
    assert b'"limit_remaining":1234.000000001' in raw
    assert (out["label"], out["limit_reset"], out["is_free_tier"]) == ("app", "monthly", False)
    assert out["rate_limit"] == {"requests": 60, "interval": "1m"}
    none = key_fields(summary(budget_period="day"), label="x", rpm=None, window_ms=10_000)
    assert (none["limit"], none["limit_remaining"], none["limit_reset"]) == (None, None, None)
    assert none["rate_limit"] == {"requests": -1, "interval": "10s"}


def test_generation_fields() -> None:
    rec = {"id": "chatcmpl-1", "model": "m", "provider": "deepseek", "cost_nano": 2_500, "created": 1_764_316_800,
           "latency_ms": 900, "ttft_ms": 120, "outcome": "client_cancelled", "stream": False, "finish_reason": None,
           "usage": {"prompt_tokens": 11, "completion_tokens": 42, "prompt_tokens_details": {"cached_tokens": 3},
                     "completion_tokens_details": {"reasoning_tokens": 38}}}
    out = generation_fields(rec)
    assert b'"total_cost":0.0000025' in orjson.dumps(out)
    assert (out["tokens_prompt"], out["tokens_completion"], out["native_tokens_cached"],
            out["native_tokens_reasoning"]) == (11, 42, 3, 38)
    assert (out["latency"], out["generation_time"]) == (120, 900)
    assert out["created_at"] == "2025-11-28T08:00:00+00:00"
    assert (out["cancelled"], out["streamed"], out["provider_name"], out["app_id"]) == (True, False, "deepseek", None)
    old = generation_fields({"usage": {}, "latency_ms": 50, "ttft_ms": None, "provider": ""})  # a record of before
    assert (old["latency"], old["finish_reason"], old["provider_name"], old["tokens_prompt"]) == (50, None, None, 0)


def test_model_fields_take_the_primary_deployments_window() -> None:
    card = ModelConfig.model_validate({
        "context_length": 131072, "max_output_tokens": 8192, "pricing": {"input": 0.14, "output": 0.28},
        "modalities": {"input": ["text", "image"]},
        "deployments": [{"provider": "b", "model": "m", "priority": 1},
                        {"provider": "a", "model": "m", "priority": 0, "context_length": 65536}]})
    out = model_fields(card, card.pricing.input, card.pricing.cached_input, card.pricing.output)
    assert out["pricing"] == {"prompt": "0.00000014", "completion": "0.00000028", "input_cache_read": "0.00000014"}
    assert out["top_provider"] == {"context_length": 65536, "max_completion_tokens": 8192, "is_moderated": False}
    assert out["architecture"] == {"modality": "text+image->text", "input_modalities": ["text", "image"],
                                   "output_modalities": ["text"]}
