"""Crash recovery against the real Redis: in-flight registration in the admission's round trip, checkpoints in one
batch, and the reaper settling a lost instance's requests as `gateway_lost` -- once, whoever races it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.metering._helpers import FakeClock, gen, record, record_sends
from tests.metering.conftest import Backend
from therouter.config import Settings, StoreConfig
from therouter.errors import BudgetExceeded, StoreUnavailable
from therouter.keys import KeyRecord
from therouter.metering import Meter, MeterOptions, cost_nano
from therouter.metering.admission import Admission
from therouter.metering.instance import lost_request
from therouter.protocol.usage import Usage
from therouter.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop

MakeKey = Callable[..., KeyRecord]
LOST_AFTER = 15.0
# the background passes are off (an hour apart): each test drives checkpoints and reaper passes on the fake clock
OPTIONS = MeterOptions(tick=3600, heartbeat_interval=3600, checkpoint_interval=3600, instance_lost_after=LOST_AFTER)
MODEL = "deepseek-chat"


class TestStore(Store):
    """The real store, counting round trips (each `call` is one) and able to play an outage."""

    __test__ = False

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        self.calls = 0
        self.down = False

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        if self.down:
            raise StoreUnavailable("the store is unavailable (test)")
        self.calls += 1
        return await super().call(fn)


MakeMeter = Callable[[], Awaitable[Meter]]


@pytest.fixture
async def meters(backend: Backend, key_prefix: str, settings: Settings, clock: FakeClock,
                 tmp_path: Path) -> AsyncIterator[MakeMeter]:
    """Gateway instances: each its own meter, store connection and journal, sharing Redis (one server or the
    cluster), prefix and clock."""
    made: list[Meter] = []

    async def make() -> Meter:
        store = TestStore(StoreConfig(redis_url=backend.url, key_prefix=key_prefix))
        m = Meter(store, settings, tmp_path / f"journal-{len(made)}", clock=clock, options=OPTIONS)
        await m.start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.store.down = False  # type: ignore[attr-defined]
        await m.aclose()
        await m.store.aclose()


def store_of(m: Meter) -> TestStore:
    assert isinstance(m.store, TestStore)
    return m.store


async def entry(m: Meter, gen_id: str, owner: Meter | None = None) -> dict[str, Any] | None:
    raw = await m.store.redis.hget((owner or m).instance.key, gen_id)
    return orjson.loads(raw) if raw else None


async def instances(m: Meter) -> list[str]:
    return list(await m.store.redis.zrange(m.layout.instances(), 0, -1))


async def refused_entry(m: Meter, key: KeyRecord, gen_id: str) -> None:
    """The in-flight entry of a refused admission. A cluster pipelines the registration beside the admission script,
    before the refusal is known, so the entry is there; a single node's script registers only what it admits, so
    the entry is written here as a cluster (or an older version) leaves it."""
    if m.store.cluster:
        assert await entry(m, gen_id) is not None
        return
    assert await entry(m, gen_id) is None
    now = m.clock()
    adm = Admission(gen_id, key.id, MODEL, m.prices.current(MODEL, now), 1, 1, now, int(now * 1000) // 60_000)
    await m.store.redis.hset(m.instance.key, gen_id, m.instance.entry(adm, 100))


async def heartbeat(*ms: Meter) -> None:
    for m in ms:
        await m.instance.checkpoint(beat=True)


def stream_usage(prompt: int, produced: dict[str, int], gen_id: str) -> Callable[[], Usage]:
    """What a stream's rewriter reads: the prompt estimate and produced characters / 4."""
    return lambda: Usage(prompt_tokens=prompt, completion_tokens=(produced[gen_id] + 3) // 4, estimated=True)


async def test_admission_registers_the_request_in_its_own_round_trip(meters: MakeMeter, make_key: MakeKey) -> None:
    a = await meters()
    key = make_key(budget_nano=10**9)
    g = gen()
    before = store_of(a).calls
    adm = await a.admit(key, MODEL, 1000, 500, g)
    assert store_of(a).calls == before + 1  # the admission script and the registration: one pipeline
    e = await entry(a, g)
    assert e is not None and e["adm"]["gen_id"] == g and e["adm"]["key_id"] == key.id and e["adm"]["tracked"]
    assert e["usage"] == {"prompt": 1000, "completion": 0, "cached": 0, "reasoning": 0}
    assert a.instance.id in await instances(a)
    assert 0 < await a.store.redis.pttl(a.instance.key)
    before = store_of(a).calls
    await a.settle(adm, record(g))
    # a single node: the settle script removes the entry with its other cross-slot extras, in one round trip; a
    # cluster: the settle script, then the extras (the entry's removal among them) in a call of their own
    assert store_of(a).calls == before + (2 if a.store.cluster else 1)
    assert await entry(a, g) is None


async def test_a_single_nodes_admission_script_registers_only_what_it_admits(
        meters: MakeMeter, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single node: the admission script writes the in-flight entry itself (no HSET beside it) and only for a
    request it admits. A cluster pipelines the HSET beside the script, so a refused request's entry is written too
    (and dropped by the next checkpoint)."""
    a = await meters()
    sent = record_sends(monkeypatch, a.store)
    ok, refused = gen(), gen()
    await asyncio.gather(a.admit(make_key(budget_nano=10**9), MODEL, 1000, 500, ok),
                         asyncio.gather(a.admit(make_key(budget_nano=1000), MODEL, 1000, 500, refused),
                                        return_exceptions=True))
    e = await entry(a, ok)
    assert e is not None and e["adm"]["gen_id"] == ok and e["adm"]["tracked"]
    assert 0 < await a.store.redis.pttl(a.instance.key) <= OPTIONS.reservation_ttl_for(a.settings) * 1000 + 60_000
    if a.store.cluster:
        assert await entry(a, refused) is not None
    else:
        assert len(sent) == 1 and [c[0] for c in sent[0]] == ["EVALSHA", "EVALSHA"]  # one round trip, two scripts
        assert await entry(a, refused) is None


async def test_registration_survives_a_script_cache_flush(meters: MakeMeter, make_key: MakeKey) -> None:
    a = await meters()
    await a.store.redis.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    g = gen()
    adm = await a.admit(make_key(budget_nano=10**9), MODEL, 10, 10, g)
    assert adm.tracked and await entry(a, g) is not None


async def test_checkpoint_writes_what_changed_in_one_batch(meters: MakeMeter, make_key: MakeKey) -> None:
    a = await meters()
    key = make_key(budget_nano=10**9)
    gens = [gen() for _ in range(3)]
    produced = dict.fromkeys(gens, 0)
    for g in gens:
        await a.admit(key, MODEL, 1000, 500, g)
        a.serving(g, MODEL, "deepseek", "deepseek-chat", stream=True, usage=stream_usage(1000, produced, g))
    before = store_of(a).calls
    assert await a.instance.checkpoint() == 3
    assert store_of(a).calls == before + 1
    produced[gens[0]] += 400
    assert await a.instance.checkpoint() == 1  # only the request that changed is written again
    assert await a.instance.checkpoint() == 0
    assert store_of(a).calls == before + 2  # nothing changed, no heartbeat due: no round trip at all
    e = await entry(a, gens[0])
    assert e is not None
    assert (e["model"], e["provider"], e["upstream_model"], e["stream"]) == (MODEL, "deepseek", "deepseek-chat", True)
    assert e["usage"] == {"prompt": 1000, "completion": 100, "cached": 0, "reasoning": 0}


async def test_a_lost_instances_stream_is_settled_at_its_checkpoint(meters: MakeMeter, make_key: MakeKey,
                                                                     clock: FakeClock) -> None:
    a, b = await meters(), await meters()
    key = make_key(budget_nano=10**9)
    g = gen()
    adm = await a.admit(key, MODEL, 1000, 2000, g)
    produced = {g: 480}
    a.serving(g, MODEL, "deepseek", "deepseek-chat", stream=True, usage=stream_usage(1000, produced, g))
    await a.instance.checkpoint()
    produced[g] += 4000  # produced after the last checkpoint: lost with the instance, not billed
    assert (await b.key_summary(key))["reserved_nano"] == adm.reserved_nano

    clock.advance(LOST_AFTER - 5)  # a's heartbeat is 10 s old: not lost yet
    await heartbeat(b)
    assert await b.instance.reap() == 0
    clock.advance(10)  # 20 s: lost
    await heartbeat(b)
    assert await b.instance.reap() == 1

    rec = await b.generation(g)
    assert rec is not None
    assert (rec["outcome"], rec["model"], rec["provider"], rec["upstream_model"], rec["stream"]) == (
        "gateway_lost", MODEL, "deepseek", "deepseek-chat", True)
    assert rec["usage"]["prompt_tokens"] == 1000 and rec["usage"]["completion_tokens"] == 120
    assert rec["usage"]["estimated"] is True
    assert rec["cost_nano"] == cost_nano(Usage(prompt_tokens=1000, completion_tokens=120), adm.price) > 0
    s = await b.key_summary(key)
    assert (s["requests"], s["spend_nano"], s["reserved_nano"]) == (1, rec["cost_nano"], 0)
    assert a.instance.id not in await instances(b)  # the lost instance is forgotten, its in-flight hash gone
    assert not await b.store.redis.exists(a.instance.key)
    assert b.instance.id in await instances(b)
    assert await b.instance.reap() == 0  # nothing left


async def test_a_non_stream_request_is_billed_its_prompt_at_the_serving_deployment(
        meters: MakeMeter, make_key: MakeKey, clock: FakeClock) -> None:
    a, b = await meters(), await meters()
    key = make_key(budget_nano=10**9)
    g = gen()
    adm = await a.admit(key, MODEL, 700, 2000, g)
    a.serving(g, MODEL, "local", "Qwen/served", stream=False)
    await a.instance.checkpoint()
    clock.advance(LOST_AFTER + 5)
    await heartbeat(b)
    await b.instance.reap()
    rec = await b.generation(g)
    assert rec is not None and (rec["outcome"], rec["provider"], rec["upstream_model"], rec["stream"]) == (
        "gateway_lost", "local", "Qwen/served", False)
    assert (rec["usage"]["prompt_tokens"], rec["usage"]["completion_tokens"]) == (700, 0)
    assert rec["cost_nano"] == cost_nano(Usage(prompt_tokens=700), adm.price)
    assert (await b.key_summary(key))["reserved_nano"] == 0


async def test_a_refused_request_is_never_settled_by_the_reaper(
        meters: MakeMeter, make_key: MakeKey, clock: FakeClock) -> None:
    a, b = await meters(), await meters()
    poor = make_key(budget_nano=1000)
    refused = gen()
    with pytest.raises(BudgetExceeded):
        await a.admit(poor, MODEL, 1000, 500, refused)
    # (a cluster: written with the admission, before the refusal was known); the next checkpoint would remove it...
    await refused_entry(a, poor, refused)
    # ... but this instance dies first
    clock.advance(LOST_AFTER + 5)
    await heartbeat(b)
    assert await b.instance.reap() == 1  # handed to settlement, which finds no reservation
    assert await b.generation(refused) is None
    s = await b.key_summary(poor)
    assert (s["requests"], s["spend_nano"], s["reserved_nano"]) == (0, 0, 0)
    assert not await b.store.redis.exists(a.instance.key)


async def test_a_live_instance_drops_refused_entries_at_its_next_checkpoint(
        meters: MakeMeter, make_key: MakeKey) -> None:
    a = await meters()
    refused = gen()
    with pytest.raises(BudgetExceeded):
        await a.admit(make_key(budget_nano=1000), MODEL, 1000, 500, refused)
    await a.instance.checkpoint()
    assert await entry(a, refused) is None


async def test_racing_reapers_and_the_requests_own_settlement_count_once(
        meters: MakeMeter, make_key: MakeKey, clock: FakeClock) -> None:
    a, b, c = await meters(), await meters(), await meters()
    key = make_key(budget_nano=10**9)
    gens = [gen() for _ in range(6)]
    adms = {g: await a.admit(key, MODEL, 1000, 500, g) for g in gens}
    for g in gens:
        a.serving(g, MODEL, "deepseek", "deepseek-chat", stream=True, usage=stream_usage(1000, {g: 200}, g))
    await a.instance.checkpoint()
    clock.advance(LOST_AFTER + 5)  # a stalled past instance_lost_after while still finishing its streams
    await heartbeat(b, c)
    await asyncio.gather(b.instance.reap(), c.instance.reap(),
                         *(a.settle(adms[g], record(g, prompt=1000, completion=300)) for g in gens))
    recs = [await a.generation(g) for g in gens]
    assert all(r is not None and r["outcome"] in ("completed", "gateway_lost") for r in recs)
    s = await a.key_summary(key)
    assert (s["requests"], s["reserved_nano"]) == (6, 0)
    assert s["spend_nano"] == sum(r["cost_nano"] for r in recs if r is not None)
    assert await a.store.redis.xlen(a.layout.stream(key.id)) == 6
    assert (await a.rebuild_totals(key.id))["match"] is True


async def test_a_settled_requests_stale_entry_is_not_settled_again(meters: MakeMeter, make_key: MakeKey,
                                                                   clock: FakeClock) -> None:
    a, b = await meters(), await meters()
    key = make_key(budget_nano=10**9)
    g = gen()
    adm = await a.admit(key, MODEL, 1000, 500, g)
    stale = await a.store.redis.hget(a.instance.key, g)
    cost = await a.settle(adm, record(g, prompt=1000, completion=300))
    await a.store.redis.hset(a.instance.key, g, stale)  # a checkpoint that raced the settlement wrote it back
    clock.advance(LOST_AFTER + 5)
    await heartbeat(b)
    await b.instance.reap()
    rec = await b.generation(g)
    assert rec is not None and rec["outcome"] == "completed"
    s = await b.key_summary(key)
    assert (s["requests"], s["spend_nano"], s["reserved_nano"]) == (1, cost, 0)


async def test_a_request_without_reservation_is_registered_by_its_first_checkpoint(
        meters: MakeMeter, make_key: MakeKey, clock: FakeClock) -> None:
    a, b = await meters(), await meters()
    key = make_key()  # no budget, no limits: admission makes no Redis call at all
    g = gen()
    before = store_of(a).calls
    adm = await a.admit(key, MODEL, 300, 100, g)
    assert not adm.tracked and store_of(a).calls == before and await entry(a, g) is None
    a.serving(g, MODEL, "deepseek", "deepseek-chat", stream=True, usage=stream_usage(300, {g: 40}, g))
    await a.instance.checkpoint()
    assert await entry(a, g) is not None
    clock.advance(LOST_AFTER + 5)
    await heartbeat(b)
    await b.instance.reap()
    rec = await b.generation(g)
    assert rec is not None and rec["outcome"] == "gateway_lost" and rec["usage"]["completion_tokens"] == 10
    assert (await b.key_summary(key))["requests"] == 1


async def test_a_reaper_back_from_an_outage_waits_until_every_live_instance_could_heartbeat(
        meters: MakeMeter, make_key: MakeKey, clock: FakeClock) -> None:
    a, b, dead = await meters(), await meters(), await meters()
    key = make_key(budget_nano=10**9)
    g_a, g_dead = gen(), gen()
    await a.admit(key, MODEL, 100, 100, g_a)
    await dead.admit(key, MODEL, 100, 100, g_dead)
    store_of(a).down = store_of(b).down = True  # Redis unreachable for a and b for 20 s; `dead` dies meanwhile
    clock.advance(20)
    with pytest.raises(StoreUnavailable):
        await heartbeat(b)
    store_of(a).down = store_of(b).down = False
    await heartbeat(b)  # b is back first: every other heartbeat is 20 s old, a's included
    assert await b.instance.reap() == 0
    await heartbeat(a)
    clock.advance(LOST_AFTER)
    await heartbeat(a, b)
    assert await b.instance.reap() == 1  # only the instance that really is gone
    assert await b.generation(g_dead) is not None and await b.generation(g_a) is None
    assert a.instance.id in await instances(b) and dead.instance.id not in await instances(b)


async def test_an_instance_taken_for_lost_registers_its_requests_again(meters: MakeMeter, make_key: MakeKey,
                                                                      clock: FakeClock) -> None:
    a, b = await meters(), await meters()
    key = make_key(budget_nano=10**9)
    clock.advance(LOST_AFTER + 5)  # a stalled: b takes it for lost (it had nothing in flight)
    await heartbeat(b)
    await b.instance.reap()
    assert a.instance.id not in await instances(b)
    g = gen()
    await a.admit(key, MODEL, 100, 100, g)  # registered into a's hash...
    await b.store.redis.delete(a.instance.key)  # ...which a reaper pass running just then deleted
    await heartbeat(a)  # a notices it was forgotten
    await a.instance.checkpoint()
    assert a.instance.id in await instances(b) and await entry(a, g) is not None


async def test_a_reapers_settlement_journalled_in_an_outage_keeps_its_condition(
        meters: MakeMeter, make_key: MakeKey) -> None:
    a = await meters()
    key = make_key(budget_nano=10**9)
    held, refused = gen(), gen()
    adm_held = await a.admit(key, MODEL, 100, 100, held)
    poor = make_key(budget_nano=1000)
    with pytest.raises(BudgetExceeded):  # no reservation made (a cluster: its entry written with the admission)
        await a.admit(poor, MODEL, 100, 100, refused)
    await refused_entry(a, poor, refused)
    raw = await a.store.redis.hget(a.instance.key, refused)
    assert raw is not None
    adm_refused, _ = lost_request(raw)  # what a reaper reads from the entry
    store_of(a).down = True
    for adm in (adm_held, adm_refused):
        rec = record(adm.gen_id, outcome="gateway_lost")
        await a.settle(adm, rec, only_if_reserved=True)  # as the reaper does: goes to the journal
    store_of(a).down = False
    assert await a.replay_journal() == 2
    assert await a.generation(held) is not None  # its reservation was still there
    assert await a.generation(refused) is None  # refused: nothing reserved, never settled
    assert (await a.key_summary(key))["requests"] == 1


async def test_clean_shutdown_forgets_the_instance(meters: MakeMeter) -> None:
    a, b = await meters(), await meters()
    assert a.instance.id in await instances(b)
    await a.aclose()
    assert a.instance.id not in await instances(b)


async def test_a_request_admitted_by_the_local_limiter_is_registered_by_the_next_checkpoint(
        meters: MakeMeter, make_key: MakeKey, clock: FakeClock) -> None:
    a, b = await meters(), await meters()
    key = make_key(rpm=100)
    g = gen()
    store_of(a).down = True  # the admission (and its registration) cannot reach Redis: the local limiter admits
    adm = await a.admit(key, MODEL, 100, 100, g)
    assert adm.local and not adm.tracked
    store_of(a).down = False
    await a.maintain()  # pays the release owed for a reservation the failed admission may have made
    await a.instance.checkpoint()
    e = await entry(a, g)
    assert e is not None and e["adm"]["tracked"] is False
    clock.advance(LOST_AFTER + 5)
    await heartbeat(b)
    await b.instance.reap()
    rec = await b.generation(g)
    assert rec is not None and rec["outcome"] == "gateway_lost"
