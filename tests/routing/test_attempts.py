"""The attempt loop with scripted attempts, a fake clock and a sleep that only advances it."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.routing._helpers import FakeClock, router, settings
from therouter.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRequestRejected,
    UpstreamTimeout,
)
from therouter.routing.attempts import Attempt, AttemptPolicy, Exhausted, all_failed
from therouter.routing.options import BreakerPolicy, RoutingOptions
from therouter.routing.router import Candidate, Needs, Router, Skip


@dataclass
class FakeCall:
    attempts: list[Attempt] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


class Script:
    """attempt(c): pops the next outcome scripted for c.name (an exception to raise, or a value), after `cost` s."""

    def __init__(self, clock: FakeClock, outcomes: dict[str, list[Any]], cost: float = 0.01,
                 deadline: float | None = None) -> None:
        self.clock, self.outcomes, self.cost, self.deadline = clock, outcomes, cost, deadline
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, c: Candidate) -> Any:
        self.calls.append((c.name, self.clock.now))
        # like the gateway's attempts, whose timeouts are cut to the time left before the deadline
        cost = self.cost if self.deadline is None else min(self.cost, self.deadline - self.clock.now)
        self.clock.advance(cost)
        out = self.outcomes[c.name].pop(0)
        if isinstance(out, BaseException):
            raise out
        return out


def setup(models: dict[str, list[dict[str, Any]]], options: RoutingOptions | None = None
          ) -> tuple[Router, AttemptPolicy, FakeClock, list[float]]:
    clock = FakeClock()
    r = router(settings(models), options, clock)
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock.advance(s)

    return r, AttemptPolicy(r, rng=random.Random(3), sleep=sleep), clock, slept


PAIR = {"m": [{"provider": "a"}, {"provider": "b", "priority": 1}]}
SOLO = {"m": [{"provider": "a"}]}


async def run(r: Router, pol: AttemptPolicy, clock: FakeClock, script: Script, call: FakeCall | None = None,
              deadline: float = 30) -> tuple[Candidate, Any]:
    cands, skipped = r.candidates("m", Needs())
    call = call or FakeCall()
    call.skipped.extend(skipped)
    cand, result, lease = await pol.run(call, cands, script, clock.now + deadline, clock)
    lease.close()
    return cand, result


async def test_fallback_to_next_candidate_on_provider_fault() -> None:
    r, pol, clock, slept = setup(PAIR)
    call = FakeCall()
    script = Script(clock, {"a": [UpstreamError("boom", sent=True)], "b": ["ok"]})
    cand, result = await run(r, pol, clock, script, call)
    assert (cand.name, result) == ("b", "ok") and slept == []  # moving on is immediate
    assert [a.outcome.value for a in call.attempts] == ["error", "ok"]
    assert call.attempts[0].possibly_accepted and call.attempts[0].code == "upstream_error"


async def test_same_deployment_retried_after_backoff_when_nothing_else() -> None:
    r, pol, clock, slept = setup(SOLO)
    call = FakeCall()
    script = Script(clock, {"a": [UpstreamError("500 once"), "ok"]})
    _cand, result = await run(r, pol, clock, script, call)
    assert result == "ok" and len(slept) == 1 and 0 <= slept[0] <= 0.1
    assert call.attempts[1].retry is True
    assert pol.budget.retries == 0  # the retry slot was given back


async def test_client_fault_is_returned_not_retried() -> None:
    r, pol, clock, _ = setup(PAIR)
    script = Script(clock, {"a": [UpstreamRequestRejected("bad param")], "b": ["ok"]})
    with pytest.raises(UpstreamRequestRejected):
        await run(r, pol, clock, script)
    assert [c for c, _ in script.calls] == ["a"]


async def test_auth_failure_falls_back_without_retrying_the_provider() -> None:
    r, pol, clock, slept = setup(SOLO)
    script = Script(clock, {"a": [UpstreamAuthError("401", sent=True)]})
    with pytest.raises(Exhausted) as e:
        await run(r, pol, clock, script)
    assert len(script.calls) == 1 and slept == []
    err = all_failed(e.value.errors, [])
    assert err.status == 503 and "a: upstream_auth_error" in err.message


async def test_retry_after_sets_cooldown_and_is_waited_for_when_alone() -> None:
    r, pol, clock, slept = setup(SOLO)
    script = Script(clock, {"a": [UpstreamRateLimited("429", retry_after=2), "ok"]})
    _, result = await run(r, pol, clock, script)
    assert result == "ok" and 2 <= slept[0] <= 2.25
    t0, t1 = script.calls[0][1], script.calls[1][1]
    assert t1 - t0 >= 2  # never a tight loop
    assert r.state.breaker(("a", "m")).state == "closed"  # a rate limit is not an outage


async def test_retry_after_with_a_fallback_moves_on_and_cools_the_deployment_down() -> None:
    r, pol, clock, slept = setup(PAIR)
    script = Script(clock, {"a": [UpstreamRateLimited("429", retry_after=30)], "b": ["ok", "ok"]})
    cand, _ = await run(r, pol, clock, script)
    assert cand.name == "b" and slept == []
    cands, skipped = r.candidates("m", Needs())
    assert [c.name for c in cands] == ["b"] and skipped[0].reason.startswith("cooldown")
    clock.advance(30)
    assert [c.name for c in r.candidates("m", Needs())[0]] == ["a", "b"]


async def test_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    r, pol, clock, slept = setup(SOLO)
    call = FakeCall()
    script = Script(clock, {"a": [UpstreamRateLimited("429", retry_after=3600)]})
    with pytest.raises(Exhausted) as e:
        await run(r, pol, clock, script, call)
    assert slept == [] and len(script.calls) == 1
    assert any("beyond" in s.reason for s in call.skipped)
    err = all_failed(e.value.errors, call.skipped)
    assert err.status == 503 and err.retry_after == 3600  # the upstream's Retry-After is passed on


async def test_attempts_are_bounded_and_backoff_grows() -> None:
    r, pol, clock, slept = setup(SOLO, RoutingOptions(max_attempts=3))
    script = Script(clock, {"a": [UpstreamError("x")] * 5})
    with pytest.raises(Exhausted) as e:
        await run(r, pol, clock, script)
    assert len(script.calls) == 3 and len(e.value.errors) == 3 and len(slept) == 2
    assert slept[0] <= 0.1 and slept[1] <= 0.2


async def test_everything_fits_inside_the_deadline() -> None:
    r, pol, clock, _slept = setup(SOLO, RoutingOptions(max_attempts=10, backoff_base=1, backoff_max=4))
    start = clock.now
    script = Script(clock, {"a": [UpstreamTimeout("slow")] * 10}, cost=1.0, deadline=start + 3.5)
    with pytest.raises(Exhausted):
        await run(r, pol, clock, script, deadline=3.5)
    assert clock.now - start <= 3.5 and len(script.calls) >= 2
    assert all(t < start + 3.5 for _, t in script.calls)


async def test_retry_budget_bounds_concurrent_retries() -> None:
    r, pol, clock, _ = setup(SOLO, RoutingOptions(budget_min=2, budget_percent=0.0))
    pol.budget.retries = 2  # two retries already in flight elsewhere
    call = FakeCall()
    script = Script(clock, {"a": [UpstreamError("x"), "ok"]})
    with pytest.raises(Exhausted):
        await run(r, pol, clock, script, call)
    assert len(script.calls) == 1 and call.skipped[-1].reason == "retry budget exhausted"
    assert pol.budget.refused == 1


async def test_breaker_fed_by_attempts_and_probe_closes_it() -> None:
    opts = RoutingOptions(breaker=BreakerPolicy(consecutive_failures=2, base_ejection=5))
    r, pol, clock, _ = setup(PAIR, opts)
    script = Script(clock, {"a": [UpstreamConnectError("refused")] * 2 + ["ok"], "b": ["ok"] * 5})
    for _ in range(2):
        assert (await run(r, pol, clock, script))[0].name == "b"
    assert r.state.breaker(("a", "m")).state == "open"
    assert (await run(r, pol, clock, script))[0].name == "b"
    assert [c for c, _ in script.calls].count("a") == 2  # skipped while open: no attempt
    clock.advance(5)
    call = FakeCall()
    cand, _ = await run(r, pol, clock, script, call)
    assert cand.name == "a" and call.attempts[0].probe is True
    assert r.state.breaker(("a", "m")).state == "closed"


async def test_cancelled_attempt_frees_slot_and_probe() -> None:
    opts = RoutingOptions(breaker=BreakerPolicy(consecutive_failures=1, base_ejection=1))
    r, pol, clock, _ = setup(PAIR, opts)
    r.state.breaker(("a", "m")).failure()
    clock.advance(1)
    script = Script(clock, {"a": [asyncio.CancelledError()]})
    with pytest.raises(asyncio.CancelledError):
        await run(r, pol, clock, script)
    assert r.state.stats(("a", "m")).in_flight == 0
    assert r.state.breaker(("a", "m")).acquire() == "probe"  # the probe slot was released


def test_all_failed_shapes() -> None:
    c = Candidate("m", None, type("P", (), {"name": "a"})())  # type: ignore[arg-type]
    assert all_failed([(c, UpstreamTimeout("t"))], []).status == 504
    assert all_failed([(c, UpstreamError("e")), (c, UpstreamTimeout("t"))], []).status == 502
    none = all_failed([], [Skip("a", "circuit open", "m", 7.5), Skip("b", "drained", "m")], "m")
    assert none.status == 503 and none.retry_after == 7.5
    assert "a: circuit open" in none.message and "b: drained" in none.message
    assert isinstance(none, GatewayError)


async def test_last_usable_deployment_is_tried_without_growing_its_ejection() -> None:
    opts = RoutingOptions(max_attempts=1, breaker=BreakerPolicy(consecutive_failures=1, base_ejection=5))
    r, pol, clock, _ = setup(SOLO, opts)
    b = r.state.breaker(("a", "m"))
    b.failure()
    assert b.state == "open" and b.ejections == 1
    script = Script(clock, {"a": [UpstreamError("still down"), UpstreamError("still down"), "ok"]})
    for _ in range(2):
        with pytest.raises(Exhausted):
            await run(r, pol, clock, script)
    assert len(script.calls) == 2 and b.ejections == 1  # tried (nowhere else to go), but not ejected for longer
    cand, _ = await run(r, pol, clock, script)
    assert cand.forced and b.state == "closed"  # a success while open is evidence enough
