"""Pure ASGI, in front of FastAPI: :class:`FrontDoor` (one layer for every HTTP request: headers bounded (431),
x-request-id on every response (the client's when it is a sane token, or a new one), requests in flight per worker
bounded (503 + Retry-After at once); the completion routes are served from there, without FastAPI's layers), and
:class:`BodyDeadlineMiddleware` (a request's body bounded in time, 408) for the routes FastAPI serves. The time to
deliver the headers is bounded below ASGI, in the server's protocol (server.py)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from therouter.api.errors import error_response, is_anthropic
from therouter.errors import RequestHeadersTooLarge, RequestTimeout, ServiceUnavailable
from therouter.logs import REQUEST_ID

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # a client's x-request-id is kept only if it matches


# a completion route's handler: (scope, receive, send, endpoint, request id)
HotRoute = Callable[[Scope, Receive, Send, str, str], Awaitable[None]]


class FrontDoor:
    """Outermost, one layer for every HTTP request (one function call, not one per concern):

    - headers over ``max_header_bytes`` (names + values, all together) get 431 in OpenAI's error shape before
      anything else runs -- no key lookup, no body read;
    - the request id: the client's ``x-request-id`` when it is a sane token, else a new one; set on every log line
      written while the request is handled and on the response;
    - at most ``limit`` requests in flight in this worker (a stream counts until it ends); beyond it, 503 with
      ``Retry-After`` at once instead of queueing without bound behind the event loop. Health, readiness and metrics
      are not counted, so a saturated worker can still be watched;
    - ``POST`` to a path of ``hot`` (the completion routes) goes straight to its handler, which puts the request id
      on its answers itself; everything else goes on to ``app`` (FastAPI), the id added to its response start.
    """

    EXEMPT = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self, app: ASGIApp, hot: dict[str, str], route: HotRoute, max_header_bytes: int,
                 limit: int) -> None:
        self.app = app
        self.hot = hot
        self.route = route
        self.max_header_bytes = max_header_bytes
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        size, rid = 0, None
        for k, v in scope["headers"]:
            size += len(k) + len(v)
            if k == b"x-request-id" and rid is None:
                s = v.decode("latin-1")
                rid = s if SANE_REQUEST_ID.match(s) else ""
        if size > self.max_header_bytes:
            err = RequestHeadersTooLarge(f"The request headers are {size} bytes; the limit is "
                                         f"{self.max_header_bytes} bytes.")
            await error_response(err, extra_headers={"Connection": "close"},
                                 anthropic=is_anthropic(path))(scope, receive, send)
            return
        rid = rid or "req_" + os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)  # every log line written while this request is handled carries it
        try:
            if path in self.EXEMPT:
                await self.app(scope, receive, _with_id(send, rid))
                return
            if self.in_flight >= self.limit:
                busy = ServiceUnavailable(f"This gateway worker is serving its limit of {self.limit} requests; "
                                          "retry shortly.", code="server_overloaded", retry_after=1)
                await error_response(busy, rid, anthropic=is_anthropic(path))(scope, receive, send)
                return
            self.in_flight += 1
            try:
                endpoint = self.hot.get(path) if scope["method"] == "POST" else None
                if endpoint is not None:
                    await self.route(scope, receive, send, endpoint, rid)
                else:
                    await self.app(scope, receive, _with_id(send, rid))
            finally:
                self.in_flight -= 1
        finally:
            REQUEST_ID.reset(token)


def _with_id(send: Send, rid: str) -> Send:
    raw = rid.encode()

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", raw))
            message["headers"] = headers
        await send(message)

    return send_with_id


class BodyDeadlineMiddleware:
    """A request's body must arrive within ``timeout`` seconds of its headers: a client trickling it gets 408 (and
    the connection is closed) when the handler's next read would pass the deadline. Once the body is complete,
    reads pass through untouched (the handler then waits on them for a disconnect)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        complete = False

        async def bounded() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # (no task per read, as wait_for would make)
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"The request body did not arrive within {self.timeout:g} s.",
                                     headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, bounded, send)
