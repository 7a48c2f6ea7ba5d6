"""Pure ASGI middleware: request headers bounded (431), x-request-id on every response (the client's when it is
a sane token, or a new one), requests in flight per worker bounded (503 + Retry-After at once), and a request's body
bounded in time (408). The time to deliver the headers is bounded below ASGI, in the server's protocol
(server.py)."""

from __future__ import annotations

import asyncio
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from therouter.api.errors import error_response, is_anthropic
from therouter.errors import RequestHeadersTooLarge, RequestTimeout, ServiceUnavailable
from therouter.logs import REQUEST_ID

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # a client's x-request-id is kept only if it matches


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                s = v.decode("latin-1")
                rid = s if SANE_REQUEST_ID.match(s) else None
                break
        rid = rid or "req_" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)  # every log line written while this request is handled carries it
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", raw))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class HeaderLimitMiddleware:
    """Outermost: a request whose headers (names + values, all together) exceed ``max_bytes`` gets 431 in OpenAI's
    error shape before anything else runs -- no key lookup, no body read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            if size > self.max_bytes:
                err = RequestHeadersTooLarge(f"The request headers are {size} bytes; the limit is {self.max_bytes} "
                                             "bytes.")
                await error_response(err, extra_headers={"Connection": "close"},
                                     anthropic=is_anthropic(scope["path"]))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests in flight in this worker (a stream counts until it ends). Beyond it a request gets
    503 with ``Retry-After`` at once, instead of queueing without bound behind the event loop. Health, readiness and
    metrics are not counted, so a saturated worker can still be watched."""

    EXEMPT = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            err = ServiceUnavailable(f"This gateway worker is serving its limit of {self.limit} requests; retry "
                                     "shortly.", code="server_overloaded", retry_after=1)
            await error_response(err, anthropic=is_anthropic(scope["path"]))(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


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
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise RequestTimeout(f"The request body did not arrive within {self.timeout:g} s.",
                                     headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, bounded, send)
