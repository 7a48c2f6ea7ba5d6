"""Batches of Redis commands in one round trip, for the request path on a single ``redis://`` node.

redis-py's pipeline costs, per command, a Python packer call, a response callback and a read under its own timeout
context; on the metering's group commits (dozens of scripts and commands per round trip) that was most of the
store's CPU per request. Here a batch is packed by hiredis (C), written at once, and its replies parsed by the
connection's own hiredis reader as its bytes arrive (an ``asyncio.Protocol``: no stream reader, one future per batch);
the socket timeout is a deadline watched by one sweep for every connection (``sweep.Sweep``), not a timer armed and
cancelled per batch. It is used only through :meth:`therouter.store.Store.send` and friends, which keep the
store's policy (breaker, errors as ``StoreUnavailable``); everything else still goes through redis-py.

Policy, as the store's: a connection that timed out, broke, or whose caller was cancelled mid-batch is closed, never
reused (its replies would belong to someone else); nothing is re-sent after a failure (a script may have run).
Callers wait up to ``pool_timeout`` for one of ``max_connections`` connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import NoScriptError, ResponseError

from therouter.sweep import Sweep

Command = tuple[Any, ...]
IDLE_SECONDS = 30.0  # an idle connection older than this is closed instead of reused (a server may drop it)
PER_COMMAND_S = 0.001  # added to the socket timeout per command of a batch
SWEEP = 0.05  # s between two sweeps of the batches waiting for replies (a timeout fires up to this late)


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


class _Conn(asyncio.Protocol):
    """One connection: its bytes go straight into one hiredis reader (kept for the connection's life), and the
    batch out on it gets its replies through one future, set once they are all in."""

    __slots__ = ("lost", "reader", "replies", "timeout", "transport", "used", "waiter", "want", "wire")

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8")
        self.replies: list[Any] = []
        self.want = 0  # replies the batch out on it waits for
        self.timeout = 0.0  # of each wait for more bytes
        self.waiter: asyncio.Future[list[Any]] | None = None
        self.lost = False
        self.used = 0.0  # loop time it was last given back

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports are not asyncio.Transport)

    def data_received(self, data: bytes) -> None:
        w = self.waiter
        if w is None:  # bytes nobody asked for: whatever they are, the connection is in doubt
            self._fail(ConnectionError("the store sent a reply nobody asked for"))
            return
        reader, replies = self.reader, self.replies
        reader.feed(data)
        try:
            r = reader.gets()
            while r is not False:
                replies.append(r)
                r = reader.gets()
        except hiredis.ProtocolError as e:
            self._fail(ConnectionError(f"the store sent a malformed reply ({e})"))
            return
        if len(replies) < self.want:  # progress: the next wait gets the full timeout
            self.wire.waiting.watch(self, self.wire.loop.time() + self.timeout)
            return
        self.waiter = None
        self.wire.waiting.unwatch(self)
        if len(replies) > self.want:
            self._fail(ConnectionError("the store sent more replies than commands"), w)
        elif not w.done():
            w.set_result(replies)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost fails the batch out on it, if any

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(ConnectionError("the store closed the connection"))

    def timed_out(self) -> None:
        self._fail(TimeoutError("the store did not answer in time"))

    def _fail(self, exc: Exception, w: asyncio.Future[list[Any]] | None = None) -> None:
        """The connection is in doubt: closed, and the batch out on it (if any) fails with ``exc``."""
        w, self.waiter = w or self.waiter, None
        self.close()
        if w is not None and not w.done():
            w.set_exception(exc)

    def usable(self, now: float) -> bool:
        t = self.transport
        return not self.lost and t is not None and not t.is_closing() and now - self.used < IDLE_SECONDS

    def close(self) -> None:
        self.lost = True
        self.wire.waiting.unwatch(self)
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes, n: int, timeout: float) -> asyncio.Future[list[Any]]:
        """Write a batch of ``n`` commands; the future gets their ``n`` replies (or the connection's failure)."""
        assert self.waiter is None and self.transport is not None
        self.replies, self.want, self.timeout = [], n, timeout
        w = self.waiter = self.wire.loop.create_future()
        self.transport.write(data)
        self.wire.waiting.watch(self, self.wire.loop.time() + timeout)
        return w


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: Sweep[_Conn] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def waiting(self) -> Sweep[_Conn]:
        """The connections waiting for replies, under their deadlines (one sweep, not a timer per batch)."""
        assert self._waiting is not None
        return self._waiting

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
            data = b"".join([hiredis.pack_command(c) for c in commands])
            # a batch may hold hundreds of scripts (a burst of admissions): Redis gets a little more time per command
            # before its first reply counts as late, as those commands one by one would each have had a timeout.
            # The timeout bounds each wait for more bytes, as redis-py's socket timeout does, not the whole batch.
            replies = await conn.send(data, len(commands), self.socket_timeout + len(commands) * PER_COMMAND_S)
            conn.used = self.loop.time()
            self._idle.append(conn)
            conn = None
            return [_reply_error(r) if isinstance(r, hiredis.ReplyError) else r for r in replies]
        finally:
            if conn is not None:
                conn.close()  # in an unknown state: never reused
            self._slots.release()

    async def _checkout(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the first call (or a new loop: the old one's connections are no use)
            idle, self._idle = self._idle, []
            for conn in idle:
                with contextlib.suppress(Exception):  # (its loop may be closed)
                    conn.close()
            self._loop = loop
            self._waiting = Sweep(loop, min(SWEEP, self.socket_timeout / 4), lambda conn, now: conn.timed_out())
        now = loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        if self._hello:
            try:
                for r in await conn.send(b"".join([hiredis.pack_command(c) for c in self._hello]), len(self._hello),
                                         self.socket_timeout):
                    if isinstance(r, hiredis.ReplyError):
                        raise ConnectionError(f"the store refused the connection: {str(r).split(' ', 1)[0]}")
            except BaseException:
                conn.close()
                raise
        return conn

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
