"""How the gateway runs under uvicorn: the options ``serve`` and ``demo`` share, and the HTTP protocol that bounds
the time a client may take to send a request's headers.

uvicorn has no such bound: its keep-alive timer is cancelled by the first byte of a request, and nothing is armed
when a connection opens, so a client that connects and sends nothing, or trickles its headers a byte at a time
(slowloris), holds a connection -- and a file descriptor -- for as long as it likes. :class:`GuardedHttpToolsProtocol`
sets a deadline when a connection opens and when a request's first byte arrives, and clears it when the headers are
complete; past it the client gets 408 and the connection is closed. The body is bounded in time by the completion
route and ``api.middleware.BodyDeadlineMiddleware`` (408 as well), requests in flight by the front door (503). An
idle keep-alive connection between requests is closed after ``timeout_keep_alive`` (5 s). Both deadlines are
checked by one sweep per event loop every :data:`TICK` seconds (:class:`therouter.sweep.Sweep`), not by timers per
request.

The answer to a completion request leaves in as few writes as it can: uvicorn writes a response's head when the app
sends ``http.response.start`` and its body at each ``http.response.body``, two writes (two TCP segments) for every
JSON answer. For the completion routes, whose handlers send the head and the first body back to back,
:class:`HeadWithBody` holds the head and sends it with the first body (ASGI lets a server do so). Those requests
also get :class:`_Hints` in their scope (``api.hints``): a disconnect signal fired when the connection is lost (no
watcher task), whether the body is all in (no body deadline timer) and whether writes are paused (no write timeout
timer while the client keeps up), and a whole JSON answer written at once (:func:`_respond`).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref
from collections.abc import Mapping
from typing import Any, cast

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from therouter.api.hints import HINTS, hints_of
from therouter.api.openai import PATHS
from therouter.config import Settings
from therouter.disconnect import Signal
from therouter.errors import RequestTimeout
from therouter.sweep import Sweep

TICK = 0.1  # seconds between two sweeps of a loop's connections: a deadline fires at most this late
_sweeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Sweep[GuardedHttpToolsProtocol]] = \
    weakref.WeakKeyDictionary()


def _sweep(loop: asyncio.AbstractEventLoop) -> Sweep[GuardedHttpToolsProtocol]:
    """The loop's one sweep of its connections' deadlines (uvicorn arms a keep-alive timer after every answer and
    cancels it at the next request's first byte; with the header deadline's, that was two timers per request)."""
    sw = _sweeps.get(loop)
    if sw is None:
        sw = _sweeps[loop] = Sweep(loop, TICK, lambda conn, now: conn.deadline_passed())
    return sw


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline for a request's headers (see the module doc); that deadline and
    uvicorn's keep-alive timeout are checked by the loop's sweep."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._sweeper = _sweep(self.loop)  # (looked up once: it is watched and unwatched ~4 times per request)
        # the deadline watched: the headers' (True) or, between requests, the keep-alive timeout's (False)
        self._awaiting_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()  # a connection that sends nothing: 408

    def connection_lost(self, exc: Exception | None) -> None:
        self._sweeper.unwatch(self)
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # (not after its answer was complete)
            hints = hints_of(cast(dict[str, Any], cycle.scope))
            if hints is not None:
                hints.gone.fire()

    def data_received(self, data: bytes) -> None:
        if not self._awaiting_headers:
            self._sweeper.unwatch(self)  # no longer idle
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._awaiting_headers:  # a connection's first request keeps the deadline set when it opened
            self._await_headers()

    def _await_headers(self) -> None:
        self._awaiting_headers = True
        self._sweeper.watch(self, self.loop.time() + self.header_timeout)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._sweeper.unwatch(self)
        super().on_headers_complete()
        cycle = self.cycle  # (its task has not run yet)
        if cycle is not None and cycle.scope.get("method") == "POST" and cycle.scope.get("path") in PATHS:
            cycle.transport = HeadWithBody(cycle.transport)  # type: ignore[assignment]
            cast(dict[str, Any], cycle.scope).setdefault("extensions", {})[HINTS] = _Hints(cycle)

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive timeout left to the sweeper (no timer armed per answer)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:  # a pipelined request waiting: start it
            cycle, app = self.pipeline.pop()
            start = getattr(self, "_start_asgi_task", None)
            if start is not None:
                start(cycle, app)
            else:  # uvicorn before _start_asgi_task (0.29-0.38 at least): what it did inline
                task = self.loop.create_task(cycle.run_asgi(app))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
        else:
            self._sweeper.watch(self, self.loop.time() + self.timeout_keep_alive)  # idle

    def deadline_passed(self) -> None:
        """The sweep found the watched deadline passed (and unwatched the connection)."""
        if self._awaiting_headers:
            self._awaiting_headers = False
            self._headers_too_slow()
        else:
            self.timeout_keep_alive_handler()

    def _headers_too_slow(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined request trickling in behind one still being answered: finish that answer, then close
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        err = RequestTimeout(f"The request headers did not arrive within {self.header_timeout:g} s.")
        body = orjson.dumps(err.body())
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


class _Hints:
    """:class:`therouter.api.hints.Hints` of one request, read off uvicorn's cycle. The cycle is held by a weak
    reference: it holds the scope, which holds this, and a reference cycle per request is work for the collector."""

    __slots__ = ("_cycle", "gone")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = weakref.ref(cycle)
        self.gone = Signal()  # fired by the protocol's connection_lost

    def body_complete(self) -> bool:
        c = self._cycle()
        return c is not None and not c.more_body

    def write_ready(self) -> bool:
        c = self._cycle()
        return c is not None and not c.flow.write_paused

    def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> bool:
        c = self._cycle()
        return c is not None and _respond(c, status, headers, body)


def _respond(c: RequestResponseCycle, status: int, headers: Mapping[str, str], body: bytes) -> bool:
    """A whole answer (``headers``: names and values as text, no content-length) written in one write, with the
    bookkeeping uvicorn's ``send`` does for ``http.response.start`` + ``http.response.body`` (its default headers, the
    connection's keep-alive, the response's completion) but without building and checking two ASGI messages (~5 %
    of a JSON request's CPU); the head is rendered as one text and encoded once (a pair of bytes per header cost ~6
    us more). False, having done nothing, when it cannot be done now -- the request's connection is gone, its answer
    started, or writes are paused -- or a header holds a line break or a character latin-1 cannot encode: the caller
    then sends the answer the ASGI way, and uvicorn waits, or refuses, as it does."""
    if c.response_started or c.disconnected or c.flow.write_paused:
        return False
    head = "".join([f"{k.lower()}: {v}\r\n" for k, v in headers.items()])
    if head.count("\n") != len(headers) or head.count("\r") != len(headers):
        return False  # a line break inside a name or a value
    try:
        raw = head.encode("latin-1")
    except UnicodeEncodeError:
        return False
    parts = [STATUS_LINE[status]]
    for name, value in c.default_headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(raw)
    if not c.keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
    c.response_started = True
    c.waiting_for_100_continue = False
    t = c.transport
    (t.transport if isinstance(t, HeadWithBody) else t).write(b"".join(parts))
    c.response_complete = True
    c.message_event.set()
    if not c.keep_alive:
        t.close()
    c.on_response()
    return True


class HeadWithBody:
    """A request's view of its connection that holds the response head (the first write that is not an interim
    ``100 Continue``) and writes it with the next write (the first body) -- or before a close."""

    __slots__ = ("_head", "_started", "_transport")
    CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif not self._started and data != self.CONTINUE:
            self._started, self._head = True, data
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    @property
    def transport(self) -> asyncio.Transport:
        """The connection itself (a whole answer goes straight to it)."""
        return self._transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


GC_THRESHOLD = (10_000, 10, 10)  # CPython's default: (700, 10, 10)


def tune_gc() -> None:
    """The cyclic garbage collector tuned for a server, once started (its services built): everything alive then is
    moved out of the collector's reach (``gc.freeze``: the imports, the config, the app -- never garbage), and a
    young collection runs after 10,000 net new container objects instead of 700. A request leaves no reference cycle
    behind (the tests of the hot path check it), so the objects the collector scanned were the requests in flight,
    32 or more at a time: with the defaults, the benchmark's JSON scenario spent ~50 us of each request's ~800 us in
    the collector, and full collections (over every object of the process) added pauses of their own; tuned, almost
    none. Anything cyclic is still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config options for the gateway (a partial of a module-level class, so it pickles to
    the worker processes of ``--workers N``)."""
    return {
        "http": functools.partial(GuardedHttpToolsProtocol, header_timeout=settings.server.header_timeout),
        "access_log": False, "proxy_headers": False, "server_header": False, "timeout_graceful_shutdown": 30,
    }
