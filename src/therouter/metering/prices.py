"""Prices and cost: pure integer arithmetic, no I/O, no floats.

Money is an integer of nano-USD (1 USD = 10**9). A price is an integer of nano-USD **per 1M tokens**, so a cost is
``sum(tokens x price) / 1_000_000``. That one division is the only place where rounding happens:

* :func:`cost_nano` rounds **half up** (``(n + 500_000) // 1_000_000``; ``n`` is never negative), so a request costs
  the nearest nano-USD and a tie goes to the provider. Integer arithmetic only, so it is exact for any size.
* :func:`reservation_nano` rounds **up** (ceiling): a worst-case reservation is never smaller than any cost it covers.

Billing rule (DeepSeek hit/miss, vLLM/SGLang ``cached_tokens``, Anthropic cache reads and writes): ``cached_tokens``
(cache reads) are charged at ``cached_input``, ``cache_write_tokens`` (prompt tokens written to the provider's cache)
at ``cache_write`` (``input`` where the price has none), the rest of ``prompt_tokens`` at ``input``, and
``completion_tokens`` (which include reasoning tokens) at ``output``.
Prices are versioned: a request is settled at the :class:`PriceVersion` captured when it was admitted, and the
version in force at a time ``t`` is the one with the newest ``effective_at`` not after ``t`` (ties: higher version).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from therouter.config import MAX_PRICE_USD, NANO
from therouter.protocol.usage import Usage

PER_TOKENS = 1_000_000  # prices are quoted per 1M tokens
_HALF = PER_TOKENS // 2
MAX_PRICE_NANO = int(MAX_PRICE_USD) * NANO  # nano-USD per 1M tokens


@dataclass(frozen=True, slots=True)
class PriceVersion:
    model: str
    version: int
    effective_at: int  # unix seconds
    input: int  # nano-USD per 1M uncached prompt tokens
    cached_input: int  # nano-USD per 1M cached prompt tokens
    output: int  # nano-USD per 1M completion tokens (reasoning included)
    source: str = "config"  # "config" (loaded from the config file) or "operator" (set_price)
    cache_write: int | None = None  # nano-USD per 1M prompt tokens written to the cache (None: at `input`)

    @property
    def cache_write_rate(self) -> int:
        return self.input if self.cache_write is None else self.cache_write

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "effective_at": self.effective_at, "input": self.input,
                "cached_input": self.cached_input, "output": self.output, "source": self.source,
                "cache_write": self.cache_write}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriceVersion:
        """Strict: a version written by hand or by an older build that is not what this build writes (whole
        non-negative numbers, prices at most MAX_PRICE_USD) raises KeyError, TypeError or ValueError."""
        model = d["model"]
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        return cls(
            model=model, version=_whole(d["version"], "version"),
            effective_at=_whole(d["effective_at"], "effective_at"),
            input=_whole(d["input"], "input", MAX_PRICE_NANO),
            cached_input=_whole(d["cached_input"], "cached_input", MAX_PRICE_NANO),
            output=_whole(d["output"], "output", MAX_PRICE_NANO), source=str(d.get("source") or "config"),
            cache_write=None if d.get("cache_write") in (None, "") else _whole(d["cache_write"], "cache_write",
                                                                               MAX_PRICE_NANO),
        )

    def public(self) -> dict[str, Any]:
        """For admin answers: nano integers plus USD strings per 1M tokens."""
        d = self.to_dict()
        d.update(input_usd=nano_to_usd(self.input), cached_input_usd=nano_to_usd(self.cached_input),
                 output_usd=nano_to_usd(self.output))
        if self.cache_write is not None:
            d["cache_write_usd"] = nano_to_usd(self.cache_write)
        return d


def cost_nano(usage: Usage, price: PriceVersion) -> int:
    """Exact cost in nano-USD, rounded half up (see the module docstring)."""
    prompt = max(usage.prompt_tokens, 0)
    cached = min(max(usage.cached_tokens, 0), prompt)
    written = min(max(usage.cache_write_tokens, 0), prompt - cached)
    completion = max(usage.completion_tokens, 0)
    scaled = ((prompt - cached - written) * price.input + cached * price.cached_input
              + written * price.cache_write_rate + completion * price.output)
    return (scaled + _HALF) // PER_TOKENS


def billable(usage: Usage, max_prompt: int, max_completion: int) -> Usage:
    """``usage`` with its counts clamped to what the request could be billed for (a bound of 0 means none)."""
    prompt, completion = max(usage.prompt_tokens, 0), max(usage.completion_tokens, 0)
    if max_prompt > 0:
        prompt = min(prompt, max_prompt)
    if max_completion > 0:
        completion = min(completion, max_completion)
    if (prompt, completion) == (usage.prompt_tokens, usage.completion_tokens):
        return usage
    cached = min(usage.cached_tokens, prompt)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                 reasoning_tokens=min(usage.reasoning_tokens, completion),
                 cache_write_tokens=min(usage.cache_write_tokens, prompt - cached), estimated=usage.estimated)


def prompt_rate(price: PriceVersion) -> int:
    """The dearest rate a prompt token can be billed at: uncached, a cache read or a cache write (a write may cost
    more than uncached input: Anthropic bills it at 1.25x or 2x)."""
    return max(price.input, price.cached_input, price.cache_write_rate)


def reservation_nano(prompt_est: int, max_output: int, price: PriceVersion) -> int:
    """Worst case: every prompt token at the dearest prompt rate (:func:`prompt_rate`), every allowed output token
    at the output rate, rounded up."""
    scaled = max(prompt_est, 0) * prompt_rate(price) + max(max_output, 0) * price.output
    return -(-scaled // PER_TOKENS)


def dearest(*prices: PriceVersion) -> PriceVersion:
    """A price at the highest rate of each kind among ``prices`` (for a reservation that covers any of them)."""
    first = prices[0]
    if len(prices) == 1:
        return first
    return PriceVersion(model=first.model, version=first.version, effective_at=first.effective_at,
                        input=max(p.input for p in prices), cached_input=max(p.cached_input for p in prices),
                        output=max(p.output for p in prices), source=first.source,
                        cache_write=max(p.cache_write_rate for p in prices))


def price_at(versions: Iterable[PriceVersion], at: float) -> PriceVersion | None:
    """The version in force at ``at``: newest ``effective_at`` not after ``at``, ties to the higher version."""
    live = [v for v in versions if v.effective_at <= at]
    return max(live, key=lambda v: (v.effective_at, v.version)) if live else None


def nano_to_usd(nano: int) -> str:
    """Exact decimal string for display: at least 2 decimals, trailing zeros trimmed ("1.50", "0.000212800" ->
    "0.0002128"). Integer arithmetic only (it runs a few times per request)."""
    if 0 <= nano < 10**9:  # under a dollar, most requests: the nine digits without divmod or a format spec
        return f"0.{str(nano + 10**9)[1:].rstrip('0').ljust(2, '0')}"
    whole, frac = divmod(abs(nano), 10**9)
    digits = f"{frac:09d}".rstrip("0")
    return f"{'-' if nano < 0 else ''}{whole}.{digits.ljust(2, '0')}"


def _whole(v: Any, what: str, maximum: int | None = None) -> int:
    """A stored whole number: an int or its decimal digits (the price scripts store strings)."""
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 19:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} is not a whole number")
    if v < 0:
        raise ValueError(f"{what} is negative")
    if maximum is not None and v > maximum:
        raise ValueError(f"{what} is above {maximum}")
    return v
