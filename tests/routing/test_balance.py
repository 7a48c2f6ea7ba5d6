"""Load-balancing arithmetic: weighted order, in-flight discount, rendezvous affinity, prompt prefixes."""

from __future__ import annotations

import random
from collections import Counter

from therouter.routing.balance import load_weight, prompt_prefix, rendezvous, weighted_order


def test_weighted_order_first_pick_follows_weights() -> None:
    rng = random.Random(42)
    w = {"a": 3, "b": 1, "c": 0}
    firsts = Counter(weighted_order(list(w), w.__getitem__, rng)[0] for _ in range(4000))
    assert firsts["c"] == 0
    assert abs(firsts["a"] / 4000 - 0.75) < 0.03


def test_weighted_order_is_a_permutation_with_zero_weights_last() -> None:
    rng = random.Random(1)
    for _ in range(100):
        out = weighted_order(["a", "b", "z1", "c", "z2"], lambda x: 0 if x.startswith("z") else 1, rng)
        assert sorted(out) == ["a", "b", "c", "z1", "z2"] and out[3:] == ["z1", "z2"]


def test_load_weight_keeps_ratios_when_load_is_proportional() -> None:
    assert load_weight(0, 0) == 0 and load_weight(2, 0) == 2
    # 3:1 weights with 3:1 in flight: ratio unchanged
    assert abs(load_weight(3, 30) / load_weight(1, 10) - 3) < 1e-9
    # equal weights, one busier: the busier gets less
    assert load_weight(1, 5) < load_weight(1, 0)


def test_rendezvous_is_sticky_and_spreads() -> None:
    replicas = ["r1", "r2", "r3"]
    owners = Counter()
    for i in range(3000):
        prefix = f"system prompt number {i}"
        o = rendezvous(prefix, replicas, str, lambda _: 1.0)
        assert o == rendezvous(prefix, list(reversed(replicas)), str, lambda _: 1.0)  # order-independent
        owners[o] += 1
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in owners.values())


def test_rendezvous_moves_only_the_departed_replicas_share() -> None:
    replicas = ["r1", "r2", "r3", "r4"]
    before = {i: rendezvous(str(i), replicas, str, lambda _: 1.0) for i in range(2000)}
    after = {i: rendezvous(str(i), replicas[:3], str, lambda _: 1.0) for i in range(2000)}
    moved = [i for i in before if before[i] != after[i]]
    assert all(before[i] == "r4" for i in moved)


def test_rendezvous_weighted_and_zero() -> None:
    w = {"big": 3.0, "small": 1.0, "off": 0.0}
    owners = Counter(rendezvous(str(i), list(w), str, w.__getitem__) for i in range(4000))
    assert owners["off"] == 0 and abs(owners["big"] / 4000 - 0.75) < 0.03
    assert rendezvous("x", ["off"], str, w.__getitem__) is None


def test_prompt_prefix() -> None:
    body = {"messages": [{"role": "system", "content": "S" * 10},
                         {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url"}]},
                         {"role": "user", "content": "later"}]}
    assert prompt_prefix(body, 1000) == "system:" + "S" * 10 + "\nuser:hello\nuser:later\n"
    assert prompt_prefix(body, 8) == "system:S"
    assert prompt_prefix({"prompt": ["abc", "def"]}, 2) == "ab"
    assert prompt_prefix({"prompt": "abcdef"}, 100) == "abcdef"
