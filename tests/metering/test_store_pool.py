"""The store under a burst bigger than its pool, on one server and on a cluster: callers wait for a connection (up to
pool_timeout) instead of failing, so a burst never reads as an outage."""

from __future__ import annotations

import asyncio

import pytest

from tests.metering.conftest import Backend
from therouter.config import StoreConfig
from therouter.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing(backend: Backend, key_prefix: str) -> None:
    store = Store(StoreConfig(redis_url=backend.url, key_prefix=key_prefix, max_connections=2, pool_timeout=10))
    key = store.k("burst")

    async def slow_incr() -> int:
        # a short server-side pause, so the operations really overlap and the pool runs out
        return int(await store.redis.eval("redis.call('INCR', KEYS[1]) return redis.call('GET', KEYS[1])", 1, key))

    try:
        results = await asyncio.gather(*(store.call(slow_incr) for _ in range(60)), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert sorted(results) == list(range(1, 61))  # type: ignore[type-var]
        assert store.breaker.failures == 0
    finally:
        await store.aclose()
