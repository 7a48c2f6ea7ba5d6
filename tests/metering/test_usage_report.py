"""Usage reports (GET /admin/usage, `therouter usage`) and key details (GET /admin/keys/{id}) against the real store,
single node and cluster: grouped by key / model / provider / day from the counters settlement writes, key names
included, spend per period and when a key was last used."""

from __future__ import annotations

import time

import pytest

from tests.metering._helpers import FakeClock, gen, record
from therouter.keys import KeyRecord
from therouter.metering import Meter
from therouter.metering.usage import usage_query
from therouter.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop


async def _settle(meter: Meter, key: KeyRecord, model: str, provider: str, prompt: int, completion: int) -> int:
    g = gen()
    rec = record(g, prompt=prompt, completion=completion)
    rec.provider = provider
    return await meter.settle(await meter.admit(key, model, 1, 0, g), rec)


async def _traffic(meter: Meter, store: Store, clock: FakeClock) -> tuple[KeyRecord, KeyRecord]:
    _, alice = await store.create_key("alice")
    _, bob = await store.create_key("bob", budget_nano=10**9)
    # 2025-01-31 (UTC); prices per token: qwen 100 / 200 nano, deepseek-chat 280 / 420 nano (input / output)
    assert await _settle(meter, alice, "qwen", "local", 1000, 100) == 120_000
    assert await _settle(meter, alice, "deepseek-chat", "deepseek", 100, 10) == 32_200
    assert await _settle(meter, bob, "qwen", "local", 5, 5) == 1_500
    assert await _settle(meter, bob, "qwen", "", 0, 0) == 0  # failed before any attempt: no provider
    clock.advance(120)  # 2025-02-01
    assert await _settle(meter, alice, "qwen", "local", 7, 3) == 1_300
    return alice, bob


async def test_usage_grouped_by_key_provider_and_day(meter: Meter, store: Store, clock: FakeClock) -> None:
    alice, bob = await _traffic(meter, store, clock)
    both = {"first": "2025-01-31", "last": "2025-02-01"}

    by_key = await meter.reports.usage(usage_query("key", both["first"], both["last"], clock()))
    assert (by_key["from"], by_key["to"], by_key["group_by"]) == ("2025-01-31", "2025-02-01", ["key"])
    assert [(r["key_id"], r["key_name"], r["requests"], r["prompt_tokens"], r["cost_nano"], r["cost_usd"])
            for r in by_key["data"]] == [(alice.id, "alice", 3, 1107, 153_500, "0.0001535"),
                                         (bob.id, "bob", 2, 5, 1_500, "0.0000015")]  # dearest first
    assert (by_key["total"]["requests"], by_key["total"]["cost_nano"]) == (5, 155_000)

    by_provider = await meter.reports.usage(usage_query("provider", both["first"], both["last"], clock()))
    assert {r["provider"]: (r["requests"], r["cost_nano"]) for r in by_provider["data"]} == {
        "local": (3, 122_800), "deepseek": (1, 32_200), None: (1, 0)}

    by_day = await meter.reports.usage(usage_query("day", both["first"], both["last"], clock()))
    assert [(r["day"], r["requests"], r["cost_nano"]) for r in by_day["data"]] == [
        ("2025-02-01", 1, 1_300), ("2025-01-31", 4, 153_700)]  # newest first

    one = await meter.reports.usage(usage_query("key,model,day", "2025-01-31", "2025-01-31", clock(),
                                                key_id=alice.id))
    assert sorted((r["key_name"], r["model"], r["day"], r["cost_nano"]) for r in one["data"]) == [
        ("alice", "deepseek-chat", "2025-01-31", 32_200), ("alice", "qwen", "2025-01-31", 120_000)]
    default = await meter.reports.usage(usage_query(None, None, None, clock(), days=1))  # today only
    assert [(r["key_id"], r["model"], r["day"]) for r in default["data"]] == [(alice.id, "qwen", "2025-02-01")]


async def test_provider_counters_are_rebuilt_from_the_records(meter: Meter, store: Store, clock: FakeClock) -> None:
    alice, _ = await _traffic(meter, store, clock)
    await store.redis.hincrby(meter.layout.byprov(alice.id, "20250131"), "local|cost", 7)  # damaged
    report = await meter.rebuild_totals(alice.id)
    assert report["match"] is False and report["after"]["byprov:20250131"]["local|cost"] == 120_000
    assert (await meter.rebuild_totals(alice.id))["match"] is True


async def test_key_detail_spend_per_period_and_last_used(meter: Meter, store: Store, clock: FakeClock) -> None:
    _, key = await store.create_key("detail", budget_nano=10**9, budget_period="month", rpm=60)
    _, idle = await store.create_key("idle")
    before = int(time.time())
    await _settle(meter, key, "qwen", "local", 1000, 100)  # 2025-01-31
    clock.advance(120)  # 2025-02-01: a new day and a new month
    await _settle(meter, key, "qwen", "local", 7, 3)
    after = int(time.time()) + 1
    d = await meter.reports.key_detail(key)
    assert d["spend"]["total"] == {"cost_nano": 121_300, "cost_usd": "0.0001213", "requests": 2,
                                   "tokens": {"prompt": 1007, "completion": 103, "cached": 0, "reasoning": 0}}
    assert (d["spend"]["day"]["period"], d["spend"]["day"]["cost_nano"]) == ("2025-02-01", 1_300)
    assert (d["spend"]["month"]["period"], d["spend"]["month"]["cost_nano"]) == ("2025-02", 1_300)
    assert (d["budget_period"], d["spend_nano"], d["limits"]["rpm"]) == ("month", 1_300, 60)
    assert before <= d["last_used_at"] <= after  # when its last request was settled (no write on the hot path)
    assert (await meter.reports.key_detail(idle))["last_used_at"] is None
    assert await meter.reports.last_used([key.id, idle.id]) == {key.id: d["last_used_at"], idle.id: None}
