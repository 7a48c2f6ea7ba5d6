"""Settlement against the real Redis: exactly once, records, reports, rebuild from records, TTLs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.metering._helpers import FakeClock, gen, record, record_sends, settle_failed
from tests.metering.conftest import Backend
from therouter.config import Settings
from therouter.errors import BudgetExceeded, RateLimited
from therouter.keys import KeyRecord
from therouter.metering import Meter, MeterOptions
from therouter.metering import meter as meter_module
from therouter.protocol.usage import Usage
from therouter.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop

MakeKey = Callable[..., KeyRecord]


async def test_settle_three_times_concurrently_and_again_counts_once(meter: Meter, make_key: MakeKey) -> None:
    key = make_key(budget_nano=10**9, tpm=100_000)
    g = gen()
    adm = await meter.admit(key, "deepseek-chat", 1000, 1000, g)
    rec = record(g, prompt=1200, completion=300, cached=1024, reasoning=250)
    costs = await asyncio.gather(*(meter.settle(adm, rec) for _ in range(3)))
    costs.append(await meter.settle(adm, rec))  # e.g. a retry after a timeout
    assert costs == [203_952] * 4
    s = await meter.key_summary(key)
    assert (s["requests"], s["total_spend_nano"], s["reserved_nano"]) == (1, 203_952, 0)
    assert s["tokens"] == {"prompt": 1200, "completion": 300, "cached": 1024, "reasoning": 250}
    r = meter.store.redis
    assert await r.xlen(meter.layout.stream(key.id)) == 1
    assert await r.xlen(meter.layout.feed()) == 1


async def test_generation_record_is_readable_by_id(meter: Meter, make_key: MakeKey) -> None:
    key = make_key()
    g = gen()
    adm = await meter.admit(key, "deepseek-chat", 100, 300, g)
    rec = record(g, prompt=1200, completion=300, cached=1024, reasoning=250, stream=True)
    rec.usage.estimated = True
    rec.outcome = "upstream_cut"
    rec.skipped = [{"provider": "local", "reason": "breaker_open"}]
    await meter.settle(adm, rec)
    got = await meter.generation(g)
    assert got is not None
    assert (got["id"], got["key_id"], got["model"], got["outcome"], got["stream"], got["ttft_ms"]) == (
        g, key.id, "deepseek-chat", "upstream_cut", True, 40)
    assert (got["cost_nano"], got["cost_usd"], got["price_version"]) == (203_952, "0.000203952", 1)
    assert got["usage"] == {
        "prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 250},
        "estimated": True,
    }
    assert got["attempts"][0]["provider"] == "deepseek" and got["skipped"] == rec.skipped
    assert await meter.generation("gen-unknown") is None


async def test_settle_survives_the_callers_cancellation(meter: Meter, make_key: MakeKey) -> None:
    key = make_key()
    g = gen()
    adm = await meter.admit(key, "qwen", 100, 100, g)
    task = asyncio.ensure_future(meter.settle(adm, record(g)))
    await asyncio.sleep(0)  # the settle task has started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await meter.aclose()  # waits for in-flight settlements
    assert (await meter.key_summary(key))["requests"] == 1


async def test_usage_rows_per_key_model_and_day(meter: Meter, make_key: MakeKey, clock: FakeClock) -> None:
    k1, k2 = make_key(), make_key()
    for key, model, p, c in ((k1, "qwen", 1000, 100), (k1, "qwen", 10, 1), (k1, "deepseek-chat", 100, 10),
                             (k2, "qwen", 5, 5)):
        g = gen()
        await meter.settle(await meter.admit(key, model, 1, 0, g), record(g, prompt=p, completion=c))
    clock.advance(120)  # the next UTC day
    g = gen()
    await meter.settle(await meter.admit(k1, "qwen", 1, 0, g), record(g, prompt=7, completion=3))
    rows = await meter.usage_rows(days=2)
    got = [(r["key_id"], r["model"], r["day"], r["requests"], r["prompt_tokens"], r["cost_nano"]) for r in rows]
    assert sorted(got) == sorted([
        (k1.id, "qwen", "2025-02-01", 1, 7, 7 * 100 + 3 * 200),
        (k1.id, "deepseek-chat", "2025-01-31", 1, 100, 100 * 280 + 10 * 420),
        (k1.id, "qwen", "2025-01-31", 2, 1010, 1010 * 100 + 101 * 200),
        (k2.id, "qwen", "2025-01-31", 1, 5, 5 * 100 + 5 * 200),
    ])
    assert [r["day"] for r in await meter.usage_rows(k1.id, days=1)] == ["2025-02-01"]
    assert {r["cost_usd"] for r in rows if r["key_id"] == k2.id} == {"0.0000015"}


async def test_key_summary(meter: Meter, make_key: MakeKey) -> None:
    key = make_key(budget_nano=5 * 10**9, budget_period="day", rpm=100, tpm=10_000)
    g = gen()
    await meter.settle(await meter.admit(key, "qwen", 10, 1000, g), record(g, prompt=1000, completion=1000))
    await meter.admit(key, "qwen", 10, 10, gen())
    s = await meter.key_summary(key)
    assert s["limits"] == {"rpm": 100, "tpm": 10_000, "models": {}}
    assert (s["period"], s["period_label"], s["spend_nano"], s["spend_usd"]) == (
        "d:20250131", "day 2025-01-31 (UTC)", 300_000, "0.0003")
    assert s["reserved_nano"] == 10 * 100 + 10 * 200
    assert s["budget_left_nano"] == 5 * 10**9 - 300_000 - 3000 and s["budget_usd"] == "5.00"
    assert (s["requests"], s["period_requests"]) == (1, 1)


async def test_counters_equal_the_sum_of_records_and_rebuild(meter: Meter, make_key: MakeKey,
                                                             clock: FakeClock) -> None:
    rnd = random.Random(7)
    key = make_key(budget_nano=10**12)
    expected = 0
    for i in range(40):
        g = gen()
        adm = await meter.admit(key, rnd.choice(["qwen", "deepseek-chat"]), 100, 2000, g)
        p = rnd.randint(0, 5000)
        usage = Usage(prompt_tokens=p, completion_tokens=rnd.randint(0, 2000), cached_tokens=rnd.randint(0, p),
                      reasoning_tokens=0)
        rec = record(g)
        rec.usage = usage
        expected += await meter.settle(adm, rec)
        if i == 20:
            clock.advance(3600)  # spread over two days and two months
    report = await meter.rebuild_totals(key.id)
    assert (report["records"], report["complete"], report["match"], report["written"]) == (40, True, True, True)
    assert report["after"]["per:total"]["cost"] == expected == (await meter.key_summary(key))["total_spend_nano"]
    assert {"per:d:20250131", "per:d:20250201", "per:m:202501", "per:m:202502"} <= set(report["after"])

    # a damaged counter is found and repaired from the records
    await meter.store.redis.hincrby(meter.layout.per(key.id, "total"), "cost", 5)
    await meter.store.redis.hincrby(meter.layout.bymodel(key.id, "20250131"), "qwen|requests", -1)
    fixed = await meter.rebuild_totals(key.id)
    assert (fixed["match"], fixed["written"]) == (False, True)
    assert (await meter.rebuild_totals(key.id))["match"] is True
    assert (await meter.key_summary(key))["total_spend_nano"] == expected


async def test_every_counter_and_reservation_key_has_a_ttl(meter: Meter, make_key: MakeKey,
                                                           clock: FakeClock) -> None:
    keys = [make_key(budget_nano=3 * 10**6, budget_period=p, rpm=5, tpm=5000) for p in ("total", "day", "month")]
    keys.append(make_key())
    rnd = random.Random(3)
    for _ in range(120):
        key = rnd.choice(keys)
        g = gen()
        try:
            adm = await meter.admit(key, "deepseek-chat", rnd.randint(1, 900), rnd.randint(1, 900), g)
        except (BudgetExceeded, RateLimited):
            continue
        action = rnd.random()
        if action < 0.5:
            await meter.settle(adm, record(g, prompt=rnd.randint(0, 900), completion=rnd.randint(0, 900)))
        elif action < 0.8:
            await settle_failed(meter, adm)
        # else: left in flight (the client vanished)
        clock.advance(rnd.randint(0, 30))
    prefix = meter.store.prefix
    # permanent by design: per-key totals and record streams, the global feed and key index, the price table
    permanent = (":per:total", ":usage")
    global_permanent = (prefix + "usage", prefix + "meter:keys", prefix + "price:", prefix + "pricehist:")
    seen, no_ttl = [], []
    async for k in meter.store.redis.scan_iter(match=prefix + "*", count=500):
        seen.append(k)
        if await meter.store.redis.ttl(k) == -1 and not (k.endswith(permanent) or k.startswith(global_permanent)):
            no_ttl.append(k)
    assert no_ttl == []
    for part in (":rl:r:", ":rl:t:", ":resv", ":resvexp", ":settled:", ":gen:", ":per:d:", ":per:m:", ":bymodel:",
                 ":byprov:"):
        assert any(part in k for k in seen), part


async def test_generation_by_request_id_is_per_key_and_expires_with_the_record(meter: Meter,
                                                                               make_key: MakeKey) -> None:
    k1, k2 = make_key(), make_key()
    found = {}
    for key in (k1, k2):  # two keys, one request id
        g = gen()
        rec = record(g)
        rec.request_id = "req-shared"
        await meter.settle(await meter.admit(key, "qwen", 10, 10, g), rec)
        found[key.id] = g
    for key in (k1, k2):
        got = await meter.generation_by_request("req-shared", key.id)
        assert got is not None and (got["id"], got["key_id"], got["request_id"]) == (found[key.id], key.id,
                                                                                     "req-shared")
    r, lay = meter.store.redis, meter.layout
    assert 0 < await r.ttl(lay.rid(k1.id, "req-shared")) <= meter.options.record_ttl
    assert await r.ttl(lay.rid(k1.id, "req-shared")) >= await r.ttl(lay.gen(k1.id, found[k1.id])) - 1
    assert await meter.generation_by_request("req-other", k1.id) is None
    g = gen()  # no request id: no index key
    await meter.settle(await meter.admit(k1, "qwen", 10, 10, g), record(g))
    assert await r.exists(lay.rid(k1.id, "")) == 0


async def test_parallel_settlements_share_round_trips_and_a_failing_one_is_journalled_alone(
        meter: Meter, make_key: MakeKey, backend: Backend) -> None:
    """Settlements queued together go to Redis together (a single node: one pipeline of scripts, one of extras);
    one whose script fails (here: a counter key of the wrong type) is journalled, the others are stored exactly."""
    good, bad = make_key(budget_nano=10**12), make_key(budget_nano=10**12)
    adms = [await meter.admit(good, "qwen", 10, 10, gen()) for _ in range(20)]
    broken = await meter.admit(bad, "qwen", 10, 10, gen())
    r = meter.store.redis
    await r.set(meter.layout.per(bad.id, "total"), "not a hash")  # HINCRBY on it fails inside the script
    node = aioredis.Redis.from_url(backend.node_url(meter.layout.per(good.id, "total")))
    try:
        before = int((await node.info("stats"))["total_reads_processed"])
        costs = await asyncio.gather(*(meter.settle(a, record(a.gen_id, prompt=100, completion=10))
                                       for a in [*adms, broken]))
        after = int((await node.info("stats"))["total_reads_processed"])
    finally:
        await node.aclose()
    assert meter.journal_writes_total >= 1  # the broken one (and, on a box too slow for the socket timeout, more)
    await meter.replay_journal()  # a timed-out settlement is applied from the journal; the broken one is rejected
    s = await meter.key_summary(good)
    assert (s["requests"], s["total_spend_nano"], s["reserved_nano"]) == (20, sum(costs[:20]), 0)
    assert await r.xlen(meter.layout.stream(good.id)) == 20
    assert all([await meter.generation(a.gen_id, good.id) for a in adms])
    if backend.kind == "single":  # 21 settlements in 2 round trips, not 42 (a big pipeline may take a few reads)
        assert after - before < 21


async def test_a_single_node_settles_with_its_cross_slot_extras_in_one_round_trip(
        meter: Meter, make_key: MakeKey, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five settlements queued together: one pipeline of five settle scripts (a single node), each of which posts its
    feed entry, key-set member and generation index and removes the request's in-flight entry. A cluster keeps the
    second call for these extras (other slots); the state they leave is the same."""
    key = make_key(budget_nano=10**12, tpm=100_000)
    adms = [await meter.admit(key, "qwen", 10, 10, gen()) for _ in range(5)]
    r, lay = meter.store.redis, meter.layout
    assert all([await r.hexists(meter.instance.key, a.gen_id) for a in adms])  # registered at admission
    sent = record_sends(monkeypatch, meter.store)
    costs = await asyncio.gather(*(meter.settle(a, record(a.gen_id, prompt=100, completion=10)) for a in adms))
    if backend.kind == "single":
        assert len(sent) == 1 and [c[0] for c in sent[0]] == ["EVALSHA"] * 5
    feed = [f for _, f in await r.xrange(lay.feed())]
    for a in adms:
        assert [f["key"] for f in feed if f["gen"] == a.gen_id] == [key.id]
        assert await r.get(lay.gen_index(a.gen_id)) == key.id
        assert 0 < await r.ttl(lay.gen_index(a.gen_id)) <= meter.options.record_ttl
        assert not await r.hexists(meter.instance.key, a.gen_id)  # no longer in flight
        assert (await meter.generation(a.gen_id)) is not None  # found through the index, without the key id
    assert key.id in await r.smembers(lay.keyset())
    s = await meter.key_summary(key)
    assert (s["requests"], s["total_spend_nano"], s["reserved_nano"]) == (5, sum(costs), 0)
    # settled again (a retry): nothing posted twice
    sent.clear()
    await asyncio.gather(*(meter.settle(a, record(a.gen_id, prompt=100, completion=10)) for a in adms))
    assert len(await r.xrange(lay.feed())) == 5 and (await meter.key_summary(key))["requests"] == 5
    if backend.kind == "single":
        assert len(sent) == 1


async def test_a_journal_entry_of_an_older_version_that_owes_the_extras_posts_them(
        meter: Meter, make_key: MakeKey) -> None:
    """An older version journalled ``post: true`` when the extras failed after its settle script had run: replay
    runs the (repeated, so no-op) script and posts them, once per replay -- the feed is at-least-once, the counters
    exactly once."""
    key = make_key(budget_nano=10**12)
    g = gen()
    adm = await meter.admit(key, "qwen", 10, 10, g)
    await meter.settle(adm, record(g))
    r, lay = meter.store.redis, meter.layout
    stored = await meter.generation(g, key.id)
    # as that version left it: settled, but no feed entry, no index, the request still registered in flight
    await r.delete(lay.gen_index(g))
    await r.xdel(lay.feed(), *[i for i, f in await r.xrange(lay.feed()) if f["gen"] == g])
    await r.hset(meter.instance.key, g, "{}")
    await meter.journal.append({"v": 1, "adm": adm.to_dict(), "record": stored, "post": True})
    assert await meter.replay_journal() == 1
    assert [f["gen"] for _, f in await r.xrange(lay.feed())] == [g]
    assert await r.get(lay.gen_index(g)) == key.id and key.id in await r.smembers(lay.keyset())
    assert not await r.hexists(meter.instance.key, g)
    s = await meter.key_summary(key)
    assert (s["requests"], s["reserved_nano"]) == (1, 0)


async def test_a_settlement_off_the_response_path_is_read_by_this_process_and_priced_at_once(
        meter: Meter, make_key: MakeKey) -> None:
    """``wait=False`` (what the gateway does for an answer): the cost comes back before any round trip, the record is
    stored after; this process's reads (generation, key summary) wait for it, so they never miss their own answer."""
    key = make_key(budget_nano=10**9, tpm=100_000)
    g = gen()
    adm = await meter.admit(key, "deepseek-chat", 1000, 1000, g)
    cost = await meter.settle(adm, record(g, prompt=1200, completion=300, cached=1024, reasoning=250), wait=False)
    # returned before any round trip, not stored yet (a cluster has no ordered outbox: it waits there)
    assert cost == 203_952 and meter.unsettled == (0 if meter.store.cluster else 1)
    got = await meter.generation(g, key.id)
    assert got is not None and got["cost_nano"] == 203_952
    s = await meter.key_summary(key)
    assert (s["requests"], s["total_spend_nano"], s["reserved_nano"]) == (1, 203_952, 0)
    assert meter.unsettled == 0


async def test_an_admission_after_an_answer_sees_its_reservation_released(meter: Meter, make_key: MakeKey) -> None:
    """The budget fits one request's reservation, not two: the next request of the same client, admitted right after
    the first answer (its settlement not awaited), is admitted -- the settlement went into the outbox first and Redis
    runs it first. (A cluster's settlement is always awaited.)"""
    key = make_key(budget_nano=2_000_000)
    g1 = gen()
    adm = await meter.admit(key, "deepseek-chat", 1000, 3000, g1)  # reserves 1000 x 280 + 3000 x 420 = 1,540,000
    assert 2_000_000 // 2 < adm.reserved_nano <= 2_000_000
    await meter.settle(adm, record(g1, prompt=10, completion=10), wait=False)
    adm2 = await meter.admit(key, "deepseek-chat", 1000, 3000, gen())
    assert adm2.reserved_nano == adm.reserved_nano


async def test_a_budget_refusal_looks_again_once_for_another_workers_answer(
        meter: Meter, make_key: MakeKey, store: Store, settings: Settings, clock: FakeClock,
        options: MeterOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers (two meters, one Redis). Worker A answered a request whose record is a round trip behind (its
    settlement not stored yet); worker B admits the same client's next request, which fits only once A's reservation
    is released: refused at first, it looks once more after BUDGET_RECHECK_S and is admitted. A reservation really
    held (the request still in flight) is refused after that one more look, as before."""
    monkeypatch.setattr(meter_module, "BUDGET_RECHECK_S", 0.01)
    other = Meter(store, settings, tmp_path / "journal-b", clock=clock, options=options)
    await other.start()
    try:
        key = make_key(budget_nano=2_000_000)
        g1 = gen()
        adm1 = await meter.admit(key, "deepseek-chat", 1000, 3000, g1)  # reserves 1,540,000 of 2,000,000
        looks = 0
        ask = other.scripts.run_with

        async def counted(*a: Any, **kw: Any) -> Any:
            nonlocal looks
            reply = await ask(*a, **kw)
            looks += 1
            if looks == 1:  # B was refused: now A's settlement lands (the round trip after its answer)
                await meter.settle(adm1, record(g1, prompt=10, completion=10))
            return reply

        monkeypatch.setattr(other.scripts, "run_with", counted)
        if store.cluster:  # an answer there waits for its settlement, so a refusal is final at once
            with pytest.raises(BudgetExceeded):
                await other.admit(key, "deepseek-chat", 1000, 3000, gen())
            assert looks == 1
            return
        adm2 = await other.admit(key, "deepseek-chat", 1000, 3000, gen())
        assert looks == 2 and adm2.reserved_nano == adm1.reserved_nano

        looks = 99  # (no more settlements) adm2's reservation is really held: refused after one more look
        with pytest.raises(BudgetExceeded):
            await other.admit(key, "deepseek-chat", 1000, 3000, gen())
        assert looks == 101
    finally:
        await other.aclose()
