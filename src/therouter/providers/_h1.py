"""A lean HTTP/1.1 upstream transport on raw asyncio: ``loop.create_connection`` + an ``asyncio.Protocol`` that feeds
httptools' (llhttp's) response parser.

Why not aiohttp's client: per request it builds a CIMultiDict, starts a task to write the body, arms timers and runs
tracing hooks, about a seventh of the gateway's CPU under load. Here a request is one ``transport.write`` and a wait on
one Future; the body comes back as the protocol buffered it, one Future per wait, no timer per chunk.

Contract (the same as :class:`~therouter.providers._http.AiohttpTransport`):

- ``send`` returns once the status line and headers are in; ``headers`` is a plain dict with lowercase names (repeated
  headers joined with ``", "``). Redirects are not followed; no user-agent is sent; content-encoding is left to
  ``UpstreamResponse.chunks``.
- ``raw_chunks`` yields body bytes as they arrive (chunked transfer-encoding undone by the parser, content-length, or
  close-delimited). A fully read keep-alive response returns its connection to the idle pool; ``close()`` on a
  response not fully read closes the connection, which cancels the upstream's work.
- Flow control: when more than ``_HIGH_WATER`` bytes are buffered and not consumed, the socket stops being read until
  the reader has taken them, so a slow reader never makes us buffer an upstream stream without bound.

The pool is per transport (one per provider), keyed by (scheme, host, port): idle connections are reused newest first
(LIFO) and dropped when the server closed them or they idled for more than ``_IDLE_TTL`` seconds; at most
``max_connections`` are open at once and callers beyond that wait in FIFO order for the next released or closed slot.
A reused connection that dies before any response byte arrived, within ``_STALE_WINDOW`` seconds of the request
being written, is the stale keep-alive race (the server closed it as we wrote): the request is sent once more on a
fresh connection, as every HTTP client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

import httptools

from therouter.errors import UpstreamBadResponse, UpstreamConnectError, UpstreamTimeout
from therouter.providers._http import (
    _CLOSED,
    _CONNECT,
    _CONNECT_TIMEOUT,
    _NO_ANSWER,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    _broke,
    _oserror,
    _wire_headers,
)
from therouter.sweep import Sweep

_HIGH_WATER = 256 * 1024  # buffered, unconsumed body bytes above which the socket is no longer read
_IDLE_TTL = 15.0  # seconds an idle keep-alive connection may wait for reuse
_STALE_WINDOW = 0.5  # seconds after the write within which a silent close of a reused connection counts as stale
SWEEP = 0.05  # seconds between two sweeps of the exchanges waiting for headers (a deadline fires up to this late)
_BAD = "The provider sent a malformed HTTP response."
_SKIP = frozenset(("host", "content-length", "transfer-encoding", "connection"))  # ours to set

PoolKey = tuple[str, str, int]


class _ConnClosed(Exception):
    """The server closed the connection, or it broke, before the response headers were complete."""


@lru_cache(maxsize=512)
def _target(url: str) -> tuple[PoolKey, str, str]:
    """(pool key, request target, Host header value) of an absolute http(s) URL."""
    u = urlsplit(url)
    scheme = u.scheme.lower()
    if scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url[:100]!r}")
    default = 443 if scheme == "https" else 80
    port = u.port or default
    host = u.hostname
    shown = f"[{host}]" if ":" in host else host
    if port != default:
        shown = f"{shown}:{port}"
    path = u.path or "/"
    if u.query:
        path = f"{path}?{u.query}"
    return (scheme, host, port), path, shown


class _Conn(asyncio.Protocol):
    """One upstream connection and the response currently being read from it."""

    def __init__(self, pool: _Pool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False  # connection_lost ran
        self.freed = False  # its pool slot was given back
        self.idle_since = 0.0
        self.reused = False
        self.paused = False
        self.active = False  # a request is out on it (bytes while idle are a protocol violation)
        self.waiter: asyncio.Future[None] | None = None
        self._begin()

    def _begin(self) -> None:
        """Fresh per-response state."""
        self.received = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.body: list[bytes] = []
        self.buffered = 0
        self.sent_at = 0.0
        self.timed_out = False

    # ---- asyncio.Protocol -----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport instances

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.complete or self.error is not None or not self.active:
            # bytes nobody asked for (after a complete response, or on an idle connection): never reusable
            self.error = self.error or _ConnClosed("unexpected bytes after the response")
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.error = httptools.HttpParserError("the provider switched protocols")
            self.close()
        except httptools.HttpParserError as e:
            self.error = e
            self.close()
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.headers_done and not self.complete and self.error is None:
            if self._close_delimited():
                self.complete = True  # the EOF is the end of the body
                self.keep_alive = False
            else:
                self.error = exc or _ConnClosed("connection closed before the body was complete")
        elif not self.headers_done and self.error is None:
            self.error = exc or _ConnClosed("connection closed before the response headers")
        self.pool.forget(self)
        self._wake()

    # ---- httptools callbacks (they must not raise) -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        k = name.decode("latin-1").lower()
        v = value.decode("latin-1").strip()
        old = self.headers.get(k)
        self.headers[k] = v if old is None else f"{old}, {v}"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers = {}
            return
        self.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if not self.headers_done:
            return  # the end of an interim (1xx) answer
        self.complete = True
        self.keep_alive = bool(self.parser.should_keep_alive())

    # ---- used by the transport and the response --------------------------------------------------------------------

    def _close_delimited(self) -> bool:
        h = self.headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        """Until the protocol has something new (headers, body bytes, the end, an error)."""
        w = self.waiter = self.pool.loop.create_future()
        try:
            await w
        finally:
            self.waiter = None

    def take(self) -> bytes:
        """All buffered body bytes, and reading resumed if it was paused."""
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def _timeout(self) -> None:
        self.timed_out = True
        self._wake()

    def usable(self, now: float) -> bool:
        t = self.transport
        return (not self.lost and t is not None and not t.is_closing() and self.error is None
                and now - self.idle_since <= _IDLE_TTL)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.pool.forget(self)


class _H1Response(UpstreamResponse):
    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self.status = conn.status
        self.headers = conn.headers

    async def raw_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while True:
            if conn.body:
                yield conn.take()
                continue
            if conn.complete:
                self._conn = None
                conn.pool.release(conn)
                return
            if conn.error is not None:
                e = conn.error
                self._conn = None
                conn.close()
                raise _broke(e)
            await conn.wait()

    def buffered(self) -> bool:
        conn = self._conn
        return conn is None or conn.complete

    def ready(self) -> bool:
        conn = self._conn
        if conn is not None and self.headers.get("content-encoding", "identity").strip().lower() != "identity":
            return False  # compressed bytes may decode to nothing yet: a read could still wait
        return conn is None or bool(conn.body) or conn.complete or conn.error is not None

    async def close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            if conn.complete and not conn.body:
                conn.pool.release(conn)
            else:
                conn.close()  # not fully read: dropping the connection cancels the upstream's work


class _Pool:
    """The connections of one transport: idle ones per key (LIFO), a count of open ones, FIFO waiters for a slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.limit = limit
        # exchanges waiting for response headers, under their deadline (one sweep, not a timer per exchange)
        self.waiting: Sweep[_Conn] = Sweep(loop, SWEEP, lambda conn, now: conn._timeout())
        self.open = 0
        self.idle: dict[PoolKey, list[_Conn]] = {}
        self.waiters: deque[tuple[PoolKey, asyncio.Future[_Conn | None]]] = deque()
        self.conns: set[_Conn] = set()

    async def acquire(self, key: PoolKey) -> _Conn | None:
        """A live idle connection for ``key``, or None: the caller owns a slot and opens a connection in it
        (and gives the slot back with :meth:`free_slot` if that fails)."""
        ready, conn = self.acquire_now(key)
        return conn if ready else await self.wait(key)

    def acquire_now(self, key: PoolKey) -> tuple[bool, _Conn | None]:
        """:meth:`acquire` when it needs no wait: (True, a connection or None), else (False, None)."""
        idle = self.idle.get(key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.usable(now):
                    conn.reused = True
                    return True, conn
                conn.close()
        if self.open < self.limit and not self.waiters:
            self.open += 1
            return True, None
        return False, None

    async def wait(self, key: PoolKey) -> _Conn | None:
        """Queue (FIFO) for the next connection of ``key`` released, or the next slot freed."""
        fut: asyncio.Future[_Conn | None] = self.loop.create_future()
        self.waiters.append((key, fut))
        self._close_other_idle(key)  # an idle connection to another host makes room for the first waiter
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a connection or slot just as we were cancelled: pass it on
                got = fut.result()
                if got is None:
                    self.free_slot()
                else:
                    got.keep_alive = True  # as it was released: idle and reusable
                    self.release(got)
            else:
                with contextlib.suppress(ValueError):  # a timed-out waiter leaves the queue (bounded under overload)
                    self.waiters.remove((key, fut))
            raise

    def _close_other_idle(self, key: PoolKey) -> bool:
        """Close the oldest idle connection of another key: its slot goes to the first waiter."""
        oldest: _Conn | None = None
        for k, conns in self.idle.items():
            if k != key and conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        oldest.close()
        return True

    def new(self, key: PoolKey) -> _Conn:
        conn = _Conn(self, key)
        self.conns.add(conn)
        return conn

    def release(self, conn: _Conn) -> None:
        """A response was fully read: the connection is kept for reuse (or handed to a waiter), or closed."""
        if not conn.keep_alive or conn.lost or conn.body or conn.transport is None or conn.transport.is_closing():
            conn.close()
            return
        conn._begin()
        conn.active = False
        conn.idle_since = time.monotonic()
        while self.waiters:
            key, fut = self.waiters.popleft()
            if fut.done():
                continue
            if key == conn.key:
                conn.reused = True
                fut.set_result(conn)
                return
            self.waiters.appendleft((key, fut))
            conn.close()  # the next waiter wants another host: this connection's slot goes to it
            return
        self.idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Conn) -> None:
        """The connection is closed (or closing): out of the idle list, and its slot freed once."""
        if conn.freed:
            return
        conn.freed = True
        self.conns.discard(conn)
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self.free_slot()

    def free_slot(self) -> None:
        while self.waiters:
            _, fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter as it is: open stays the same
                return
        self.open -= 1

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.close()
        while self.waiters:
            _, fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(UpstreamConnectError(_CONNECT, detail="the transport was closed"))


class H1Transport(Transport):
    def __init__(self, max_connections: int = 512, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max = max_connections
        self._pool: _Pool | None = None
        self._ssl = ssl_context  # https: the system's trust store (ssl.create_default_context) unless given

    def _get(self) -> _Pool:
        pool = self._pool
        if pool is None:  # created lazily inside the running loop
            pool = self._pool = _Pool(asyncio.get_running_loop(), self._max)
        return pool

    def _request_bytes(self, req: UpstreamRequest, target: str, host: str) -> bytes:
        lines = [f"{req.method} {target} HTTP/1.1\r\nhost: {host}\r\n"]
        for k, v in _wire_headers(req).items():
            if k.lower() in _SKIP:
                continue
            if "\n" in v or "\r" in v or "\n" in k or "\r" in k:
                raise UpstreamConnectError("The request to the provider could not be built.",
                                           detail=f"line break in header {k[:40]!r}")
            lines.append(f"{k}: {v}\r\n")
        if req.body or req.method not in ("GET", "HEAD"):
            lines.append(f"content-length: {len(req.body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1", "replace")
        return head + req.body if req.body else head

    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        pool = self._get()
        try:
            key, target, host = _target(req.url)
        except ValueError as e:
            raise UpstreamConnectError(_CONNECT, detail=str(e)) from None
        data = self._request_bytes(req, target, host)
        deadline = pool.loop.time() + headers_timeout
        retried = False
        while True:
            conn = await self._connect(pool, key, connect, deadline)
            try:
                return await self._exchange(conn, data, deadline)
            except _ConnClosed as e:
                stale = (conn.reused and conn.received == 0 and not retried
                         and time.monotonic() - conn.sent_at <= _STALE_WINDOW)
                if not stale:
                    raise UpstreamConnectError(_CLOSED, sent=True, detail=str(e)) from None
                retried = True  # the request never reached a live server: once more on a fresh connection

    async def _connect(self, pool: _Pool, key: PoolKey, connect: float, deadline: float) -> _Conn:
        loop = pool.loop
        ready, got = pool.acquire_now(key)  # (no timer when nothing has to wait: the common case)
        if not ready:
            try:
                async with asyncio.timeout_at(deadline):
                    got = await pool.wait(key)
            except TimeoutError:
                raise UpstreamConnectError(_CONNECT_TIMEOUT,
                                           detail=f"no free connection in time (limit {pool.limit})") from None
        if got is not None:
            return got
        conn = pool.new(key)
        scheme, host, port = key
        ssl_ctx: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            async with asyncio.timeout_at(min(loop.time() + connect, deadline)):
                await loop.create_connection(lambda: conn, host, port, ssl=ssl_ctx,
                                             server_hostname=host if ssl_ctx else None)
        except TimeoutError:
            pool.forget(conn)
            raise UpstreamConnectError(_CONNECT_TIMEOUT, detail=f"connect to {host}:{port} timed out") from None
        except OSError as e:
            pool.forget(conn)
            # the address is for the operator (detail: log and attempt record); uvloop's errors do not name it
            raise UpstreamConnectError(_CONNECT, detail=f"{_oserror(e)} (connecting to {host}:{port})") from None
        except BaseException:
            pool.forget(conn)
            raise
        return conn

    async def _exchange(self, conn: _Conn, data: bytes, deadline: float) -> _H1Response:
        """Write the request and wait for the response headers."""
        transport = conn.transport
        assert transport is not None
        conn.sent_at = time.monotonic()
        conn.active = True
        watched = False
        try:
            transport.write(data)
            while not conn.headers_done:
                if conn.error is not None:
                    e = conn.error
                    if isinstance(e, httptools.HttpParserError):
                        raise UpstreamBadResponse(_BAD, sent=True, detail=f"{type(e).__name__}: {e}")
                    if isinstance(e, _ConnClosed) or conn.lost:
                        raise _ConnClosed(f"{type(e).__name__}: {e}")
                    raise UpstreamConnectError(_CLOSED, sent=True, detail=f"{type(e).__name__}: {e}")
                if not watched:  # the pool's sweep times it out (no timer armed and cancelled per request)
                    conn.pool.waiting.watch(conn, deadline)
                    watched = True
                await conn.wait()
                if conn.timed_out and not conn.headers_done:
                    raise UpstreamTimeout(_NO_ANSWER, sent=True, detail="no response headers in time")
        except BaseException:
            conn.close()
            raise
        finally:
            if watched:
                conn.pool.waiting.unwatch(conn)
        return _H1Response(conn)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close_all()
            await asyncio.sleep(0)  # let the closed transports run connection_lost
