"""The versioned price table in Redis: config load, no clobbering of operator prices, versions, capture at admission."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from tests.metering._helpers import FakeClock, gen, make_settings, record
from therouter.errors import InvalidRequest, ModelNotFound
from therouter.keys import KeyRecord
from therouter.metering import Meter, PriceVersion
from therouter.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop


async def test_config_prices_load_as_version_one(meter: Meter) -> None:
    p = await meter.get_price("deepseek-chat")
    assert p == PriceVersion("deepseek-chat", 1, 0, 280_000_000, 28_000_000, 420_000_000, "config")
    listed = {row["model"]: row for row in await meter.list_prices()}
    assert set(listed) == {"deepseek-chat", "qwen"}
    assert listed["qwen"]["current"]["input_usd"] == "0.10"


async def test_operator_price_is_not_clobbered_by_config(meter: Meter, store: Store, clock: FakeClock,
                                                         tmp_path: Path) -> None:
    set_v = await meter.set_price("deepseek-chat", "0.5", Decimal("0.05"), 1.25)
    assert (set_v.version, set_v.source, set_v.input, set_v.output) == (2, "operator", 500_000_000, 1_250_000_000)
    again = Meter(store, make_settings(), tmp_path / "j2", clock=clock)
    await again.start()
    try:
        assert await again.get_price("deepseek-chat") == set_v
    finally:
        await again.aclose()


async def test_changed_config_writes_a_new_version_unchanged_does_not(meter: Meter, store: Store,
                                                                      clock: FakeClock, tmp_path: Path) -> None:
    same = Meter(store, make_settings(), tmp_path / "j2", clock=clock)
    await same.start()
    await same.aclose()
    assert (await meter.get_price("qwen")).version == 1  # type: ignore[union-attr]

    new = make_settings(qwen={"input": "0.12", "cached_input": "0.06", "output": "0.24"})
    changed = Meter(store, new, tmp_path / "j3", clock=clock)
    await changed.start()
    await changed.aclose()
    p = await meter.get_price("qwen")
    assert p is not None and (p.version, p.source, p.input, p.effective_at) == (2, "config", 120_000_000, int(clock()))
    assert (await meter.get_price("deepseek-chat")).version == 1  # type: ignore[union-attr]


async def test_scheduled_price_applies_from_its_effective_time(meter: Meter, clock: FakeClock) -> None:
    await meter.set_price("qwen", "1", "1", "1", effective_at=int(clock()) + 3600)
    assert (await meter.get_price("qwen")).version == 1  # type: ignore[union-attr]
    clock.advance(3600)
    assert (await meter.get_price("qwen")).version == 2  # type: ignore[union-attr]


async def test_set_price_rejects_bad_input(meter: Meter) -> None:
    with pytest.raises(InvalidRequest):
        await meter.set_price("qwen", "abc", "1", "1")
    with pytest.raises(InvalidRequest):
        await meter.set_price("qwen", "0.0000000001", "1", "1")  # finer than a nano-USD
    with pytest.raises(ModelNotFound):
        await meter.set_price("no-such-model", "1", "1", "1")
    assert await meter.get_price("no-such-model") is None


async def test_request_settles_at_the_price_captured_at_admission(meter: Meter,
                                                                  make_key: Callable[..., KeyRecord]) -> None:
    key = make_key()
    g = gen()
    adm = await meter.admit(key, "deepseek-chat", 100, 10, g)
    await meter.set_price("deepseek-chat", "10", "10", "10")
    cost = await meter.settle(adm, record(g, prompt=1000, completion=0))
    assert cost == 1000 * 280 and adm.price_version == 1
    rec = await meter.generation(g)
    assert rec is not None and rec["price_version"] == 1 and rec["cost_nano"] == 280_000
    later = await meter.admit(key, "deepseek-chat", 100, 10, gen())
    assert later.price_version == 2


@pytest.mark.parametrize("field,value", [
    ("input", "NaN"), ("input", "Infinity"), ("output", "-inf"), ("output", -1), ("cached_input", "-0.5"),
    ("input", 1e30), ("output", "1000000.000000001"), ("input", True), ("input", [1]), ("input", {"usd": 1}),
    ("input", None), ("effective_at", -1), ("effective_at", "1700000000"), ("effective_at", 1.5),
    ("effective_at", True), ("effective_at", 10**20), ("effective_at", 253402300800),  # year 10000
])
async def test_set_price_names_the_field_of_bad_input(meter: Meter, clock: FakeClock, field: str,
                                                      value: object) -> None:
    args: dict[str, object] = {"input": "1", "cached_input": "1", "output": "1", "effective_at": None, field: value}
    with pytest.raises(InvalidRequest) as e:
        await meter.set_price("qwen", args["input"], args["cached_input"], args["output"],
                              args["effective_at"])  # type: ignore[arg-type]
    assert e.value.param == field and e.value.status == 400
    assert (await meter.get_price("qwen")).version == 1  # type: ignore[union-attr]  # nothing was written


async def test_price_bounds_are_inclusive(meter: Meter, clock: FakeClock) -> None:
    p = await meter.set_price("qwen", "1000000", 0, "0.000000001", effective_at=int(clock()) + 10 * 365 * 86_400)
    assert (p.input, p.cached_input, p.output) == (10**15, 0, 1)
    assert (await meter.set_price("qwen", 1, 1, 1, effective_at=0)).effective_at == 0


async def test_bad_stored_versions_are_skipped(meter: Meter, store: Store, clock: FakeClock,
                                               caplog: pytest.LogCaptureFixture,
                                               make_key: Callable[..., KeyRecord]) -> None:
    """Versions written by hand or an older build: they never break a listing, a price lookup or a request."""
    r, hist = store.redis, meter.layout.pricehist("qwen")
    good = (await meter.get_price("qwen")).to_dict()  # type: ignore[union-attr]
    garbage = ["not json", "[1, 2]", "{}", '{"model": "qwen"}',
               orjson.dumps({**good, "version": 7, "input": "NaN"}).decode(),
               orjson.dumps({**good, "version": 8, "output": "-5"}).decode(),
               orjson.dumps({**good, "version": 9, "input": str(10**30)}).decode(),
               orjson.dumps({**good, "version": 10, "effective_at": "soon"}).decode(),
               orjson.dumps({**good, "version": 11, "model": "deepseek-chat"}).decode(),
               orjson.dumps({**good, "version": True}).decode()]
    await r.zadd(hist, {m: int(clock()) - 10 + i for i, m in enumerate(garbage)})
    await r.hset(meter.layout.price("qwen"), "version", "garbage")  # the newest-version hash, damaged too
    with caplog.at_level(logging.WARNING, logger="therouter.metering"):
        rows = {row["model"]: row for row in await meter.list_prices()}
        assert rows["qwen"]["current"]["version"] == 1 and len(rows["qwen"]["versions"]) == 1
        assert (await meter.get_price("qwen")).version == 1  # type: ignore[union-attr]
        await meter.maintain()  # the background reload
    assert sum("skipped" in rec.getMessage() for rec in caplog.records) == len(garbage)  # once each
    key = make_key(budget_nano=10**9)
    g = gen()
    adm = await meter.admit(key, "qwen", 10, 10, g)
    assert adm.price_version == 1 and await meter.settle(adm, record(g)) > 0
    # a new operator price still gets a fresh version number, above every stored entry
    p = await meter.set_price("qwen", "2", "2", "2")
    assert p.version > len(garbage) and (await meter.get_price("qwen")) == p


async def test_cache_write_price_is_stored_versioned_and_set_by_operators(meter: Meter, store: Store,
                                                                          clock: FakeClock, tmp_path: Path) -> None:
    assert (await meter.get_price("qwen")).cache_write is None  # type: ignore[union-attr]
    claude = {"input": "5", "cached_input": "0.5", "output": "25", "cache_write": "6.25"}
    first = Meter(store, make_settings(qwen=claude), tmp_path / "j2", clock=clock)
    await first.start()
    await first.aclose()
    p = await meter.get_price("qwen")
    assert p is not None and (p.version, p.cache_write, p.cache_write_rate) == (2, 6_250_000_000, 6_250_000_000)
    assert p.public()["cache_write_usd"] == "6.25"
    again = Meter(store, make_settings(qwen=claude), tmp_path / "j3", clock=clock)  # same numbers: no new version
    await again.start()
    await again.aclose()
    assert (await meter.get_price("qwen")).version == 2  # type: ignore[union-attr]
    op = await meter.set_price("qwen", "5", "0.5", "25", cache_write_usd="10")
    assert (op.version, op.cache_write) == (3, 10_000_000_000)
    assert (await meter.set_price("qwen", "5", "0.5", "25")).cache_write is None  # omitted: writes cost input
    with pytest.raises(InvalidRequest) as ei:
        await meter.set_price("qwen", "5", "0.5", "25", cache_write_usd="-1")
    assert ei.value.param == "cache_write"


async def test_a_price_version_s_dict_is_every_field() -> None:
    """to_dict is written out by hand (it runs on every admission): it must keep up with the fields."""
    import dataclasses

    p = PriceVersion("m", 3, 1732900000, 1, 2, 3, "operator", 4)
    assert p.to_dict() == dataclasses.asdict(p)
    assert PriceVersion.from_dict(p.to_dict()) == p


async def test_the_price_in_force_is_found_again_at_each_version_s_effective_time(meter: Meter,
                                                                                 clock: FakeClock) -> None:
    """current() keeps what it found for the time until the next version takes effect: a scheduled version still
    applies from its very second on, an earlier time still gets the older one, and a refresh's versions count."""
    now = int(clock())
    first = meter.prices.current("qwen")
    await meter.set_price("qwen", "2", "1", "2", effective_at=now + 60)
    await meter.set_price("qwen", "3", "1", "3", effective_at=now + 120)
    assert meter.prices.current("qwen") == first
    assert meter.prices.current("qwen", now + 59.999) == first
    assert meter.prices.current("qwen", now + 60).input == 2_000_000_000
    assert meter.prices.current("qwen", now + 119.5).input == 2_000_000_000
    assert meter.prices.current("qwen", now + 120).input == 3_000_000_000
    assert meter.prices.current("qwen", now + 30) == first  # (back in time: found again)
    await meter.set_price("qwen", "4", "1", "4", effective_at=now + 90)  # refreshed: a version in between
    assert meter.prices.current("qwen", now + 100).input == 4_000_000_000
    assert meter.prices.current("qwen", now + 119).input == 4_000_000_000
