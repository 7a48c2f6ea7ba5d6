"""The per-deployment circuit breaker: pure, driven by a fake clock (nothing sleeps)."""

from __future__ import annotations

from tests.routing._helpers import FakeClock
from therouter.routing.breaker import Breaker, Window
from therouter.routing.options import BreakerPolicy

POLICY = BreakerPolicy(consecutive_failures=5, failure_ratio=0.5, ratio_window=30, ratio_min_requests=20,
                       base_ejection=5, max_ejection=60, decay=60, probe_timeout=10)


def make(policy: BreakerPolicy = POLICY) -> tuple[Breaker, FakeClock, list[str]]:
    clock = FakeClock()
    changes: list[str] = []
    return Breaker(policy, clock, changes.append), clock, changes


def test_opens_after_consecutive_failures_only() -> None:
    b, _, changes = make()
    for _ in range(4):
        b.failure()
    assert b.state == "closed" and b.available()
    b.success()  # any success resets the run
    for _ in range(4):
        b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.available() and b.acquire() is None
    assert changes == ["open"]


def test_ratio_over_window_opens() -> None:
    b, clock, _ = make()
    for i in range(20):  # alternate: never 5 in a row, but 50 % failures over 20 outcomes
        if i % 2:
            b.failure()
        else:
            b.success()
        clock.advance(0.1)
    assert b.state == "open"
    assert "of the last 20" in b.last_reason


def test_ratio_needs_volume_and_forgets_old_outcomes() -> None:
    b, clock, _ = make()
    for _ in range(4):
        b.failure()
        b.success()
    assert b.state == "closed"  # 50 % but only 8 outcomes
    for _ in range(6):
        b.failure()
        b.success()
    clock.advance(31)  # all of it has left the window
    for _ in range(4):
        b.failure()
    assert b.window.counts() == (0, 4) and b.state == "closed"


def test_half_open_lets_exactly_one_probe() -> None:
    b, clock, changes = make()
    for _ in range(5):
        b.failure()
    clock.advance(4.9)
    assert b.state == "open" and 0.09 < b.remaining() <= 0.11
    clock.advance(0.1)
    assert b.state == "half_open" and b.available()
    assert b.acquire() == "probe"
    assert b.acquire() is None and not b.available()  # the probe is in flight
    b.success(probe=True)
    assert b.state == "closed" and b.acquire() == "go"
    assert changes == ["open", "half_open", "closed"]


def test_failed_probe_reopens_for_longer_up_to_the_cap() -> None:
    b, clock, _ = make()
    for _ in range(5):
        b.failure()
    opened = []
    for _ in range(15):
        opened.append(b.open_until - clock.now)
        clock.now = b.open_until
        assert b.acquire() == "probe"
        b.failure(probe=True)
    assert opened[:4] == [5, 10, 15, 20]  # base x times ejected
    assert max(opened) == 60  # capped


def test_ejections_decay_while_healthy() -> None:
    b, clock, _ = make()
    for _ in range(5):
        b.failure()
    clock.now = b.open_until
    b.acquire()
    b.failure(probe=True)  # second ejection: 10 s
    assert b.ejections == 2
    clock.now = b.open_until
    b.acquire()
    b.success(probe=True)
    clock.advance(121)  # two decay periods closed
    for _ in range(5):
        b.failure()
    assert b.ejections == 1 and b.open_until - clock.now == 5


def test_unresolved_probe_frees_its_slot() -> None:
    b, clock, _ = make()
    for _ in range(5):
        b.failure()
    clock.advance(5)
    assert b.acquire() == "probe"
    clock.advance(9.9)
    assert b.acquire() is None
    clock.advance(0.2)  # probe_timeout passed: another request may probe
    assert b.acquire() == "probe"
    b.release_probe()
    assert b.acquire() == "probe"


def test_outcomes_of_requests_started_before_the_ejection_are_ignored() -> None:
    b, _clock, _ = make()
    for _ in range(5):
        b.failure()
    until = b.open_until
    b.failure()
    b.success()
    assert b.state == "open" and b.open_until == until


def test_reset_closes_and_forgets() -> None:
    b, _, _ = make()
    for _ in range(5):
        b.failure()
    b.reset()
    assert b.state == "closed" and b.ejections == 0 and b.consecutive == 0


def test_stream_breaks_count_toward_the_ratio_only() -> None:
    b, _clock, _ = make()
    for _ in range(10):
        b.record_window(False)
    assert b.consecutive == 0 and b.state == "closed"
    for _ in range(10):
        b.record_window(True)
        b.record_window(False)
    assert b.state == "open"


def test_window_is_bounded() -> None:
    clock = FakeClock()
    w = Window(10, clock)
    for _ in range(1000):
        w.add(True)
        clock.advance(0.37)
    assert len(w.buckets) <= 11
