"""Token usage as the gateway understands it, whatever the upstream called the fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the provider's cache (billed at cached_input)
    reasoning_tokens: int = 0  # part of completion_tokens
    estimated: bool = False  # counted locally (stream cut before the upstream reported usage)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, u: dict[str, Any]) -> Usage:
        """Reads OpenAI, DeepSeek (prompt_cache_hit/miss), vLLM and SGLang (top-level reasoning_tokens) spellings."""
        prompt = _int(u.get("prompt_tokens"))
        hit = u.get("prompt_cache_hit_tokens")
        if hit is not None:
            cached = _int(hit)
            miss = u.get("prompt_cache_miss_tokens")
            if miss is not None and prompt == 0:
                prompt = cached + _int(miss)
        else:
            details = u.get("prompt_tokens_details") or {}
            cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        cdetails = u.get("completion_tokens_details") or {}
        reasoning = _int(cdetails.get("reasoning_tokens")) if isinstance(cdetails, dict) else 0
        if not reasoning:
            reasoning = _int(u.get("reasoning_tokens"))
        return cls(
            prompt_tokens=prompt,
            completion_tokens=_int(u.get("completion_tokens")),
            cached_tokens=min(cached, prompt),
            reasoning_tokens=reasoning,
        )

    def to_openai(self, original: dict[str, Any] | None = None) -> dict[str, Any]:
        """OpenAI's shape; provider-specific originals (e.g. DeepSeek's hit/miss counts) are kept."""
        out: dict[str, Any] = dict(original) if original else {}
        out["prompt_tokens"] = self.prompt_tokens
        out["completion_tokens"] = self.completion_tokens
        out["total_tokens"] = self.total_tokens
        ptd = dict(out.get("prompt_tokens_details") or {})
        ptd["cached_tokens"] = self.cached_tokens
        out["prompt_tokens_details"] = ptd
        ctd = dict(out.get("completion_tokens_details") or {})
        ctd["reasoning_tokens"] = self.reasoning_tokens
        out["completion_tokens_details"] = ctd
        out.pop("reasoning_tokens", None)
        if self.estimated:
            out["estimated"] = True
        return out


def _int(v: Any) -> int:
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return max(v, 0)
    if isinstance(v, float):
        return max(int(v), 0)
    return 0
