"""The store's breaker against a real redis-server that refuses writes: OOM (maxmemory reached) and READONLY (turned
into a replica of a master that does not exist) are store outages -- StoreUnavailable, counted by the breaker -- not
command errors that would reach the client as a 500. A private redis-server, so the session's is never disturbed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from therouter.config import StoreConfig
from therouter.errors import StoreUnavailable
from therouter.redisproc import RedisProcess, free_port
from therouter.store import Store, StoreBreaker, outage_reply

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def private_store(tmp_path: Path) -> AsyncIterator[tuple[Store, RedisProcess]]:
    proc = RedisProcess(tmp_path / "redis", appendonly=False).start()
    store = Store(StoreConfig(redis_url=proc.url, key_prefix="t:"), breaker=StoreBreaker(threshold=2))
    try:
        yield store, proc
    finally:
        await store.aclose()
        proc.stop()


async def test_outage_replies_are_recognised_after_redis_py_stripped_the_prefix() -> None:
    # what redis-py raises for "-OOM command not allowed ..." and "-READONLY You can't write ...": prefix gone
    assert outage_reply(OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")) == "OOM"
    assert outage_reply(ReadOnlyError("You can't write against a read only replica.")) == "READONLY"
    assert outage_reply(MasterDownError("Link with MASTER is down")) in ("MASTERDOWN", "CLUSTERDOWN")
    assert outage_reply(ResponseError("BUSY Redis is busy running a script.")) == "BUSY"  # not mapped: prefix kept
    assert outage_reply(ResponseError("NOREPLICAS Not enough good replicas to write.")) == "NOREPLICAS"
    assert outage_reply(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")) is None
    assert outage_reply(ResponseError("Error running script (call to f_x): @user_script:1: boom")) is None


async def test_loading_is_a_store_outage() -> None:
    store = Store(StoreConfig(redis_url="redis://127.0.0.1:1/0"))  # never connects: the call below raises itself

    async def loading() -> None:
        raise BusyLoadingError("Redis is loading the dataset in memory")

    try:
        with pytest.raises(StoreUnavailable):
            await store.call(loading)
        assert store.breaker.failures == 1
    finally:
        await store.aclose()


async def test_oom_is_a_store_outage(private_store: tuple[Store, RedisProcess]) -> None:
    store, _ = private_store
    r = store.redis
    await r.config_set("maxmemory", 1)
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable) as e:
                await store.call(lambda: r.set("t:x", "1"))
            assert "OOM" in e.value.message
        assert store.breaker.open  # two outages in a row (threshold 2)
        script = r.register_script("redis.call('SET', KEYS[1], 'v') return 1")
        store.breaker.success()
        with pytest.raises(StoreUnavailable):  # a write inside a Lua script is refused the same way
            await store.call(lambda: script(keys=["t:y"]))
    finally:
        await r.config_set("maxmemory", 0)
    store.breaker.success()
    assert await store.call(lambda: r.set("t:x", "1"))


async def test_readonly_replica_is_a_store_outage(private_store: tuple[Store, RedisProcess]) -> None:
    store, _ = private_store
    r = store.redis
    await r.set("t:kept", "1")
    await r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master nobody runs: writes refused
    try:
        with pytest.raises(StoreUnavailable) as e:
            await store.call(lambda: r.set("t:x", "1"))
        assert "READONLY" in e.value.message and store.breaker.failures == 1
        with pytest.raises(StoreUnavailable):
            await store.create_key("refused")  # a MULTI/EXEC pipeline: the same
        assert store.breaker.open
    finally:
        await r.execute_command("REPLICAOF", "NO", "ONE")
    store.breaker.success()
    assert await store.call(lambda: r.get("t:kept")) == "1"


async def test_a_command_error_is_not_an_outage(private_store: tuple[Store, RedisProcess]) -> None:
    store, _ = private_store
    r = store.redis
    await r.set("t:s", "text")
    with pytest.raises(ResponseError):
        await store.call(lambda: r.hincrby("t:s", "f", 1))  # WRONGTYPE: our bug, not the store's outage
    assert store.breaker.failures == 0
