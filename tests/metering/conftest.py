"""Fixtures for the metering tests: settings, an injectable clock, a started Meter on the per-test key prefix, and a
key factory. The store runs every test twice: on the session's single redis-server and on its three-node Redis
Cluster (`backend`), so the whole contract holds on both."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.metering._helpers import FakeClock, make_settings
from tests.redis_cluster import RedisClusterProcess
from therouter.config import Settings, StoreConfig
from therouter.keys import KeyRecord
from therouter.metering import Meter, MeterOptions
from therouter.redisproc import RedisProcess
from therouter.store import Store


@dataclass
class Backend:
    """Where the store lives: one redis-server or a Redis Cluster."""

    kind: str
    url: str
    single: RedisProcess | None = None
    cluster: RedisClusterProcess | None = None

    def node_url(self, key: str) -> str:
        """A plain redis:// URL of the server that holds ``key`` (to stall or inspect that very node)."""
        node = self.single if self.cluster is None else self.cluster.node_for(key)
        assert node is not None
        return node.url


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest, redis_proc: RedisProcess) -> Backend:
    if request.param == "single":
        return Backend("single", redis_proc.url, single=redis_proc)
    cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
    return Backend("cluster", cluster.url, cluster=cluster)


@pytest.fixture
async def store(request: pytest.FixtureRequest, backend: Backend, key_prefix: str) -> AsyncIterator[Store]:
    # @pytest.mark.store_config(...): a test may set the store's timeouts. By default they are 1 s, not the product's
    # 0.25 s: late in a full run the test process itself stalls past 0.25 s now and then (three failures in seven
    # full runs, each a StoreUnavailable(TimeoutError) in a test about something else), and a stall of a busy test
    # process must not be mistaken for an outage. The stall test (test_settle_safety) stalls Redis for 2.5 s.
    marker = request.node.get_closest_marker("store_config")
    timeouts = {"socket_timeout": 1.0, "connect_timeout": 1.0, **(marker.kwargs if marker else {})}
    s = Store(StoreConfig(redis_url=backend.url, key_prefix=key_prefix, **timeouts))
    assert s.cluster == (backend.kind == "cluster")
    yield s
    await s.aclose()


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def options() -> MeterOptions:
    return MeterOptions(tick=3600)  # background pass off: tests call maintain() themselves


@pytest.fixture
async def meter(store: Store, settings: Settings, clock: FakeClock, options: MeterOptions,
                tmp_path: Path) -> AsyncIterator[Meter]:
    m = Meter(store, settings, tmp_path / "journal", clock=clock, options=options)
    await m.start()
    yield m
    await m.aclose()


@pytest.fixture
def make_key() -> Callable[..., KeyRecord]:
    def make(**limits: Any) -> KeyRecord:
        return KeyRecord(id="key_" + uuid.uuid4().hex[:12], name="test", hint="tr-xxxx...abcd", **limits)

    return make
