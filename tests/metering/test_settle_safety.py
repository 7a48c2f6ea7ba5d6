"""Settlement never raises and never loses, against the real Redis: bounded upstream usage, costs that cannot be
computed, records that cannot be serialised, a settle whose reply was lost in a Redis stall (replay still posts the
global feed and the generation index), journal entries of older versions that owe the extras, torn journal lines and
entries that cannot be applied."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.metering._helpers import gen, record
from tests.metering.conftest import Backend
from therouter.keys import KeyRecord
from therouter.metering import Meter
from therouter.metering.prices import cost_nano
from therouter.protocol.usage import Usage

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop

MakeKey = Callable[..., KeyRecord]
# blocks the whole server for ARGV[1] ms (a stall: every other client waits)
BUSY = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
while true do
  local n = redis.call('TIME')
  if tonumber(n[1]) * 1000000 + tonumber(n[2]) >= stop then return 1 end
end
"""


async def feed_gens(meter: Meter) -> list[str]:
    return [f["gen"] for _, f in await meter.store.redis.xrange(meter.layout.feed())]


async def test_absurd_upstream_usage_is_bounded_estimated_and_counted(meter: Meter, make_key: MakeKey) -> None:
    key = make_key(budget_nano=10**12)
    g = gen()
    adm = await meter.admit(key, "deepseek-chat", 100, 100, g)  # card: context 131072, max output 8192
    rec = record(g)
    rec.usage = Usage.from_openai({"prompt_tokens": 10**15, "completion_tokens": "NaN",
                                   "prompt_tokens_details": {"cached_tokens": 10**16}})
    cost = await meter.settle(adm, rec, estimate=Usage(prompt_tokens=90, completion_tokens=50, estimated=True))
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens, rec.usage.cached_tokens) == (131072, 50, 131072)
    assert rec.usage.estimated and cost == cost_nano(Usage(131072, 50, 131072), adm.price)
    stored = await meter.generation(g, key.id)
    assert stored is not None and stored["usage"]["prompt_tokens"] == 131072 and stored["usage"]["estimated"]
    assert (await meter.key_summary(key))["total_spend_nano"] == cost
    assert dict(meter.usage_anomalies) == {("deepseek", "prompt_over_context"): 1, ("deepseek", "not_a_number"): 1,
                                           ("deepseek", "cached_over_prompt"): 1}


async def test_n_choices_may_each_use_the_max_output(meter: Meter, make_key: MakeKey) -> None:
    g = gen()
    adm = await meter.admit(make_key(), "qwen", 10, 4096, g, sequences=3)  # card: max output 4096
    rec = record(g, prompt=10, completion=4096 * 3)
    await meter.settle(adm, rec, choices=3)
    assert rec.usage.completion_tokens == 4096 * 3 and not meter.usage_anomalies


async def test_a_cost_that_cannot_be_computed_is_journalled_and_logged(meter: Meter, make_key: MakeKey,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    key = make_key()
    g = gen()
    adm = await meter.admit(key, "qwen", 10, 10, g)
    broken = replace(adm, price=replace(adm.price, input=None))  # type: ignore[arg-type]  # no usable price
    with caplog.at_level(logging.ERROR, logger="therouter.metering"):
        assert await meter.settle(broken, record(g)) == 0  # never raises
    assert any("could not be computed" in r.getMessage() and g in r.getMessage() for r in caplog.records)
    lines = meter.journal.path.read_text().splitlines()
    assert len(lines) == 1 and g in lines[0] and '"priced":false' in lines[0]
    # replay cannot price it either: kept for an operator, never dropped
    assert await meter.replay_journal() == 0
    assert g in (meter.journal.dir / "rejected.jsonl").read_text()
    assert not meter.journal.pending()


async def test_an_unpriced_entry_is_priced_on_replay(meter: Meter, make_key: MakeKey) -> None:
    key = make_key()
    g = gen()
    adm = await meter.admit(key, "qwen", 10, 100, g)
    rec = record(g, prompt=1000, completion=100)
    rec.id, rec.key_id, rec.model = g, key.id, "qwen"
    await meter.journal.append({"v": 1, "adm": adm.to_dict(), "record": rec.to_dict(), "post": False,
                                "priced": False})
    assert await meter.replay_journal() == 1
    s = await meter.key_summary(key)
    assert (s["requests"], s["total_spend_nano"]) == (1, 1000 * 100 + 100 * 200)
    stored = await meter.generation(g)
    assert stored is not None and stored["cost_nano"] == 1000 * 100 + 100 * 200


async def test_a_record_with_a_value_json_cannot_hold_is_still_stored(meter: Meter, make_key: MakeKey) -> None:
    key = make_key()
    g = gen()
    adm = await meter.admit(key, "qwen", 10, 10, g)
    rec = record(g)
    rec.attempts = [{"provider": "local", "outcome": "failed", "error": ValueError("boom")}]
    cost = await meter.settle(adm, rec)  # never raises
    stored = await meter.generation(g)
    assert stored is not None and stored["attempts"][0]["error"] == "boom" and stored["cost_nano"] == cost


async def test_replay_posts_feed_and_index_when_the_settle_reply_was_lost(meter: Meter, make_key: MakeKey,
                                                                          backend: Backend) -> None:
    key = make_key(budget_nano=10**12)
    warm = gen()  # the settle script is loaded on the server before the stall (EVALSHA must not need a NOSCRIPT)
    await meter.settle(await meter.admit(key, "qwen", 10, 10, warm), record(warm))
    g = gen()
    adm = await meter.admit(key, "qwen", 10, 10, g)
    r = meter.store.redis
    node = backend.node_url(meter.layout.gen(key.id, g))  # the server holding the key's slot
    blocker = aioredis.Redis.from_url(node, socket_timeout=30)
    probe = aioredis.Redis.from_url(node, socket_timeout=0.05)
    try:
        stall = asyncio.ensure_future(blocker.eval(BUSY, 0, 2500))
        for _ in range(200):  # until the server is busy: a PING gets no answer
            try:
                await probe.ping()
                await asyncio.sleep(0.005)
            except RedisError:
                break
        else:
            pytest.fail("could not stall redis-server")
        await meter.settle(adm, record(g))  # the reply times out (the store's socket timeout, 1 s here): journalled, post=False
        assert meter.journal_writes_total == 1
        await stall
    finally:
        await blocker.aclose()
        await probe.aclose()
    for _ in range(100):  # the script, queued during the stall, ran after it
        if await r.exists(meter.layout.gen(key.id, g)):
            break
        await asyncio.sleep(0.02)
    assert await r.exists(meter.layout.gen(key.id, g)) == 1, "the settle script did not run after the stall"
    if backend.kind == "single":  # the script posted the extras itself, atomically
        assert await r.get(meter.layout.gen_index(g)) == key.id and (await feed_gens(meter)).count(g) == 1
        # as an older version left it (the script ran, its separate extras were never sent): replay posts them
        await r.delete(meter.layout.gen_index(g))
        await r.xdel(meter.layout.feed(), *[i for i, f in await r.xrange(meter.layout.feed()) if f["gen"] == g])
    assert await r.get(meter.layout.gen_index(g)) is None and g not in await feed_gens(meter)

    assert await meter.replay_journal() == 1
    assert await r.get(meter.layout.gen_index(g)) == key.id
    assert (await feed_gens(meter)).count(g) == 1
    assert (await meter.generation(g)) is not None  # found through the index, without the key id
    s = await meter.key_summary(key)
    assert (s["requests"], s["reserved_nano"]) == (2, 0)  # counted once
    # a second replay of the same entry (a crash before the file was deleted) posts nothing twice
    await meter.journal.append({"v": 1, "adm": adm.to_dict(), "record": (await meter.generation(g)), "post": False})
    assert await meter.replay_journal() == 1
    assert (await feed_gens(meter)).count(g) == 1 and (await meter.key_summary(key))["requests"] == 2


async def test_a_torn_last_line_never_swallows_the_next_entry(meter: Meter, make_key: MakeKey) -> None:
    key = make_key()
    g = gen()
    adm = await meter.admit(key, "qwen", 10, 10, g)
    rec = record(g)
    rec.id, rec.key_id, rec.model = g, key.id, "qwen"
    rec.cost_nano = cost_nano(rec.usage, adm.price)
    meter.journal.dir.mkdir(parents=True, exist_ok=True)
    meter.journal.path.write_bytes(b'{"v": 1, "adm": {"gen_id": "torn-by-a-crash"')  # no newline: a crash mid-append
    await meter.journal.append({"v": 1, "adm": adm.to_dict(), "record": rec.to_dict(), "post": False})
    assert await meter.replay_journal() == 1
    assert (await meter.key_summary(key))["total_spend_nano"] == rec.cost_nano
    assert b"torn-by-a-crash" in (meter.journal.dir / "rejected.jsonl").read_bytes()


async def test_an_entry_that_cannot_be_applied_does_not_block_the_rest(meter: Meter, make_key: MakeKey,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    key = make_key()
    entries = []
    for admitted_at in (1e20, None):  # the first one's date is out of range: it can never be applied
        g = gen()
        adm = await meter.admit(key, "qwen", 10, 10, g)
        if admitted_at is not None:
            adm = replace(adm, admitted_at=admitted_at)
        rec = record(g)
        rec.id, rec.key_id, rec.model = g, key.id, "qwen"
        entries.append({"v": 1, "adm": adm.to_dict(), "record": rec.to_dict(), "post": False})
    for e in entries:
        await meter.journal.append(e)
    with caplog.at_level(logging.CRITICAL, logger="therouter.metering"):
        assert await meter.replay_journal() == 1
    assert (await meter.key_summary(key))["requests"] == 1
    assert entries[0]["adm"]["gen_id"] in (meter.journal.dir / "rejected.jsonl").read_text()
    assert not meter.journal.pending()
    assert any(entries[0]["adm"]["gen_id"] in r.getMessage() for r in caplog.records)
