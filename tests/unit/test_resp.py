"""_resp: the request path's Redis batches -- the same commands redis-py would send, replies in order, error replies
as redis-py's exceptions, and a connection in doubt never reused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from therouter._resp import Commands, Wire
from therouter.redisproc import RedisProcess

CALLS: list[Callable[[Any], None]] = [
    lambda p: p.evalsha("a" * 40, 2, "k1", "k2", 1, "x"),
    lambda p: p.hset("h", "f", "v"),
    lambda p: p.hset("h", mapping={"a": 1, "b": "2"}),
    lambda p: p.hdel("h", "f", "g"),
    lambda p: p.pexpire("h", 1500),
    lambda p: p.sadd("s", "m"),
    lambda p: p.set("k", "v", ex=30),
    lambda p: p.set("k", "v", ex=30, nx=True),
    lambda p: p.zadd("z", {"inst": 1732900000123}),
    lambda p: p.xadd("feed", {"gen": "g", "rec": "{}"}, maxlen=1000, approximate=True),
]


@pytest.mark.parametrize("call", CALLS)
def test_recorded_commands_are_what_redis_py_sends(call: Callable[[Any], None]) -> None:
    ours = Commands()
    call(ours)
    pipe = aioredis.Redis().pipeline(transaction=False)
    call(pipe)
    theirs = pipe.command_stack[0][0]
    assert hiredis.pack_command(ours.items[0]) == hiredis.pack_command(tuple(theirs))


def wire(url: str, **kw: float) -> Wire:
    opts: dict[str, Any] = {"max_connections": 4, "socket_timeout": 1.0, "connect_timeout": 1.0,
                            "pool_timeout": 1.0, **kw}
    return Wire(url, **opts)


async def test_a_batch_answers_in_order_with_error_replies_in_place(redis_proc: RedisProcess) -> None:
    w = wire(redis_proc.url)
    try:
        replies = await w.execute([("SET", "resp:k", "é"), ("GET", "resp:k"), ("HSET", "resp:k", "f", "v"),
                                   ("EVALSHA", "0" * 40, 0), ("DEL", "resp:k")])
        assert replies[:2] == ["OK", "é"]
        assert isinstance(replies[2], ResponseError) and "WRONGTYPE" in str(replies[2])
        assert isinstance(replies[3], NoScriptError)
        assert replies[4] == 1
        assert await w.execute([("PING",)]) == ["PONG"]
        assert len(w._idle) == 1  # one connection, reused
    finally:
        await w.aclose()


async def test_a_connection_the_server_dropped_is_not_reused(redis_proc: RedisProcess) -> None:
    w = wire(redis_proc.url)
    admin = aioredis.Redis.from_url(redis_proc.url)
    try:
        [cid] = await w.execute([("CLIENT", "ID")])
        await admin.execute_command("CLIENT", "KILL", "ID", cid)
        await asyncio.sleep(0.05)  # the loop reads the EOF
        [again] = await w.execute([("CLIENT", "ID")])
        assert again != cid
    finally:
        await admin.aclose()
        await w.aclose()


async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    proc = RedisProcess(tmp_path / "redis", appendonly=False).start()
    try:
        admin = aioredis.Redis.from_url(proc.url)
        await admin.config_set("requirepass", "s3cret")
        await admin.aclose()
        base = proc.url.rsplit("/", 1)[0].replace("redis://", "redis://:s3cret@")
        w = wire(base + "/3")
        try:
            assert await w.execute([("SET", "k", "in-3")]) == ["OK"]
            auth = aioredis.Redis.from_url(base + "/3", decode_responses=True)
            assert await auth.get("k") == "in-3"
            await auth.aclose()
        finally:
            await w.aclose()
        bad = wire(proc.url.replace("redis://", "redis://:wrong@"))
        with pytest.raises(ConnectionError, match="refused the connection"):
            await bad.execute([("PING",)])
        await bad.aclose()
    finally:
        proc.stop()


async def test_a_silent_server_times_out_and_its_connection_is_dropped() -> None:
    accepted: list[socket.socket] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    loop = asyncio.get_running_loop()

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(server)
            accepted.append(conn)

    acceptor = asyncio.create_task(accept())
    w = wire(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            await w.execute([("PING",)])
        assert w._idle == []  # in an unknown state: closed, not pooled
        with pytest.raises(TimeoutError):
            await w.execute([("PING",)])
        assert len(accepted) == 2  # a new connection the second time
    finally:
        acceptor.cancel()
        await w.aclose()
        for c in accepted:
            c.close()
        server.close()


async def test_the_socket_timeout_bounds_each_wait_not_the_whole_batch() -> None:
    """A big batch may take Redis longer than the socket timeout to answer in full: as long as replies keep coming,
    it is not an outage (here three replies 0.15 s apart against a 0.2 s timeout)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        for _ in range(3):
            await asyncio.sleep(0.15)
            writer.write(b"+PONG\r\n")
            await writer.drain()
        await reader.read(1)  # until the client closes

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = wire(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2)
    try:
        assert await w.execute([("PING",), ("PING",), ("PING",)]) == ["PONG", "PONG", "PONG"]
    finally:
        await w.aclose()
        server.close()
        await server.wait_closed()


async def _scripted_server(answers: list[bytes]) -> tuple[asyncio.Server, int, list[int]]:
    """A fake node: the n-th batch it reads is answered with ``answers[n]`` (split in two writes, so a reply may
    arrive in pieces); after the last, one more read. Returns the server, its port and the connections it saw."""
    seen: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen))
        for answer in answers:
            if not await reader.read(65536):
                return
            writer.write(answer[:3])
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(answer[3:])
            await writer.drain()
        await reader.read(65536)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_replies_in_pieces_and_batches_share_one_reader() -> None:
    server, port, seen = await _scripted_server([b"+PONG\r\n:12\r\n", b"$5\r\nhello\r\n", b"*2\r\n$1\r\na\r\n:1\r\n"])
    w = wire(f"redis://127.0.0.1:{port}/0")
    try:
        assert await w.execute([("PING",), ("INCR", "x")]) == ["PONG", 12]
        assert await w.execute([("GET", "x")]) == ["hello"]
        assert await w.execute([("X",)]) == [["a", 1]]
        assert seen == [0]  # one connection for the three batches
    finally:
        await w.aclose()
        server.close()


async def test_bytes_nobody_asked_for_put_the_connection_out_of_use() -> None:
    """A reply more than the batch asked for (or one arriving while the connection is idle) cannot be anyone's: the
    batch fails as a broken connection, and the next one gets a new connection."""
    server, port, seen = await _scripted_server([b"+OK\r\n+EXTRA\r\n"])
    w = wire(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(ConnectionError, match="more replies"):
            await w.execute([("SET", "k", "v")])
        assert w._idle == []
        assert await w.execute([("GET", "k"), ("GET", "k")]) == ["OK", "EXTRA"]  # (the fake's only answer)
        assert len(seen) == 2  # ... on a new connection
    finally:
        await w.aclose()
        server.close()


async def test_a_malformed_reply_is_a_broken_connection() -> None:
    server, port, _ = await _scripted_server([b"?what\r\n"])
    w = wire(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(ConnectionError, match="malformed"):
            await w.execute([("PING",)])
        assert w._idle == []
    finally:
        await w.aclose()
        server.close()


def test_a_wire_used_from_a_new_event_loop_opens_new_connections(redis_proc: RedisProcess) -> None:
    w = wire(redis_proc.url)
    assert asyncio.run(w.execute([("PING",)])) == ["PONG"]
    assert len(w._idle) == 1

    async def again() -> None:
        assert await w.execute([("PING",)]) == ["PONG"]  # (the first loop's connection is of no use here)
        assert len(w._idle) == 1
        await w.aclose()

    asyncio.run(again())
