"""The sliding-window-counter rule, OpenAI-style durations, and the in-process fail-open limiter (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from therouter.metering.ratelimit import WINDOW_MS, LocalLimiter, decide, duration, headers, retry_after_seconds


def test_fresh_window_admits_exactly_the_limit() -> None:
    curr, admitted = 0, 0
    for _ in range(200):
        d = decide(0, curr, 500, 60, 1)
        if d.allowed:
            curr, admitted = curr + 1, admitted + 1
    assert admitted == 60
    assert decide(0, 60, 500, 60, 1).remaining == 0


def test_retry_after_is_exact() -> None:
    # a full previous window slides out: one more request fits once 1/60 of it has gone
    assert decide(60, 0, 0, 60, 1).retry_ms == 1000
    # a full current window: wait for the next window, then for 1/60 of this one to slide out
    assert decide(0, 60, 30_000, 60, 1).retry_ms == 31_000
    # bigger than the limit itself: never
    d = decide(0, 0, 0, 10, 11)
    assert not d.allowed and d.retry_ms == -1 and retry_after_seconds(d.retry_ms) == 60


def _load(events: list[tuple[int, int]], t: int) -> tuple[int, int, int]:
    """(prev, curr, elapsed) at time t from admitted (time, cost) events."""
    window, elapsed = divmod(t, WINDOW_MS)
    prev = sum(c for at, c in events if at // WINDOW_MS == window - 1)
    curr = sum(c for at, c in events if at // WINDOW_MS == window)
    return prev, curr, elapsed


@given(st.lists(st.tuples(st.integers(0, 5_000), st.integers(1, 30)), min_size=1, max_size=60),
       st.integers(10, 100))
def test_retry_after_is_when_the_request_would_pass(arrivals: list[tuple[int, int]], limit: int) -> None:
    events: list[tuple[int, int]] = []
    t = 0
    for gap, cost in arrivals:
        t += gap * 37
        prev, curr, e = _load(events, t)
        d = decide(prev, curr, e, limit, cost)
        if d.allowed:
            events.append((t, cost))
        elif d.retry_ms > 0:
            later = t + d.retry_ms
            prev, curr, e = _load(events, later)
            assert decide(prev, curr, e, limit, cost).allowed
            prev, curr, e = _load(events, later - 1)
            assert not decide(prev, curr, e, limit, cost).allowed


def test_durations_follow_openai() -> None:
    assert [duration(ms) for ms in (0, 17, 1000, 1001, 59_000, 360_000, 3_723_000)] == [
        "0s", "17ms", "1s", "2s", "59s", "6m0s", "1h2m3s"]


def test_headers_only_for_limited_dimensions() -> None:
    d = decide(0, 0, 0, 60, 1)
    assert headers(d, None) == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                                "x-ratelimit-reset-requests": "2m0s"}
    assert headers(None, None) == {}


def test_local_limiter_shares_the_limit_and_is_all_or_nothing() -> None:
    lim = LocalLimiter(divisor=2)
    now = 10 * WINDOW_MS
    results = [lim.check("k", now, 10, None, 1)[0] for _ in range(8)]
    assert [r.allowed for r in results if r] == [True] * 5 + [False] * 3  # 10 // 2 per process
    # a token refusal does not count the request
    lim2 = LocalLimiter()
    r, t = lim2.check("k", now, 2, 100, 150)
    assert r and t and r.allowed and not t.allowed
    r, t = lim2.check("k", now, 2, 100, 50)
    assert r and t and r.allowed and t.allowed and r.remaining == 1
    # the next minute starts from the previous one, weighted
    r, _ = lim2.check("k", now + WINDOW_MS + WINDOW_MS // 2, 2, None, 1)
    assert r is not None and r.allowed
