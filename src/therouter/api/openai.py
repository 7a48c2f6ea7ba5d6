"""/v1: the OpenAI-compatible surface. Handlers parse, call the gateway and render; nothing else.

The same router is also mounted under ``/api`` (``/api/v1/...``, OpenRouter's base path), and the read endpoints
carry OpenRouter's field names beside ours (:mod:`therouter.api.openrouter`).
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from therouter import params
from therouter.api import openrouter
from therouter.api.deps import KeyDep, ServicesDep
from therouter.api.errors import error_response
from therouter.api.hints import hints_of
from therouter.api.middleware import SANE_REQUEST_ID
from therouter.api.streaming import SSEResponse
from therouter.disconnect import client_left, waiter
from therouter.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
)
from therouter.gateway import StreamAnswer

router = APIRouter(prefix="/v1")
log = logging.getLogger("therouter.api")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
         "/api/v1/chat/completions": "chat", "/api/v1/completions": "completions"}


class CompletionsRoute:
    """``POST /v1/chat/completions`` and ``/v1/completions`` (and their ``/api/v1`` mounts), served straight from
    :class:`~therouter.api.middleware.FrontDoor`, without FastAPI's layers: its middleware stack, routing and
    dependency injection measured as a large share of a JSON request's CPU (bench/profile.sh). (The FastAPI routes
    below only list the paths in the OpenAPI schema.) The key first (401 in OpenAI's shape), then the body
    (413 past the limit, 408 when it has not all arrived ``server.body_timeout`` after the headers), then the
    gateway; a request refused before the gateway had it is counted and logged all the same
    (``Gateway.refused``); an unexpected exception is logged and answered with a generic 500, never a traceback."""

    def __init__(self, app: Any) -> None:
        self.app = app  # the FastAPI app: its state holds the services once the lifespan built them

    async def __call__(self, scope: Scope, receive: Receive, send: Send, endpoint: str, rid: str) -> None:
        services = self.app.state.services
        server = services.settings.server
        deadline = asyncio.get_running_loop().time() + server.body_timeout
        hints = hints_of(scope)  # what our server says of the connection (None under another server)
        observed = False
        try:
            headers = _headers(scope)
            key = await services.auth.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None)
            declared = headers.get(b"content-length")
            if hints is not None and hints.body_complete():  # all here: reading it cannot wait (no timer)
                raw = await _receive_body(receive, declared, server.max_body_bytes)
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        raw = await _receive_body(receive, declared, server.max_body_bytes)
                except TimeoutError:
                    raise RequestTimeout(f"The request body did not arrive within {server.body_timeout:g} s.",
                                         headers={"Connection": "close"}) from None
            if raw is None:
                return  # the client left while sending its body: nobody to answer
            observed = True  # from here on the gateway counts and logs the request, whatever happens
            answer = await services.gateway.handle(key, endpoint, raw, rid,
                                                   hints.gone if hints is not None else waiter(receive))
        except asyncio.CancelledError:
            if not client_left():
                raise  # a real cancellation (e.g. shutdown) goes on
            return  # the client left (the gateway's disconnect signal): observed as a 499, nobody to answer
        except GatewayError as e:
            if not observed:
                services.gateway.refused(endpoint, rid, e)
            await error_response(e, rid)(scope, receive, send)
            return
        except Exception:
            log.exception("unexpected error on POST %s", scope["path"])
            await error_response(InternalError("The server had an error while processing your request."),
                                 rid)(scope, receive, send)
            return
        if isinstance(answer, StreamAnswer):
            await SSEResponse(answer.events, {**answer.headers, "x-request-id": rid},
                              server.stream_write_timeout)(scope, receive, send)
            return
        head = {"content-type": "application/json", "x-request-id": rid, **answer.headers}
        if hints is not None and hints.respond(answer.status, head, answer.body):
            return
        out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in head.items()]
        out.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": answer.body})


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request headers by lower-case name (the first of each, as Starlette's ``headers.get``)."""
    out: dict[bytes, bytes] = {}
    for k, v in scope["headers"]:
        out.setdefault(k, v)
    return out


async def _receive_body(receive: Receive, declared: bytes | None, limit: int) -> bytes | None:
    """The whole body, within ``limit`` bytes (413 otherwise); None if the client disconnected first."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared.decode()} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# The two completion routes are served by CompletionsRoute above: the front door takes every POST to their paths
# before FastAPI routes anything. They are declared here only so /openapi.json lists them (with the bearer key they
# take); their handlers are never called.
@router.post("/chat/completions")
async def chat_completions(key: KeyDep) -> Any:
    """OpenAI's Chat Completions (JSON or a `text/event-stream` with `"stream": true`)."""
    raise InternalError("POST /v1/chat/completions is served by the front door")  # never reached


@router.post("/completions")
async def completions(key: KeyDep) -> Any:
    """OpenAI's legacy Completions (JSON or a `text/event-stream` with `"stream": true`)."""
    raise InternalError("POST /v1/completions is served by the front door")  # never reached


def model_entry(model_id: str, card: Any, price: Any = None) -> dict[str, Any]:
    rates = (price or card.pricing).input, (price or card.pricing).cached_input, (price or card.pricing).output
    pricing: dict[str, Any] = {
        "input": _usd(rates[0]), "cached_input": _usd(rates[1]), "output": _usd(rates[2]),
        "unit": "USD per 1M tokens",
    }
    cache_write = price.cache_write if price else card.pricing.cache_write
    if cache_write is not None:
        pricing["cache_write"] = _usd(cache_write)
    if price is not None:
        pricing["version"] = price.version
    extra = openrouter.model_fields(card, *rates)
    pricing.update(extra.pop("pricing"))  # OpenRouter's per-token strings beside our per-1M ones
    return {
        "id": model_id, "object": "model", "created": card.created, "owned_by": card.owned_by, "name": model_id,
        "context_length": card.context_length, "max_output_tokens": card.max_output_tokens,
        "modalities": {"input": list(card.modalities.input), "output": list(card.modalities.output)},
        "supported_parameters": params.model_parameters(card), "pricing": pricing, **extra,
        "deployments": params.per_deployment(card),
    }


def alias_entry(alias: str, canonical: dict[str, Any]) -> dict[str, Any]:
    return {**canonical, "id": alias, "name": alias, "alias_of": canonical["id"]}


def _usd(nano_per_m: int) -> str:
    return format((Decimal(nano_per_m) / Decimal(10**9)).normalize(), "f")


async def _prices(services: Any) -> dict[str, Any]:
    """The price in force per model, from the Redis price table (the config's prices if the store is down)."""
    out = {}
    for mid in services.settings.models:
        try:
            pv = await services.meter.get_price(mid)
        except GatewayError:
            pv = None
        if pv is not None:
            out[mid] = pv
    return out


def _allowed(key: Any, services: Any) -> set[str] | None:
    """The canonical ids a key may use (None: every model); an alias in its list counts as its model."""
    return {services.settings.canonical(m) for m in key.models} if key.models else None


@router.get("/models")
async def list_models(key: KeyDep, services: ServicesDep) -> Response:
    """The catalogue, then each alias as its own entry (``alias_of`` names the model it resolves to)."""
    prices, allowed, settings = await _prices(services), _allowed(key, services), services.settings
    entries = {mid: model_entry(mid, card, prices.get(mid)) for mid, card in settings.models.items()
               if allowed is None or mid in allowed}
    aliases = [alias_entry(a, entries[mid]) for a, mid in settings.aliases.items() if mid in entries]
    return Response(orjson.dumps({"object": "list", "data": [*entries.values(), *aliases]}),
                    media_type="application/json")


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, key: KeyDep, services: ServicesDep) -> Response:
    canonical = services.settings.canonical(model_id)
    card = services.settings.models.get(canonical)
    allowed = _allowed(key, services)
    if card is None or (allowed is not None and canonical not in allowed):
        raise ModelNotFound(f"The model `{model_id}` does not exist or you do not have access to it.",
                            param="model")
    prices = await _prices(services)
    entry = model_entry(canonical, card, prices.get(canonical))
    if canonical != model_id:
        entry = alias_entry(model_id, entry)
    return Response(orjson.dumps(entry), media_type="application/json")


@router.get("/generation")
async def generation(key: KeyDep, services: ServicesDep, id: str = "", request_id: str = "") -> Response:
    """A generation record of the caller's key, by its id or by the ``x-request-id`` the request was sent with."""
    if request_id and not id:
        if not SANE_REQUEST_ID.match(request_id):
            raise InvalidRequest("request_id must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="request_id")
        rec = await services.meter.generation_by_request(request_id, key.id)
        param, what = "request_id", f"request id `{request_id}`"
    else:
        rec = await services.meter.generation(id, key.id) if id else None
        param, what = "id", f"id `{id}`"
    if rec is None or rec.get("key_id") != key.id:
        raise NotFound(f"No generation with {what} for this key.", param=param)
    return Response(orjson.dumps({"data": {**openrouter.generation_fields(rec), **rec}}),
                    media_type="application/json")


@router.get("/key")
@router.get("/auth/key")  # OpenRouter's older path for the same answer
async def key_info(key: KeyDep, services: ServicesDep) -> Response:
    summary = await services.meter.key_summary(key)
    extra = openrouter.key_fields(summary, label=key.name or key.hint, rpm=key.rpm,
                                  window_ms=services.meter.options.window_ms)
    return Response(orjson.dumps({"data": {**extra, **summary}}), media_type="application/json")
