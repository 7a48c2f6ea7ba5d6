"""What routing knows about each deployment right now: breaker, cooldown, drain, in-flight count, measured figures.

All of it is local to the process and read on the hot path without I/O. Drains and cooldowns are also shared with the
other workers and replicas through Redis by :class:`therouter.routing.shared.SharedSync` (which this module never
imports: it is attached as ``sync``); breakers and measurements stay local, where speed matters.

A deployment is identified by ``(provider name, upstream model id)``: the same upstream serving two public models
shares one breaker, one cooldown and one in-flight count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from therouter.routing.breaker import Breaker, State, Window
from therouter.routing.budget import RetryBudget
from therouter.routing.options import RoutingOptions

log = logging.getLogger("therouter.routing")
DepKey = tuple[str, str]  # (provider, upstream model)


class Sync(Protocol):
    def push_drain(self, provider: str, drained: bool) -> None: ...

    def push_cooldown(self, key: DepKey, seconds: float) -> None: ...

    def poke(self) -> None: ...


@dataclass
class DepStats:
    window: Window
    in_flight: int = 0
    latency: float | None = None  # EWMA seconds of successful non-stream attempts
    ttft: float | None = None  # EWMA seconds to the first content chunk of successful streams
    throughput: float | None = None  # EWMA completion tokens per second
    served: int = 0
    last_error: str = ""

    def ewma(self, name: str, value: float, alpha: float) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + alpha * (value - old))


@dataclass
class Lease:
    """One attempt holding an in-flight slot on a deployment; ``close`` is idempotent."""

    state: RoutingState
    key: DepKey
    probe: bool = False
    started: float = 0.0
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            st = self.state.stats(self.key)
            st.in_flight = max(st.in_flight - 1, 0)
            if self.state.on_in_flight is not None:
                self.state.on_in_flight(self.key, -1)


@dataclass
class RoutingState:
    options: RoutingOptions = field(default_factory=RoutingOptions)
    clock: Callable[[], float] = time.monotonic
    on_breaker: Callable[[DepKey, State], None] | None = None
    on_in_flight: Callable[[DepKey, int], None] | None = None  # a lease taken (+1) or closed (-1): the metric
    sync: Sync | None = None
    _breakers: dict[DepKey, Breaker] = field(default_factory=dict)
    _stats: dict[DepKey, DepStats] = field(default_factory=dict)
    _cooldown: dict[DepKey, float] = field(default_factory=dict)  # key -> monotonic time it ends
    _drained: dict[str, float] = field(default_factory=dict)  # provider -> monotonic time it was drained
    budget: RetryBudget = field(init=False)

    def __post_init__(self) -> None:
        self.budget = RetryBudget(self.options.budget_percent, self.options.budget_min)

    def apply(self, options: RoutingOptions) -> None:
        """New options (start-up or reload): breakers restart closed; measurements, drains and cooldowns stay."""
        self.options = options
        self._breakers.clear()
        self.budget.percent, self.budget.minimum = options.budget_percent, options.budget_min

    # ---- per deployment ---------------------------------------------------------------------------------------

    def breaker(self, key: DepKey) -> Breaker:
        b = self._breakers.get(key)
        if b is None:
            def changed(state: State, key: DepKey = key) -> None:
                log.warning("circuit of %s/%s is now %s", key[0], key[1], state.replace("_", "-"),
                            extra={"event": "circuit", "provider": key[0], "upstream_model": key[1], "state": state})
                if self.on_breaker is not None:
                    self.on_breaker(key, state)

            b = self._breakers[key] = Breaker(self.options.breaker, self.clock, changed)
        return b

    def stats(self, key: DepKey) -> DepStats:
        s = self._stats.get(key)
        if s is None:
            s = self._stats[key] = DepStats(Window(self.options.stats_window, self.clock))
        return s

    def begin(self, key: DepKey, probe: bool = False) -> Lease:
        self.stats(key).in_flight += 1
        if self.on_in_flight is not None:
            self.on_in_flight(key, 1)
        return Lease(self, key, probe, self.clock())

    # ---- cooldowns (Retry-After) ------------------------------------------------------------------------------

    def cooldown_left(self, key: DepKey) -> float:
        until = self._cooldown.get(key)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._cooldown[key]
            return 0.0
        return left

    def set_cooldown(self, key: DepKey, seconds: float, share: bool = True) -> None:
        seconds = min(seconds, self.options.cooldown_max)
        if seconds <= 0:
            return
        until = self.clock() + seconds
        if until > self._cooldown.get(key, 0.0):
            self._cooldown[key] = until
            if share and self.sync is not None:
                self.sync.push_cooldown(key, seconds)

    def clear_cooldowns(self, provider: str) -> None:
        for k in [k for k in self._cooldown if k[0] == provider]:
            del self._cooldown[k]

    # ---- drains ---------------------------------------------------------------------------------------------------

    def drained(self, provider: str) -> bool:
        return provider in self._drained

    def set_drained(self, provider: str, drained: bool, share: bool = True) -> None:
        if drained and provider not in self._drained:
            self._drained[provider] = self.clock()
            log.warning("provider %s drained: new requests go to other deployments", provider)
        elif not drained and provider in self._drained:
            del self._drained[provider]
            log.warning("provider %s undrained: it takes new requests again", provider)
        if share and self.sync is not None:
            self.sync.push_drain(provider, drained)

    def drained_providers(self) -> set[str]:
        return set(self._drained)

    def reset(self, provider: str) -> None:
        """Operator override after a fix: close the provider's circuits and forget its cooldowns."""
        for k, b in self._breakers.items():
            if k[0] == provider:
                b.reset()
        self.clear_cooldowns(provider)

    # ---- measurements -----------------------------------------------------------------------------------------

    def observe(self, key: DepKey, ok: bool, seconds: float, stream: bool, error: str = "") -> None:
        """An attempt finished (ok = it produced an answer / passed the first-chunk gate)."""
        st = self.stats(key)
        st.window.add(ok)
        if ok:
            st.served += 1
            st.ewma("ttft" if stream else "latency", seconds, self.options.ewma_alpha)
        else:
            st.last_error = error[:200]

    def observe_throughput(self, key: DepKey, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0.001:
            self.stats(key).ewma("throughput", tokens / seconds, self.options.ewma_alpha)

    def observe_stream_break(self, key: DepKey, error: str) -> None:
        """A stream that broke after it started: counts in the error rate and the breaker's ratio window."""
        st = self.stats(key)
        st.window.add(False)
        st.last_error = error[:200]
        self.breaker(key).record_window(False)

    def snapshot(self, key: DepKey) -> dict[str, Any]:
        st = self.stats(key)
        ok, failed = st.window.counts()
        out: dict[str, Any] = {
            "circuit": self.breaker(key).snapshot(),
            "in_flight": st.in_flight,
            "latency_ms": None if st.latency is None else round(st.latency * 1000, 1),
            "ttft_ms": None if st.ttft is None else round(st.ttft * 1000, 1),
            "throughput_tps": None if st.throughput is None else round(st.throughput, 1),
            "recent": {"window_s": self.options.stats_window, "ok": ok, "failed": failed,
                       "error_rate": round(failed / (ok + failed), 3) if ok + failed else 0.0},
            "served": st.served,
        }
        cd = self.cooldown_left(key)
        if cd:
            out["cooldown_s"] = round(cd, 3)
        if st.last_error:
            out["last_error"] = st.last_error
        return out
