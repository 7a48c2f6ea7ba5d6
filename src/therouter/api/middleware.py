"""Pure ASGI middleware: request headers bounded (431), and x-request-id on every response (the client's when it is
a sane token, or a new one)."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from therouter.api.errors import error_response
from therouter.errors import RequestHeadersTooLarge
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
                await error_response(err, extra_headers={"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)
