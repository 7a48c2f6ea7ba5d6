"""Drains and cooldowns shared through a store (in memory here; the real Redis in the integration tests)."""

from __future__ import annotations

import asyncio

from tests.routing._helpers import FakeClock
from therouter.errors import StoreUnavailable
from therouter.routing.options import RoutingOptions
from therouter.routing.shared import SharedSync
from therouter.routing.state import RoutingState

DEPS = [("ds", "m"), ("v", "m")]


class MemStore:
    def __init__(self) -> None:
        self.data: dict[str, tuple[str, float]] = {}
        self.down = False
        self.gets = 0

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("down")

    async def route_get(self, names: list[str]) -> list[str | None]:
        self._check()
        self.gets += 1
        return [self.data[n][0] if n in self.data else None for n in names]

    async def route_set(self, name: str, value: str, ttl: float) -> None:
        self._check()
        self.data[name] = (value, ttl)

    async def route_delete(self, name: str) -> None:
        self._check()
        self.data.pop(name, None)


def worker(store: MemStore, clock: FakeClock, wall: list[float]) -> RoutingState:
    state = RoutingState(RoutingOptions(sync_interval=1.0), clock=clock)
    SharedSync(state, store, ["ds", "v"], DEPS, wall=lambda: wall[0])
    return state


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_drain_on_one_worker_reaches_the_other() -> None:
    store, clock, wall = MemStore(), FakeClock(), [1_000_000.0]
    w1, w2 = worker(store, clock, wall), worker(store, clock, wall)
    w1.set_drained("ds", True)
    assert await w1.sync.flush()  # type: ignore[union-attr]
    _value, ttl = store.data["drain:ds"]
    assert ttl == RoutingOptions().drain_ttl  # every key has a TTL
    assert not w2.drained("ds")
    assert await w2.sync.refresh()  # type: ignore[union-attr]
    assert w2.drained("ds")
    w2.set_drained("ds", False)
    await w2.sync.flush()  # type: ignore[union-attr]
    await w1.sync.refresh()  # type: ignore[union-attr]
    assert not w1.drained("ds") and "drain:ds" not in store.data


async def test_cooldown_is_shared_with_its_remaining_time() -> None:
    store, clock, wall = MemStore(), FakeClock(), [1_000_000.0]
    w1, w2 = worker(store, clock, wall), worker(store, clock, wall)
    w1.set_cooldown(("ds", "m"), 10)
    await settle()  # written in the background
    assert store.data["cool:ds|m"][1] == 10
    wall[0] += 4
    await w2.sync.refresh()  # type: ignore[union-attr]
    assert 5.9 < w2.cooldown_left(("ds", "m")) <= 6.0


async def test_poke_refreshes_at_most_once_per_interval() -> None:
    store, clock, wall = MemStore(), FakeClock(), [1_000_000.0]
    w = worker(store, clock, wall)
    for _ in range(10):
        w.sync.poke()  # type: ignore[union-attr]
        await settle()
    assert store.gets == 1
    clock.advance(1.0)
    w.sync.poke()  # type: ignore[union-attr]
    await settle()
    assert store.gets == 2


async def test_store_outage_keeps_local_state_and_retries_the_write() -> None:
    store, clock, wall = MemStore(), FakeClock(), [1_000_000.0]
    w = worker(store, clock, wall)
    store.down = True
    w.set_drained("v", True)
    assert not await w.sync.flush()  # type: ignore[union-attr]
    assert w.drained("v")  # routing goes on from the local state
    w.set_cooldown(("ds", "m"), 5)
    await settle()
    assert not await w.sync.refresh()  # type: ignore[union-attr]
    assert w.drained("v") and w.cooldown_left(("ds", "m")) > 0
    store.down = False
    assert await w.sync.refresh()  # type: ignore[union-attr]
    assert "drain:v" in store.data and w.drained("v")  # the pending drain was written, not overwritten by "absent"


async def test_real_store_keys_are_namespaced_with_ttls(store: object) -> None:
    from therouter.store import Store

    assert isinstance(store, Store)
    clock = FakeClock()
    w1 = RoutingState(RoutingOptions(), clock=clock)
    w2 = RoutingState(RoutingOptions(), clock=clock)
    s1 = SharedSync(w1, store, ["ds", "v"], DEPS)
    s2 = SharedSync(w2, store, ["ds", "v"], DEPS)
    w1.set_drained("ds", True)
    assert await s1.flush()
    w1.set_cooldown(("v", "m"), 30)
    await asyncio.sleep(0.05)
    keys = sorted(await store.redis.keys(store.prefix + "*"))
    assert keys == [store.prefix + "{route}:cool:v|m", store.prefix + "{route}:drain:ds"]
    for k in keys:
        assert await store.redis.pttl(k) > 0
    assert await s2.refresh()
    assert w2.drained("ds") and 29 < w2.cooldown_left(("v", "m")) <= 30
    assert await s2.clear_cooldowns("v")
    w1.set_drained("ds", False)
    await s1.flush()
    assert await store.redis.keys(store.prefix + "*") == []
