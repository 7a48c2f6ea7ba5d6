"""Renders every error raised to the app: GatewayError -> OpenAI JSON; on Anthropic's Messages paths
(/v1/messages, /anthropic/v1/...) in Anthropic's shape and statuses instead
(:func:`therouter.anthropic_surface.error_status`). Unexpected exceptions become a generic 500 with no traceback or
detail.

Error bodies written elsewhere: the SSE error event that ends a stream broken after its first byte (`gateway.py`'s
stream pump; `anthropic_surface.MessageStream.error` on the Messages paths) and the 408 that `server.py` writes
itself for request headers that never complete.
"""

from __future__ import annotations

import logging
import math

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from therouter import anthropic_surface
from therouter.errors import GatewayError, InternalError

log = logging.getLogger("therouter.api")
COMPLETIONS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/messages": "messages",
               "/anthropic/v1/messages": "messages"}
ANTHROPIC_PATHS = ("/v1/messages", "/anthropic/")


def is_anthropic(path: str) -> bool:
    """A path of Anthropic's surface: its errors are Anthropic's shape."""
    return path.startswith(ANTHROPIC_PATHS)


def error_response(err: GatewayError, request_id: str | None = None,
                   extra_headers: dict[str, str] | None = None, anthropic: bool = False) -> Response:
    headers = dict(extra_headers or {})
    headers.update(err.headers)
    if err.retry_after is not None and "retry-after" not in {k.lower() for k in headers}:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.status in (402, 401, 403, 404, 400, 413) and "x-should-retry" not in headers:
        headers["x-should-retry"] = "false"
    if request_id:
        headers["x-request-id"] = request_id
    if anthropic:
        status = anthropic_surface.error_status(err)[0]
        return Response(orjson.dumps(anthropic_surface.error_body(err)), status_code=status, headers=headers,
                        media_type="application/json")
    return Response(orjson.dumps(err.body()), status_code=err.status, headers=headers,
                    media_type="application/json")


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> Response:
        endpoint = COMPLETIONS.get(request.scope["path"])
        if endpoint and not getattr(request.state, "observed", False):
            # refused before the gateway had it (a bad key, a body too large): counted and logged all the same
            services = getattr(request.app.state, "services", None)
            if services is not None:
                services.gateway.refused(endpoint, getattr(request.state, "request_id", ""), exc)
        return error_response(exc, getattr(request.state, "request_id", None),
                              getattr(request.state, "extra_headers", None), is_anthropic(request.scope["path"]))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        err = GatewayError(f"Invalid request: {first.get('msg', 'invalid input')}", param=".".join(loc) or None)
        err.status, err.type, err.code = 400, "invalid_request_error", "invalid_value"
        return error_response(err, getattr(request.state, "request_id", None),
                              anthropic=is_anthropic(request.scope["path"]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        err = GatewayError(str(exc.detail) if exc.detail else "error", code=None)
        err.status = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(err, getattr(request.state, "request_id", None),
                              anthropic=is_anthropic(request.scope["path"]))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(InternalError("The server had an error while processing your request."),
                              getattr(request.state, "request_id", None),
                              anthropic=is_anthropic(request.scope["path"]))
