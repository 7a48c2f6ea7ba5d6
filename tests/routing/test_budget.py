"""Retry budget and backoff bounds (pure; the RNG is seeded, nothing sleeps)."""

from __future__ import annotations

import random

import pytest

from therouter.errors import InvalidRequest, UpstreamAuthError, UpstreamError, UpstreamRateLimited
from therouter.routing.budget import RetryBudget, backoff, retry_delay


def test_budget_minimum_and_percent() -> None:
    b = RetryBudget(0.2, 3)
    assert b.limit == 3  # a quiet gateway can still retry
    for _ in range(50):
        b.enter()
    assert b.limit == 10
    got = [b.try_retry() for _ in range(12)]
    assert got == [True] * 10 + [False] * 2 and b.refused == 2
    b.retry_done()
    assert b.try_retry()
    for _ in range(60):
        b.leave()
    assert b.requests == 0 and b.limit == 3


@pytest.mark.parametrize("k", range(8))
def test_backoff_full_jitter_bounds(k: int) -> None:
    rng = random.Random(k)
    cap = min(2.0, 0.1 * 2**k)
    samples = [backoff(k, 0.1, 2.0, rng) for _ in range(500)]
    assert all(0 <= s <= cap for s in samples)
    assert max(samples) > cap * 0.8 and min(samples) < cap * 0.2  # spread over the whole range


def test_retry_delay_follows_the_error() -> None:
    rng = random.Random(1)
    assert retry_delay(InvalidRequest("x"), 0, 0.1, 2, 10, rng) is None  # not retryable
    assert retry_delay(UpstreamAuthError("x"), 0, 0.1, 2, 10, rng) is None  # fall back, never retry
    d = retry_delay(UpstreamError("x"), 0, 0.1, 2, 10, rng)
    assert d is not None and 0 <= d <= 0.1
    ra = retry_delay(UpstreamRateLimited("x", retry_after=3), 0, 0.1, 2, 10, rng)
    assert ra is not None and 3 <= ra <= 3.25  # Retry-After honoured (a little jitter, never less)
    assert retry_delay(UpstreamRateLimited("x", retry_after=3600), 0, 0.1, 2, 10, rng) is None  # beyond the cap
