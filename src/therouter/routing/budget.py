"""Retry budget and backoff: pure, no clock of their own (the caller sleeps; the RNG is injected).

The budget (Envoy's ``RetryBudget``) bounds how many same-deployment retries may be in flight: at most
``percent`` of the requests in flight, but never fewer than ``minimum`` so a quiet gateway can still retry. An outage
therefore cannot multiply the load on a struggling upstream. Moving to another deployment is a fallback, not a
retry: it is bounded per request by ``max_attempts`` and by the breaker, not by this budget.
"""

from __future__ import annotations

import random

from therouter.errors import GatewayError


class RetryBudget:
    def __init__(self, percent: float = 0.2, minimum: int = 3) -> None:
        self.percent = percent
        self.minimum = minimum
        self.requests = 0  # client requests in flight
        self.retries = 0  # same-deployment retries in flight
        self.refused = 0  # retries refused since start (for the admin view)

    @property
    def limit(self) -> int:
        return max(self.minimum, int(self.percent * self.requests))

    def enter(self) -> None:
        self.requests += 1

    def leave(self) -> None:
        self.requests = max(self.requests - 1, 0)

    def try_retry(self) -> bool:
        """Claim a retry slot; the caller must call ``retry_done`` once the retry attempt ends."""
        if self.retries >= self.limit:
            self.refused += 1
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        self.retries = max(self.retries - 1, 0)


def backoff(k: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**k)) for the k-th retry (k = 0 for the first)."""
    return rng.uniform(0.0, min(cap, base * (2 ** min(k, 30))))


def retry_delay(err: GatewayError, k: int, base: float, cap: float, retry_after_cap: float,
                rng: random.Random) -> float | None:
    """How long to wait before retrying the same deployment after ``err``; None = do not retry it.

    ``Retry-After`` is honoured up to ``retry_after_cap``; beyond it the same deployment is not waited for (the caller
    falls back at once). Without it, jittered exponential backoff.
    """
    if not err.retryable:
        return None
    ra = err.retry_after
    if ra is not None and ra > 0:
        if ra > retry_after_cap:
            return None
        return ra + rng.uniform(0.0, min(ra * 0.1, 0.25))  # a little jitter so waiters do not return in lockstep
    return backoff(k, base, cap, rng)
