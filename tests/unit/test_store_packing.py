"""The store's connection packs commands with hiredis: byte for byte what redis-py's own packer sends."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from therouter.config import StoreConfig
from therouter.store import Store, _Connection

COMMANDS = [
    ("EVALSHA", "a" * 40, 2, "p:{k:key_1}:per:total", "p:{k:key_1}:resv", 1732900000.123, -1, 0, b"\x00raw", "é ü"),
    ("SCRIPT LOAD", "return redis.call('PING')"),
    ("SET", "k", "v" * 10_000, "EX", 30),
    ("HSET", "h", "f", 2.5e-07, "g", 10**20),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_hiredis_packing_equals_redis_pys(args: tuple[object, ...]) -> None:
    ours, theirs = _Connection(), Connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    assert b"".join(ours.pack_commands([args, args])) == b"".join(theirs.pack_commands([args, args]))


def test_an_argument_hiredis_refuses_gets_redis_pys_own_error() -> None:
    with pytest.raises(DataError):
        _Connection().pack_command("SET", "k", True)


def test_only_plain_tcp_urls_get_the_packing_connection() -> None:
    assert Store(StoreConfig(redis_url="redis://127.0.0.1:1/0")).redis.connection_pool.connection_class is _Connection
    tls = Store(StoreConfig(redis_url="rediss://127.0.0.1:1/0")).redis.connection_pool.connection_class
    assert tls is not _Connection and tls.__name__ == "SSLConnection"
