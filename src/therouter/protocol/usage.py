"""Token usage as the gateway understands it, whatever the upstream called the fields.

An upstream's counts are not trusted blindly: a count that is not a non-negative integer (a string, a bool, a
fractional or non-finite float, a negative number), or a usage object without its prompt or completion count, is
read as 0 and named in ``rejected`` (field -> reason), so the meter can put the gateway's own estimate in its place
and count the anomaly (``metering/bounds.py``, which also clamps counts to the model card).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the provider's cache (billed at cached_input)
    reasoning_tokens: int = 0  # part of completion_tokens
    # prompt tokens written to the provider's cache (Anthropic's cache_creation_input_tokens; billed at
    # cache_write): part of prompt_tokens, apart from cached_tokens
    cache_write_tokens: int = 0
    estimated: bool = False  # counted locally (stream cut before the upstream reported usage)
    # fields whose upstream value could not be used: "prompt_tokens" | "completion_tokens" | "cached_tokens" |
    # "reasoning_tokens" | "cache_write_tokens" -> "missing" | "not_a_number" | "negative" (never stored: the meter resolves them)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, u: dict[str, Any]) -> Usage:
        """Reads OpenAI, DeepSeek (prompt_cache_hit/miss), vLLM and SGLang (top-level reasoning_tokens) spellings, and
        ``prompt_tokens_details.cache_write_tokens`` (what the Anthropic adapter reports cache writes as)."""
        rejected: dict[str, str] = {}

        def count(name: str, v: Any) -> int:
            if type(v) is int and v >= 0:  # (what every sane upstream sends: no more to check)
                return v
            n, problem = _count(v)
            if problem is not None:
                rejected.setdefault(name, problem)
            return n

        prompt = count("prompt_tokens", u.get("prompt_tokens"))
        hit = u.get("prompt_cache_hit_tokens")
        miss = u.get("prompt_cache_miss_tokens")
        if hit is not None:
            cached = count("cached_tokens", hit)
            if miss is not None and prompt == 0 and "prompt_tokens" not in rejected:
                prompt = cached + count("prompt_tokens", miss)
        details = u.get("prompt_tokens_details") or {}
        if hit is None:
            cached = count("cached_tokens", details.get("cached_tokens")) if isinstance(details, dict) else 0
        written = count("cache_write_tokens", details.get("cache_write_tokens")) if isinstance(details, dict) else 0
        cdetails = u.get("completion_tokens_details") or {}
        reasoning = count("reasoning_tokens", cdetails.get("reasoning_tokens")) if isinstance(cdetails, dict) else 0
        if not reasoning and "reasoning_tokens" not in rejected:
            reasoning = count("reasoning_tokens", u.get("reasoning_tokens"))
        if u.get("prompt_tokens") is None and (hit is None or miss is None):
            rejected["prompt_tokens"] = "missing"
        if u.get("completion_tokens") is None:
            rejected["completion_tokens"] = "missing"
        return cls(
            prompt_tokens=prompt,
            completion_tokens=count("completion_tokens", u.get("completion_tokens")),
            cached_tokens=cached,  # may exceed prompt_tokens here: the meter clamps it and counts the anomaly
            reasoning_tokens=reasoning,
            cache_write_tokens=written,  # like cached_tokens, clamped by the meter
            rejected=rejected,
        )

    def to_openai(self, original: dict[str, Any] | None = None) -> dict[str, Any]:
        """OpenAI's shape; provider-specific originals (e.g. DeepSeek's hit/miss counts) are kept."""
        out: dict[str, Any] = dict(original) if original else {}
        out["prompt_tokens"] = self.prompt_tokens
        out["completion_tokens"] = self.completion_tokens
        out["total_tokens"] = self.total_tokens
        ptd = _details(out.get("prompt_tokens_details"))
        ptd["cached_tokens"] = self.cached_tokens
        if self.cache_write_tokens:
            ptd["cache_write_tokens"] = self.cache_write_tokens
        else:
            ptd.pop("cache_write_tokens", None)
        out["prompt_tokens_details"] = ptd
        ctd = _details(out.get("completion_tokens_details"))
        ctd["reasoning_tokens"] = self.reasoning_tokens
        out["completion_tokens_details"] = ctd
        out.pop("reasoning_tokens", None)
        if self.estimated:
            out["estimated"] = True
        return out


def _details(v: Any) -> dict[str, Any]:
    return dict(v) if isinstance(v, dict) else {}


def _count(v: Any) -> tuple[int, str | None]:
    """A token count as the upstream sent it -> (value, problem). Absent (None) is 0 and no problem."""
    if v is None:
        return 0, None
    if isinstance(v, bool):
        return 0, "not_a_number"
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            return 0, "not_a_number"
        v = int(v)
    if not isinstance(v, int):
        return 0, "not_a_number"
    if v < 0:
        return 0, "negative"
    return v, None
