"""Candidate selection and order: filters with reasons, priority, weights (seeded RNG), in-flight, affinity,
drains / cooldowns / circuits, and the request's preferences."""

from __future__ import annotations

from collections import Counter

from tests.routing._helpers import FakeClock, router, settings
from therouter.routing.options import BreakerPolicy, RoutingOptions
from therouter.routing.preferences import Preferences
from therouter.routing.router import Needs

HOSTED = {"ds": "deepseek", "oa": "openai"}


def names(cands: list) -> list[str]:
    return [c.name for c in cands]


def test_priority_then_reasons_for_skips() -> None:
    s = settings({"m": [
        {"provider": "ds", "priority": 0, "capabilities": ["tools"]},
        {"provider": "v1", "priority": 1, "capabilities": ["tools", "json_schema"], "context_length": 2000},
        {"provider": "v2", "priority": 2},
    ]}, {"ds": "deepseek", "v1": "vllm", "v2": "vllm"})
    r = router(s)
    cands, skipped = r.candidates("m", Needs())
    assert names(cands) == ["ds", "v1", "v2"] and skipped == []
    cands, skipped = r.candidates("m", Needs(tools=True, tokens=3000))
    assert names(cands) == ["ds"]
    assert {(x.provider, x.reason) for x in skipped} == {("v1", "context too small: 2000 tokens"),
                                                          ("v2", "missing capability: tools")}


def test_weights_split_load_within_tolerance() -> None:
    s = settings({"m": [{"provider": "a", "weight": 3}, {"provider": "b", "weight": 1},
                        {"provider": "c", "weight": 0}]})
    r = router(s, seed=123)
    firsts = Counter(r.candidates("m", Needs())[0][0].name for _ in range(4000))
    assert firsts["c"] == 0 and abs(firsts["a"] / 4000 - 0.75) < 0.03
    assert names(r.candidates("m", Needs())[0])[-1] == "c"  # weight 0: only when nothing else is left


def test_in_flight_shifts_new_work_to_the_idle_replica() -> None:
    s = settings({"m": [{"provider": "a"}, {"provider": "b"}]})
    r = router(s, seed=5)
    leases = [r.state.begin(("a", "m")) for _ in range(9)]
    firsts = Counter(r.candidates("m", Needs())[0][0].name for _ in range(2000))
    assert firsts["b"] / 2000 > 0.85  # weight 1 each; a has 9 in flight: 1/10 vs 1
    for lease in leases:
        lease.close()
    assert r.state.stats(("a", "m")).in_flight == 0


def test_prefix_affinity_keeps_a_prefix_on_one_replica_while_load_allows() -> None:
    s = settings({"m": [{"provider": "r1"}, {"provider": "r2"}, {"provider": "r3"}]})
    r = router(s, RoutingOptions(prefix_affinity=("m",), affinity_max_imbalance=4))
    owner = {p: r.candidates("m", Needs(), prefix=p)[0][0].name for p in ("sys-A", "sys-B", "sys-C", "sys-D")}
    for _ in range(50):
        for p, o in owner.items():
            assert r.candidates("m", Needs(), prefix=p)[0][0].name == o
    assert len(set(owner.values())) > 1  # different prefixes spread
    busy = owner["sys-A"]
    leases = [r.state.begin((busy, "m")) for _ in range(5)]  # 5 more in flight than the idlest: over the limit
    assert r.candidates("m", Needs(), prefix="sys-A")[0][0].name != busy  # busy: spread by load instead
    for lease in leases:
        lease.close()
    assert r.candidates("m", Needs(), prefix="sys-A")[0][0].name == busy


def test_affinity_is_opt_in_and_ignores_hosted() -> None:
    s = settings({"m": [{"provider": "r1"}, {"provider": "r2"}]})
    r = router(s)
    firsts = Counter(r.candidates("m", Needs(), prefix="same")[0][0].name for _ in range(400))
    assert len(firsts) == 2  # off by default: weighted spread
    s2 = settings({"m": [{"provider": "ds"}, {"provider": "r1"}]}, {"ds": "deepseek", "r1": "vllm"})
    r2 = router(s2, RoutingOptions(prefix_affinity=("*",)))
    firsts = Counter(r2.candidates("m", Needs(), prefix="same")[0][0].name for _ in range(400))
    assert len(firsts) == 2  # only one self-hosted replica: nothing to be sticky between


def test_drain_cooldown_and_circuit_are_skipped_with_reasons() -> None:
    clock = FakeClock()
    s = settings({"m": [{"provider": "a", "priority": 0}, {"provider": "b", "priority": 1},
                        {"provider": "c", "priority": 2}, {"provider": "d", "priority": 3}]})
    r = router(s, RoutingOptions(breaker=BreakerPolicy(consecutive_failures=1, base_ejection=5)), clock)
    r.state.set_drained("a", True)
    r.state.set_cooldown(("b", "m"), 2.0)
    r.state.breaker(("c", "m")).failure()
    cands, skipped = r.candidates("m", Needs())
    assert names(cands) == ["d"]
    reasons = {x.provider: x.reason for x in skipped}
    assert reasons["a"] == "drained"
    assert reasons["b"].startswith("cooldown") and "2.0s left" in reasons["b"]
    assert reasons["c"].startswith("circuit open") and "next probe in 5.0s" in reasons["c"]
    clock.advance(5)
    r.state.set_drained("a", False)
    assert names(r.candidates("m", Needs())[0]) == ["a", "b", "c", "d"]  # cooldown over, c half-open


def test_last_usable_deployment_is_not_ejected_for_nothing() -> None:
    clock = FakeClock()
    s = settings({"solo": [{"provider": "a"}], "pair": [{"provider": "a"}, {"provider": "b", "priority": 1}]})
    r = router(s, RoutingOptions(breaker=BreakerPolicy(consecutive_failures=1)), clock)
    r.state.breaker(("a", "m")).failure()
    cands, skipped = r.candidates("solo", Needs())
    assert names(cands) == ["a"] and cands[0].forced and skipped == []
    cands, _ = r.candidates("pair", Needs())
    assert names(cands) == ["b"]  # with somewhere else to go, the open circuit is honoured
    r.state.breaker(("b", "m")).failure()
    cands, skipped = r.candidates("pair", Needs())
    assert cands == [] and {x.provider for x in skipped} == {"a", "b"}  # all open: fail fast
    assert all(x.retry_in and x.retry_in > 0 for x in skipped)


def test_preferences_order_only_ignore_allow_fallbacks() -> None:
    s = settings({"m": [{"provider": "a", "priority": 0}, {"provider": "b", "priority": 1},
                        {"provider": "c", "priority": 2}]})
    r = router(s)
    assert names(r.candidates("m", Needs(), Preferences(order=("c", "b")))[0]) == ["c", "b", "a"]
    assert names(r.candidates("m", Needs(), Preferences(only=frozenset({"b", "c"})))[0]) == ["b", "c"]
    cands, skipped = r.candidates("m", Needs(), Preferences(ignore=frozenset({"a"})))
    assert names(cands) == ["b", "c"] and skipped[0].reason == "ignored by request"
    assert names(r.candidates("m", Needs(), Preferences(order=("c",), allow_fallbacks=False))[0]) == ["c"]
    cands, skipped = r.candidates("m", Needs(), Preferences(allow_fallbacks=False))
    assert names(cands) == ["a"] and {x.provider for x in skipped} == {"b", "c"}


def test_sort_by_measured_latency_and_throughput() -> None:
    s = settings({"m": [{"provider": "a", "priority": 0}, {"provider": "b", "priority": 1},
                        {"provider": "c", "priority": 2}]})
    r = router(s)
    r.state.observe(("a", "m"), True, 0.9, stream=True)
    r.state.observe(("b", "m"), True, 0.2, stream=True)
    r.state.observe_throughput(("a", "m"), 500, 1.0)
    r.state.observe_throughput(("c", "m"), 100, 1.0)
    assert names(r.candidates("m", Needs(stream=True), Preferences(sort="latency"))[0]) == ["b", "a", "c"]
    assert names(r.candidates("m", Needs(), Preferences(sort="throughput"))[0]) == ["a", "c", "b"]
    assert names(r.candidates("m", Needs(), Preferences(sort="price"))[0]) == ["a", "b", "c"]  # one price per model


def test_require_parameters_refuses_the_json_schema_downgrade() -> None:
    s = settings({"m": [{"provider": "a", "capabilities": ["json_object"]},
                        {"provider": "b", "priority": 1, "capabilities": ["json_schema"]}]})
    r = router(s)
    assert names(r.candidates("m", Needs(json_schema=True))[0]) == ["a", "b"]
    cands, skipped = r.candidates("m", Needs(json_schema=True), Preferences(require_parameters=True))
    assert names(cands) == ["b"] and "require_parameters" in skipped[0].reason


def test_sort_price_orders_by_what_each_deployment_costs_the_operator() -> None:
    s = settings({"m": [
        {"provider": "ds", "priority": 0, "cost": {"input": 0.5, "output": 1.5}},
        {"provider": "v1", "priority": 1, "cost": {"input": 0, "output": 0}},  # own GPUs
        {"provider": "v2", "priority": 2},  # no cost given: the model's price, after the cheaper ones
    ]}, {"ds": "deepseek", "v1": "vllm", "v2": "vllm"})
    r = router(s)
    cands, _ = r.candidates("m", Needs(), Preferences(sort="price"))
    assert names(cands) == ["v1", "ds", "v2"]
    cands, _ = r.candidates("m", Needs())
    assert names(cands) == ["ds", "v1", "v2"]  # without the preference: priority
