"""Upstream usage, bounded before it is billed (pure).

An upstream's usage report decides what a client pays, so it is checked like client input:

* a count the upstream got wrong (missing, not a number, negative: ``Usage.rejected``) is replaced by the gateway's
  own estimate of it (prompt: the admission estimate; completion: the text that was relayed, /4) -- cached and
  reasoning counts have no estimate and become 0 -- and the usage is marked ``estimated``;
* every count is clamped to what the served model can do: prompt <= the card's ``context_length``, completion <=
  ``max_output_tokens`` x the number of choices asked for, cached <= prompt, cache writes <= prompt - cached,
  reasoning <= completion.

Each replacement and clamp is reported as a reason (a small fixed set, fit for a metric label).
"""

from __future__ import annotations

from dataclasses import dataclass

from therouter.protocol.usage import Usage

REASONS = ("missing", "not_a_number", "negative", "prompt_over_context", "completion_over_max_output",
           "cached_over_prompt", "cache_write_over_prompt", "reasoning_over_completion")


@dataclass(frozen=True, slots=True)
class Bounds:
    context: int  # prompt tokens at most
    max_output: int  # completion tokens at most, every choice together


def bound_usage(reported: Usage, bounds: Bounds | None, estimate: Usage | None = None) -> tuple[Usage, list[str]]:
    """(the usage to bill, the anomalies found, in a stable order). ``reported`` is left unchanged."""
    reasons: list[str] = []
    u = Usage(prompt_tokens=reported.prompt_tokens, completion_tokens=reported.completion_tokens,  # (a copy:
              cached_tokens=reported.cached_tokens, reasoning_tokens=reported.reasoning_tokens,  # replace() is
              cache_write_tokens=reported.cache_write_tokens, estimated=reported.estimated)  # 4x slower)
    if reported.rejected:
        est = estimate or Usage()
        for name, why in reported.rejected.items():
            reasons.append(why)
            setattr(u, name, getattr(est, name) if name in ("prompt_tokens", "completion_tokens") else 0)
        u.estimated = True
    if bounds is not None:
        if u.prompt_tokens > bounds.context:
            u.prompt_tokens = bounds.context
            reasons.append("prompt_over_context")
        if u.completion_tokens > bounds.max_output:
            u.completion_tokens = bounds.max_output
            reasons.append("completion_over_max_output")
    if u.cached_tokens > u.prompt_tokens:
        u.cached_tokens = u.prompt_tokens
        reasons.append("cached_over_prompt")
    if u.cache_write_tokens > u.prompt_tokens - u.cached_tokens:
        u.cache_write_tokens = u.prompt_tokens - u.cached_tokens
        reasons.append("cache_write_over_prompt")
    if u.reasoning_tokens > u.completion_tokens:
        u.reasoning_tokens = u.completion_tokens
        reasons.append("reasoning_over_completion")
    return u, reasons
