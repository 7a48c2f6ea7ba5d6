"""Shared fixtures: a private redis-server on a free loopback port for the whole session (never the machine's), and a
private three-node Redis Cluster, started the first time a test asks for it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.redis_cluster import RedisClusterProcess, find_redis_cli
from therouter.config import StoreConfig
from therouter.redisproc import RedisProcess, find_redis_server
from therouter.store import Store


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    if find_redis_server() is None:  # a missing service is a failure, never a skip
        pytest.fail("redis-server is not installed: run the README's test command (it installs it)")
    proc = RedisProcess(tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    if find_redis_server() is None or find_redis_cli() is None:  # a failure, never a skip
        pytest.fail("redis-server / redis-cli are not installed: run ./scripts/test.sh (it installs them)")
    cluster = RedisClusterProcess(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def key_prefix() -> str:
    """A fresh namespace per test, so tests never see each other's data."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def store(redis_proc: RedisProcess, key_prefix: str) -> AsyncIterator[Store]:
    s = Store(StoreConfig(redis_url=redis_proc.url, key_prefix=key_prefix))
    yield s
    await s.aclose()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
