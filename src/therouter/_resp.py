"""Batches of Redis commands in one round trip, for the request path on a single ``redis://`` node.

redis-py's pipeline costs, per command, a Python packer call, a response callback and a read under its own timeout
context; on the metering's group commits (dozens of scripts and commands per round trip) that was most of the
store's CPU per request. Here a batch is packed by hiredis (C), written at once, and its replies read by hiredis'
reader under one deadline. It is used only through :meth:`therouter.store.Store.send` and friends, which keep the
store's policy (breaker, errors as ``StoreUnavailable``); everything else still goes through redis-py.

Policy, as the store's: a connection that timed out, broke, or whose caller was cancelled mid-batch is closed, never
reused (its replies would belong to someone else); nothing is re-sent after a failure (a script may have run).
Callers wait up to ``pool_timeout`` for one of ``max_connections`` connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import NoScriptError, ResponseError

Command = tuple[Any, ...]
IDLE_SECONDS = 30.0  # an idle connection older than this is closed instead of reused (a server may drop it)
PER_COMMAND_S = 0.001  # added to the socket timeout per command of a batch


class Commands:
    """Records commands with the redis-py method names and arguments the metering uses, so one ``extra(pipe)``
    callback serves redis-py's pipelines (a cluster) and :class:`Wire` batches alike."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Command] = []

    def __len__(self) -> int:
        return len(self.items)

    def execute_command(self, *args: Any) -> None:
        self.items.append(args)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        self.items.append(("EVALSHA", sha, numkeys, *keys_and_args))

    def hset(self, name: str, key: str | None = None, value: Any = None,
             mapping: dict[str, Any] | None = None) -> None:
        pairs: list[Any] = [] if key is None else [key, value]
        for k, v in (mapping or {}).items():
            pairs += [k, v]
        self.items.append(("HSET", name, *pairs))

    def hdel(self, name: str, *keys: str) -> None:
        self.items.append(("HDEL", name, *keys))

    def pexpire(self, name: str, ms: int) -> None:
        self.items.append(("PEXPIRE", name, ms))

    def sadd(self, name: str, *values: Any) -> None:
        self.items.append(("SADD", name, *values))

    def set(self, name: str, value: Any, ex: int | None = None, nx: bool = False) -> None:
        self.items.append(("SET", name, value, *(("NX",) if nx else ()), *(("EX", ex) if ex is not None else ())))

    def zadd(self, name: str, mapping: dict[str, Any]) -> None:
        pairs: list[Any] = []
        for member, score in mapping.items():
            pairs += [score, member]
        self.items.append(("ZADD", name, *pairs))

    def xadd(self, name: str, fields: dict[str, Any], maxlen: int | None = None, approximate: bool = True) -> None:
        trim: tuple[Any, ...] = ("MAXLEN", "~" if approximate else "=", maxlen) if maxlen is not None else ()
        flat: list[Any] = []
        for k, v in fields.items():
            flat += [k, v]
        self.items.append(("XADD", name, *trim, "*", *flat))


def _reply_error(e: hiredis.ReplyError) -> ResponseError:
    text = str(e)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


class _Conn:
    __slots__ = ("reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.used = time.monotonic()

    def close(self) -> None:
        self.writer.close()


class Wire:
    """A small pool of plain-TCP connections to one Redis node, each used by one batch at a time."""

    def __init__(self, url: str, *, max_connections: int, socket_timeout: float, connect_timeout: float,
                 pool_timeout: float) -> None:
        opts = parse_url(url)
        self.host, self.port = opts.get("host", "127.0.0.1"), int(opts.get("port", 6379))
        self._hello: list[Command] = []
        if opts.get("password"):
            self._hello.append(("AUTH", *((opts["username"],) if opts.get("username") else ()), opts["password"]))
        if opts.get("db"):
            self._hello.append(("SELECT", int(opts["db"])))
        self.socket_timeout, self.connect_timeout, self.pool_timeout = socket_timeout, connect_timeout, pool_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """The commands in one round trip: their replies in order, an error reply as its ``ResponseError`` (the
        others ran). A broken or slow connection raises (``OSError`` / ``TimeoutError``): the outcome of every
        command is then unknown."""
        if self._slots.locked():  # (a timer only when there is a wait)
            try:
                async with asyncio.timeout(self.pool_timeout):  # (not wait_for: it can drop an acquired permit)
                    await self._slots.acquire()
            except TimeoutError:
                raise TimeoutError("no connection to the store became free in time") from None
        else:
            await self._slots.acquire()
        conn: _Conn | None = None
        try:
            conn = await self._checkout()
            conn.writer.write(b"".join([hiredis.pack_command(c) for c in commands]))
            # a batch may hold hundreds of scripts (a burst of admissions): Redis gets a little more time per command
            # before its first reply counts as late, as those commands one by one would each have had a timeout
            replies = await self._read(conn, len(commands), self.socket_timeout + len(commands) * PER_COMMAND_S)
            conn.used = time.monotonic()
            self._idle.append(conn)
            conn = None
            return [_reply_error(r) if isinstance(r, hiredis.ReplyError) else r for r in replies]
        finally:
            if conn is not None:
                conn.close()  # in an unknown state: never reused
            self._slots.release()

    async def _checkout(self) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.used < IDLE_SECONDS and not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.close()
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        conn = _Conn(reader, writer)
        if self._hello:
            try:
                writer.write(b"".join([hiredis.pack_command(c) for c in self._hello]))
                for r in await self._read(conn, len(self._hello), self.socket_timeout):
                    if isinstance(r, hiredis.ReplyError):
                        raise ConnectionError(f"the store refused the connection: {str(r).split(' ', 1)[0]}")
            except BaseException:
                conn.close()
                raise
        return conn

    @staticmethod
    async def _read(conn: _Conn, n: int, timeout: float) -> list[Any]:
        """``n`` replies. ``timeout`` bounds each wait for more bytes, as redis-py's socket timeout does, not the
        whole batch: a big batch (a burst of admissions) may take Redis longer than that to answer in full."""
        parser = hiredis.Reader(encoding="utf-8")
        replies: list[Any] = []
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout) as deadline:
            while True:
                try:
                    r = parser.gets()
                    while r is not False:
                        replies.append(r)
                        if len(replies) == n:
                            return replies
                        r = parser.gets()
                except hiredis.ProtocolError as e:
                    raise ConnectionError(f"the store sent a malformed reply ({e})") from None
                data = await conn.reader.read(65536)
                if not data:
                    raise ConnectionError("the store closed the connection")
                parser.feed(data)
                deadline.reschedule(loop.time() + timeout)  # progress: the next wait gets the full timeout

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
