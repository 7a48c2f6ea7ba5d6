"""/v1/messages (also /anthropic/v1/messages): Anthropic's Messages API. Handlers authenticate, translate the request
once (:mod:`therouter.anthropic_surface`), call the gateway as for /v1/chat/completions, and translate the answer
back. Errors on these paths are rendered in Anthropic's shape by :mod:`therouter.api.errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from therouter import anthropic_surface as surface
from therouter import validate
from therouter.api.deps import ServicesDep
from therouter.api.openai import read_body
from therouter.api.streaming import SSEResponse
from therouter.disconnect import client_left, waiter
from therouter.errors import GatewayError, ModelNotFound
from therouter.gateway import StreamAnswer
from therouter.keys import KeyRecord
from therouter.providers.wire import NativeRequest

router = APIRouter()
PATHS = ("/v1/messages", "/anthropic/v1/messages")


async def _key(request: Request, services: Any) -> KeyRecord:
    """The same keys as /v1: Anthropic's ``x-api-key`` header, or ``Authorization: Bearer``."""
    api_key = request.headers.get("x-api-key")
    header = f"Bearer {api_key}" if api_key else request.headers.get("authorization")
    return await services.auth.authenticate(header)  # type: ignore[no-any-return]


async def _read(request: Request, services: Any, count_only: bool = False) -> surface.MessagesRequest:
    s = services.settings.server
    raw = await read_body(request, s.max_body_bytes)
    return surface.read_request(validate.parse_body(raw, s.max_body_bytes, s.max_json_depth), count_only=count_only)


async def messages(request: Request, services: ServicesDep) -> Any:
    key = await _key(request, services)
    req = await _read(request, services)
    request.state.observed = True  # from here on the gateway counts and logs the request, whatever happens
    native = NativeRequest.of("anthropic", req.native, req.model, request.headers, req.native_only)
    try:
        answer = await services.gateway.handle(key, "chat", orjson.dumps(req.openai), request.state.request_id,
                                               waiter(request.receive),
                                               native=native)
    except asyncio.CancelledError:
        if not client_left():
            raise  # a real cancellation (e.g. shutdown) goes on
        return Response(status_code=499)  # the client left (observed as a 499): nobody reads this
    if isinstance(answer, StreamAnswer):
        gen_id = answer.headers.get("x-therouter-generation-id", "")
        stream = surface.MessageStream(req, gen_id, validate.estimate_chat_tokens(req.openai))
        # an Anthropic deployment's own events (the native relay) go out as they are; anything else is translated
        events = _relayed(answer.events) if answer.native else _events(answer.events, stream)
        return SSEResponse(events, answer.headers, services.settings.server.stream_write_timeout)
    if answer.native:  # an Anthropic deployment's message, as it came (our id, the model the client sent)
        return Response(answer.body, status_code=answer.status, headers=answer.headers,
                        media_type="application/json")
    body = surface.to_message(orjson.loads(answer.body), req)
    return Response(orjson.dumps(body), status_code=answer.status, headers=answer.headers,
                    media_type="application/json")


async def count_tokens(request: Request, services: ServicesDep) -> Response:
    """``{"input_tokens": N}``: the gateway's own estimate of the prompt, the one its budgets reserve for."""
    key = await _key(request, services)
    req = await _read(request, services, count_only=True)
    model = services.settings.canonical(req.model)
    allowed = {services.settings.canonical(m) for m in key.models}
    if model not in services.settings.models or (allowed and model not in allowed):
        raise ModelNotFound(f"The model `{req.model}` does not exist or you do not have access to it.", param="model")
    return Response(orjson.dumps({"input_tokens": validate.estimate_chat_tokens(req.openai)}),
                    media_type="application/json")


for _p in PATHS:
    router.add_api_route(_p, messages, methods=["POST"])
    router.add_api_route(_p + "/count_tokens", count_tokens, methods=["POST"])


async def _relayed(chunks: AsyncIterator[bytes], ping_seconds: float = surface.PING_SECONDS) -> AsyncIterator[bytes]:
    """A native relay's events (already Anthropic's, ending in ``message_stop`` or an ``error`` event), a ``ping``
    whenever the upstream is silent for a while."""
    async with aclosing(_with_pings(chunks, ping_seconds)) as pieces:
        async for piece in pieces:
            yield piece or surface.PING


async def _events(chunks: AsyncIterator[bytes], stream: surface.MessageStream,
                  ping_seconds: float = surface.PING_SECONDS) -> AsyncIterator[bytes]:
    """The gateway's SSE bytes -> Anthropic's events, a ``ping`` whenever the upstream is silent for a while."""
    buf = b""
    try:
        async with aclosing(_with_pings(chunks, ping_seconds)) as pieces:
            async for piece in pieces:
                if not piece:
                    yield b"".join(stream.ping())
                    continue
                buf += piece
                while b"\n\n" in buf:
                    frame, buf = buf.split(b"\n\n", 1)
                    out, finished = _frame(frame, stream)
                    if out:
                        yield b"".join(out)
                    if finished:
                        return
        # the gateway always ends with [DONE] or an error event: anything else is a break, said as one
        yield b"".join(stream.error("api_error", "The stream ended unexpectedly."))
    except GatewayError as e:
        yield b"".join(stream.error(surface.error_status(e)[1], e.message))


async def _with_pings(chunks: AsyncIterator[bytes], ping_seconds: float) -> AsyncGenerator[bytes, None]:
    """The chunks, and ``b""`` each time none came for ``ping_seconds``; the source is closed at the end, however
    it comes."""
    it = chunks.__aiter__()
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=ping_seconds)
            if not done:
                yield b""
                continue
            try:
                piece = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield piece
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration, GatewayError):
                pass
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _frame(frame: bytes, stream: surface.MessageStream) -> tuple[list[bytes], bool]:
    """One SSE frame of the gateway's stream -> (Anthropic events, the stream is over)."""
    data = b"\n".join(line[5:].lstrip() for line in frame.split(b"\n") if line.startswith(b"data:"))
    if not data:
        return [], False
    if data == b"[DONE]":
        return stream.done(), True
    obj = orjson.loads(data)
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        status = {"rate_limit_exceeded": 429, "upstream_rate_limited": 429}.get(str(err.get("code")), 500)
        kind = surface.ERROR_TYPES.get(status, (status, "api_error"))[1]
        return stream.error(kind, str(err.get("message") or "error")), True
    return stream.chunk(obj), False
