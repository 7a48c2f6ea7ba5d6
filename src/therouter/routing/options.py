"""Routing knobs in one typed place, with the defaults the gateway runs with until config wires them.

Defaults follow Envoy (retry budget 20 % / min 3, jittered exponential backoff, consecutive-failure ejection growing
with each ejection) with two deliberate changes for LLM upstreams: a short base ejection (5 s, LiteLLM's cooldown)
because every half-open probe is a real request that falls back when it fails, and ejections that grow linearly up to
5 minutes, so a long outage costs one probe per ejection period and a short blip costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive_failures: int = 5  # attempt failures in a row that open the circuit
    failure_ratio: float = 0.5  # ... or this share of failures in the window,
    ratio_window: float = 30.0  # seconds,
    ratio_min_requests: int = 20  # once the window holds at least this many outcomes
    base_ejection: float = 5.0  # seconds open after the first ejection; x N after the N-th
    max_ejection: float = 300.0
    decay: float = 60.0  # each this many seconds closed forgets one past ejection
    probe_timeout: float = 60.0  # a half-open probe that never reports frees its slot after this


@dataclass(frozen=True, slots=True)
class RoutingOptions:
    # attempts and retries (all inside server.request_deadline)
    max_attempts: int = 3  # per model of the request (the `models` list gives each model its own)
    backoff_base: float = 0.1  # full jitter: uniform(0, min(backoff_max, base * 2**k))
    backoff_max: float = 2.0
    retry_after_cap: float = 10.0  # a longer Retry-After is not waited for: fall back at once
    cooldown_max: float = 300.0  # a deployment's Retry-After cooldown is capped at this
    budget_percent: float = 0.2  # same-deployment retries in flight <= max(budget_min, percent x requests)
    budget_min: int = 3
    breaker: BreakerPolicy = BreakerPolicy()
    # load balancing
    prefix_affinity: tuple[str, ...] = ()  # model ids ("*" = all) whose self-hosted replicas get sticky prefixes
    affinity_prefix_chars: int = 512  # the prompt prefix that is hashed
    affinity_max_imbalance: int = 8  # leave the sticky replica when it has this many more in flight than the least
    ewma_alpha: float = 0.2  # measured latency / throughput smoothing
    stats_window: float = 60.0  # seconds of outcomes behind the admin error rate
    # shared state (drains, cooldowns) in Redis
    sync_interval: float = 1.0  # how stale a worker's copy of the shared state may get
    drain_ttl: float = 7 * 24 * 3600.0  # a drain lapses after this unless renewed
    max_models: int = 5  # entries allowed in a request's `models` list

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingOptions:
        """Build from a plain mapping (the future config section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown routing option(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        if isinstance(values.get("breaker"), dict):
            bknown = {f.name for f in fields(BreakerPolicy)}
            bad = set(values["breaker"]) - bknown
            if bad:
                raise ValueError(f"unknown breaker option(s): {', '.join(sorted(bad))}")
            values["breaker"] = BreakerPolicy(**values["breaker"])
        if "prefix_affinity" in values:
            values["prefix_affinity"] = tuple(values["prefix_affinity"])
        return replace(cls(), **values)

    def affinity_for(self, model_id: str) -> bool:
        return "*" in self.prefix_affinity or model_id in self.prefix_affinity
