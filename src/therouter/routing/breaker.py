"""A circuit breaker for one deployment: pure state, clock injected, no I/O.

closed --(N consecutive failures, or failure ratio over a window)--> open for base x ejections (capped)
open --(time passes)--> half-open: exactly one probe request may go through
half-open --probe succeeds--> closed;  --probe fails--> open again, for longer

Past ejections are forgotten one per ``decay`` seconds spent closed, so a host that flaps keeps getting longer
ejections while one that has been healthy for a while starts again from the base time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from therouter.routing.options import BreakerPolicy

State = Literal["closed", "open", "half_open"]
_BUCKETS = 10


class Window:
    """Success / failure counts over the last ``span`` seconds, in fixed buckets (bounded memory)."""

    def __init__(self, span: float, clock: Callable[[], float]) -> None:
        self.width = max(span / _BUCKETS, 1e-3)
        self.clock = clock
        self.buckets: dict[int, list[int]] = {}  # bucket index -> [ok, failed]

    def _trim(self, now: float) -> int:
        idx = int(now // self.width)
        for k in [k for k in self.buckets if k <= idx - _BUCKETS]:
            del self.buckets[k]
        return idx

    def add(self, ok: bool) -> None:
        idx = self._trim(self.clock())
        self.buckets.setdefault(idx, [0, 0])[0 if ok else 1] += 1

    def counts(self) -> tuple[int, int]:
        self._trim(self.clock())
        ok = sum(b[0] for b in self.buckets.values())
        failed = sum(b[1] for b in self.buckets.values())
        return ok, failed

    def clear(self) -> None:
        self.buckets.clear()


class Breaker:
    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        self.policy = policy
        self.clock = clock
        self.on_change = on_change
        self._state: State = "closed"
        self.consecutive = 0
        self.ejections = 0
        self.open_until = 0.0
        self.closed_at = clock()
        self.probe_since: float | None = None
        self.window = Window(policy.ratio_window, clock)
        self.last_reason = ""

    # ---- reading --------------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self._state == "open" and self.clock() >= self.open_until:
            self._set("half_open")
        return self._state

    def remaining(self) -> float:
        """Seconds until the next probe may go (0 when it may go now)."""
        st = self.state
        if st == "open":
            return max(self.open_until - self.clock(), 0.0)
        if st == "half_open" and self._probe_busy():
            return max(self.probe_since + self.policy.probe_timeout - self.clock(), 0.0)  # type: ignore[operator]
        return 0.0

    def available(self) -> bool:
        """May a request be routed here now (without claiming the probe)?"""
        st = self.state
        return st == "closed" or (st == "half_open" and not self._probe_busy())

    def _probe_busy(self) -> bool:
        return self.probe_since is not None and self.clock() - self.probe_since < self.policy.probe_timeout

    # ---- admission --------------------------------------------------------------------------------------------

    def acquire(self) -> Literal["go", "probe"] | None:
        """Claim the right to send one request: "go" (closed), "probe" (the one half-open probe) or None."""
        st = self.state
        if st == "closed":
            return "go"
        if st == "half_open" and not self._probe_busy():
            self.probe_since = self.clock()
            return "probe"
        return None

    # ---- outcomes ---------------------------------------------------------------------------------------------

    def success(self, probe: bool = False) -> None:
        if probe or self._state == "half_open":
            self.probe_since = None
            self._close()
            return
        if self._state == "closed":
            self.consecutive = 0
            self.window.add(True)

    def failure(self, probe: bool = False, reason: str = "") -> None:
        if probe or self._state == "half_open":
            self.probe_since = None
            self._open(reason or "probe failed")
            return
        if self._state != "closed":
            return  # a request that started before the ejection: already accounted for
        self.consecutive += 1
        self.window.add(False)
        p = self.policy
        if self.consecutive >= p.consecutive_failures:
            self._open(reason or f"{self.consecutive} consecutive failures")
            return
        ok, failed = self.window.counts()
        if ok + failed >= p.ratio_min_requests and failed / (ok + failed) >= p.failure_ratio:
            self._open(reason or f"{failed} of the last {ok + failed} requests failed")

    def record_window(self, ok: bool) -> None:
        """An outcome that counts for the ratio only (e.g. a stream that broke after it started)."""
        if self._state == "closed":
            self.window.add(ok)
            if not ok:
                ok_n, failed = self.window.counts()
                p = self.policy
                if ok_n + failed >= p.ratio_min_requests and failed / (ok_n + failed) >= p.failure_ratio:
                    self._open(f"{failed} of the last {ok_n + failed} requests failed")

    def release_probe(self) -> None:
        """The probe ended without a verdict (client went away): let the next request probe."""
        self.probe_since = None

    def reset(self) -> None:
        """Operator override: close now and forget past ejections."""
        self.ejections = 0
        self.probe_since = None
        self._close()

    # ---- transitions ------------------------------------------------------------------------------------------

    def _open(self, reason: str) -> None:
        now = self.clock()
        p = self.policy
        if self._state == "closed" and p.decay > 0:
            self.ejections = max(self.ejections - int((now - self.closed_at) // p.decay), 0)
        self.ejections += 1
        self.open_until = now + min(p.base_ejection * self.ejections, p.max_ejection)
        self.consecutive = 0
        self.window.clear()
        self.last_reason = reason
        self._set("open")

    def _close(self) -> None:
        self.consecutive = 0
        self.window.clear()
        self.closed_at = self.clock()
        self._set("closed")

    def _set(self, state: State) -> None:
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(state)

    def snapshot(self) -> dict[str, object]:
        st = self.state
        out: dict[str, object] = {"state": st, "consecutive_failures": self.consecutive, "ejections": self.ejections}
        if st != "closed":
            out["reason"] = self.last_reason
            out["probe_in"] = round(self.remaining(), 3)
        return out
