"""Redis faults: budgets fail closed, rate limits fail open, settlements go to the journal and are replayed exactly
once -- including a real redis-server killed with SIGKILL mid-run and restarted on the same port."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.metering._helpers import FakeClock, gen, record
from therouter.cli import with_workers
from therouter.config import Settings, StoreConfig
from therouter.errors import RateLimited, StoreUnavailable
from therouter.keys import KeyRecord
from therouter.metering import Meter, MeterOptions
from therouter.redisproc import RedisProcess, free_port
from therouter.store import Store, StoreBreaker

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop

MakeKey = Callable[..., KeyRecord]


@pytest.fixture
async def dead_meter(settings: Settings, clock: FakeClock, tmp_path: Path, key_prefix: str) -> AsyncIterator[Meter]:
    """A meter whose Redis is not there (nothing listens on the port), same key prefix as the `store` fixture."""
    store = Store(StoreConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=key_prefix))
    m = Meter(store, settings, tmp_path / "journal", clock=clock, options=MeterOptions(tick=3600))
    await m.start()  # starts anyway, on the config prices
    yield m
    await m.aclose()
    await store.aclose()


def journal_lines(m: Meter) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in m.journal.dir.glob("*.jsonl") if p.name != "rejected.jsonl")


async def test_budget_fails_closed_and_rate_limits_fail_open(dead_meter: Meter, make_key: MakeKey) -> None:
    with pytest.raises(StoreUnavailable) as e:
        await dead_meter.admit(make_key(budget_nano=10**9), "qwen", 10, 10, gen())
    assert (e.value.status, e.value.retry_after, e.value.headers["Retry-After"]) == (503, 2, "2")

    key = make_key(rpm=2)
    admitted = [await dead_meter.admit(key, "qwen", 10, 10, gen()) for _ in range(2)]
    assert all(a.local and not a.tracked for a in admitted)
    assert admitted[1].headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited):
        await dead_meter.admit(key, "qwen", 10, 10, gen())
    assert dead_meter.fail_open_total == 3

    await dead_meter.admit(make_key(), "qwen", 10, 10, gen())  # no limits: never touches Redis
    assert dead_meter.fail_open_total == 3


async def test_model_override_holds_in_the_local_limiter(dead_meter: Meter, make_key: MakeKey) -> None:
    key = make_key(rpm=50, model_limits={"qwen": (1, None)})
    await dead_meter.admit(key, "qwen", 10, 10, gen())
    with pytest.raises(RateLimited):
        await dead_meter.admit(key, "qwen", 10, 10, gen())
    assert (await dead_meter.admit(key, "deepseek-chat", 10, 10, gen())).local


async def test_journalled_settlements_replay_exactly_once(dead_meter: Meter, store: Store, settings: Settings,
                                                          clock: FakeClock, make_key: MakeKey) -> None:
    key = make_key(rpm=100)
    costs = []
    for _ in range(3):
        g = gen()
        costs.append(await dead_meter.settle(await dead_meter.admit(key, "qwen", 10, 10, g), record(g)))
    assert journal_lines(dead_meter) == 3 and dead_meter.journal_writes_total == 3
    # a crash between applying a replay file and deleting it: the same entries twice more
    live_journal = dead_meter.journal.path
    shutil.copy(live_journal, live_journal.with_name("replay-1.jsonl"))
    shutil.copy(live_journal, live_journal.with_name("replay-2.jsonl"))
    live_journal.write_bytes(live_journal.read_bytes() + b'{"v": 1, "adm": {"gen_id": "torn\n')

    live = Meter(store, settings, dead_meter.journal.dir, clock=clock, options=MeterOptions(tick=3600))
    await live.start()  # replays
    try:
        s = await live.key_summary(key)
        assert (s["requests"], s["total_spend_nano"]) == (3, sum(costs))
        assert journal_lines(live) == 0 and await live.replay_journal() == 0
        assert b"torn" in (dead_meter.journal.dir / "rejected.jsonl").read_bytes()
    finally:
        await live.aclose()


async def test_background_task_replays_the_journal(dead_meter: Meter, store: Store, settings: Settings,
                                                   clock: FakeClock, make_key: MakeKey) -> None:
    live = Meter(store, settings, dead_meter.journal.dir, clock=clock, options=MeterOptions(tick=0.02))
    await live.start()
    try:
        key = make_key()
        g = gen()
        cost = await dead_meter.settle(await dead_meter.admit(key, "qwen", 10, 10, g), record(g))
        for _ in range(250):  # the background pass runs every 20 ms
            if not live.journal.pending():
                break
            await asyncio.sleep(0.02)
        assert (await live.key_summary(key))["total_spend_nano"] == cost
        assert (await live.generation(g)) is not None
    finally:
        await live.aclose()


async def test_redis_killed_mid_run_settles_exactly_once(redis_proc: RedisProcess, key_prefix: str,
                                                         settings: Settings, clock: FakeClock, tmp_path: Path,
                                                         make_key: MakeKey) -> None:
    # a breaker that never opens, so the restarted Redis is used at once (the breaker has its own tests)
    store = Store(StoreConfig(redis_url=redis_proc.url, key_prefix=key_prefix),
                  breaker=StoreBreaker(threshold=10**9))
    meter = Meter(store, settings, tmp_path / "journal", clock=clock, options=MeterOptions(tick=3600))
    await meter.start()
    key = make_key(budget_nano=10**12, tpm=10**6)
    gens = [gen() for _ in range(5)]
    adms = [await meter.admit(key, "deepseek-chat", 1000, 1000, g) for g in gens]
    recs = [record(g, prompt=1000 + i, completion=10 * i, cached=i) for i, g in enumerate(gens)]
    costs = [await meter.settle(adms[i], recs[i]) for i in range(2)]
    try:
        redis_proc.stop(kill=True)
        costs += [await meter.settle(adms[i], recs[i]) for i in range(2, 5)]  # -> the journal
        with pytest.raises(StoreUnavailable):
            await meter.admit(key, "deepseek-chat", 1000, 1000, gen())
        assert (await meter.admit(make_key(rpm=10), "qwen", 1, 1, gen())).local  # its script may have run: a release is owed
        assert journal_lines(meter) == 3
    finally:
        redis_proc.start()  # same port, same data folder (appendonly): what was acknowledged survives
    try:
        assert await meter.replay_journal() == 3
        await meter.maintain()  # pays the owed release
        assert await meter.replay_journal() == 0
        await meter.settle(adms[2], recs[2])  # late duplicate of a journalled one
        s = await meter.key_summary(key)
        assert (s["requests"], s["total_spend_nano"], s["reserved_nano"]) == (5, sum(costs), 0)
        report = await meter.rebuild_totals(key.id)
        assert (report["records"], report["match"]) == (5, True)
        assert report["after"]["per:total"]["cost"] == sum(costs)
    finally:
        await meter.aclose()
        await store.aclose()


async def test_each_worker_enforces_its_share_of_a_rate_limit_while_redis_is_down(
        settings: Settings, clock: FakeClock, tmp_path: Path, key_prefix: str, make_key: MakeKey) -> None:
    """`serve --workers 2` (server.workers): the fail-open limiter of each worker allows half of the key's RPM."""
    two = with_workers(settings, 2)
    store = Store(StoreConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=key_prefix))
    m = Meter(store, two, tmp_path / "journal", clock=clock, options=MeterOptions.from_settings(two))
    try:
        key = make_key(rpm=4)
        admitted = [await m.admit(key, "qwen", 10, 10, gen()) for _ in range(2)]
        assert all(a.local for a in admitted)
        with pytest.raises(RateLimited):
            await m.admit(key, "qwen", 10, 10, gen())
    finally:
        await m.aclose()
        await store.aclose()
