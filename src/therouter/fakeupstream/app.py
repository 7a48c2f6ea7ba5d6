"""The fake upstream as a raw ASGI application (no framework on the hot path)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from therouter.fakeupstream import anthropic
from therouter.fakeupstream.asgi import (
    BodyEncoder,
    Exchange,
    Headers,
    Receive,
    Scope,
    Send,
    read_body,
    read_json_or_empty,
    send_bytes,
    send_json,
    watch_disconnect,
)
from therouter.fakeupstream.config import (
    DEFAULT_MODELS,
    DEFAULT_REASONING_CHUNKS,
    FakeConfig,
    KnobError,
    merge_knobs,
    parse_fault_header,
)
from therouter.fakeupstream.content import build_plan, estimate_prompt_tokens, max_output_tokens
from therouter.fakeupstream.flavors import (
    FAULT_ERRORS,
    FLAVOR_CLASSES,
    ROUTE_BETA_CHAT,
    ROUTE_BETA_COMPLETIONS,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ErrorSpec,
    Flavor,
    bad_request,
    missing_field,
)
from therouter.fakeupstream.misbehave import echo_message, gzip_bomb
from therouter.fakeupstream.render import choices_of
from therouter.fakeupstream.stats import Stats
from therouter.fakeupstream.writers import write_bomb, write_error, write_json, write_stream

HTTP_ERROR_KINDS = frozenset({"400", "401", "402", "403", "408", "429", "500", "503", "529", "context_length"})
ROUTE_MESSAGES = "messages"  # Anthropic's /v1/messages
CHAT_ROUTES = frozenset({ROUTE_CHAT, ROUTE_BETA_CHAT, ROUTE_MESSAGES})
FLAVORS: dict[str, type[Flavor]] = {**FLAVOR_CLASSES, "anthropic": anthropic.AnthropicFlavor}
REDIRECT_LOCATION = b"http://127.0.0.1:1/"
METRICS_CONTENT_TYPE = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def _retry_after(seconds: float) -> bytes:
    return (str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}").encode()


class FakeUpstream:
    """ASGI callable simulating a DeepSeek, vLLM or SGLang OpenAI-compatible server.

    Runtime state (``knobs``, ``models``, ``api_key``, ``stats``) may be changed through the
    ``/_fake/*`` endpoints or directly on the instance.
    """

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.flavor: Flavor = FLAVORS[config.flavor]()
        self.initial_knobs: dict[str, Any] = config.knobs()
        self.knobs: dict[str, Any] = dict(self.initial_knobs)
        self.stats = Stats()
        self.rng = random.Random(config.seed)
        self.started_at = int(time.time())
        self.bombs: dict[tuple[int, bool], bytes] = {}  # (inflated size, stream) -> gzip body, built once
        self.set_models(list(config.models or []))
        self.set_api_key(config.api_key)
        routes: dict[str, tuple[str, Handler]] = {
            "/chat/completions": ("POST", self._route(ROUTE_CHAT)),
            "/completions": ("POST", self._route(ROUTE_COMPLETIONS)),
            "/models": ("GET", self._models),
            "/health": ("GET", self._health),
        }
        if self.flavor.name == "anthropic":  # the Messages API only
            routes = {"/messages": ("POST", self._route(ROUTE_MESSAGES)), "/models": ("GET", self._models)}
        elif self.flavor.name == "deepseek":
            routes["/beta/chat/completions"] = ("POST", self._route(ROUTE_BETA_CHAT))
            routes["/beta/completions"] = ("POST", self._route(ROUTE_BETA_COMPLETIONS))
        elif self.flavor.name != "openai":
            routes["/metrics"] = ("GET", self._metrics)
        if self.flavor.name == "sglang":
            routes["/health_generate"] = ("GET", self._health)
        self.routes = routes

    def set_models(self, models: list[str]) -> None:
        self.models = models
        self.model_set = frozenset(models)
        self.any_model = "*" in self.model_set
        self.listed_models = [m for m in models if m != "*"] or list(DEFAULT_MODELS[self.flavor.name])

    def set_api_key(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.expected_auth = self.flavor.auth_value(api_key) if api_key else None

    # ---- ASGI entry point -------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        norm = path.rstrip("/") or "/"
        if norm.startswith("/v1/"):
            norm = norm[3:]
        if norm.startswith("/_fake/"):
            await self._admin(norm, scope, receive, send)
            return
        self.stats.count_path(path)
        route = self.routes.get(norm)
        if route is None:
            await send_json(send, 404, {"detail": "Not Found"})
        elif scope["method"] != route[0]:
            await send_json(send, 405, {"detail": "Method Not Allowed"})
        else:
            await route[1](scope, receive, send)

    # ---- simple endpoints -------------------------------------------------------------
    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = self.flavor.auth_header.encode()
        auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)
        if self.expected_auth is not None and auth != self.expected_auth:
            await write_error(self.flavor, send, self.flavor.unauthorized())
            return
        mlen = self.knobs["max_model_len"]
        data = [self.flavor.model_entry(m, self.started_at, mlen) for m in self.listed_models]
        await send_json(send, 200, {"object": "list", "data": data})

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, self.knobs["health_status"], b"", [])

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        k = self.knobs
        text = self.flavor.metrics_text(self.listed_models, self.stats.in_flight, k["queue_depth"],
                                        k["kv_cache_usage"])
        await send_bytes(send, 200, (text or "").encode(), METRICS_CONTENT_TYPE)

    async def _admin(self, norm: str, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if norm == "/_fake/stats" and method == "GET":
            snap = self.stats.snapshot()
            snap["flavor"] = self.flavor.name
            await send_json(send, 200, snap)
        elif norm == "/_fake/reset" and method == "POST":
            body = await read_json_or_empty(receive)
            self.stats.reset()
            if isinstance(body, dict) and body.get("knobs"):
                self.knobs = dict(self.initial_knobs)
            await send_json(send, 200, {"ok": True})
        elif norm == "/_fake/config" and method == "GET":
            await send_json(send, 200, self.knobs)
        elif norm == "/_fake/config" and method == "POST":
            body = await read_json_or_empty(receive)
            status, result = self.update_config(body)
            await send_json(send, status, result)
        else:
            await send_json(send, 404, {"detail": "Not Found"})

    def update_config(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Merge runtime knobs (plus optional ``models`` / ``api_key``); returns (status, knobs|error)."""
        if not isinstance(body, dict):
            return 400, {"error": "expected a JSON object of knobs"}
        body = dict(body)
        models = body.pop("models", None)
        has_key = "api_key" in body
        api_key = body.pop("api_key", None)
        try:
            knobs = merge_knobs(self.knobs, body)
        except KnobError as exc:
            return 400, {"error": str(exc)}
        self.knobs = knobs
        if isinstance(models, list):
            self.set_models([str(m) for m in models])
        if has_key:
            self.set_api_key(api_key or None)
        return 200, knobs

    # ---- generation endpoints ---------------------------------------------------------
    def _route(self, route: str) -> Handler:
        async def handler(scope: Scope, receive: Receive, send: Send) -> None:
            await self._generate(scope, receive, send, route)

        return handler

    async def _generate(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        headers: dict[str, str] = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get(self.flavor.auth_header)
        if auth is not None:  # the log never keeps a key
            headers[self.flavor.auth_header] = "valid" if auth == self.expected_auth else "present"
        entry: dict[str, Any] = {
            "t_start": time.time(),
            "t_first_byte": None,
            "t_end": None,
            "path": scope["path"],
            "model": None,
            "stream": False,
            "status": None,
            "closed_by": "server",
            "tokens_sent": 0,
            "fault": None,
            "headers": headers,
            "body": None,
        }
        stats.log.append(entry)
        ex = Exchange(send, entry)
        watcher: asyncio.Task[None] | None = None
        try:
            raw = await read_body(receive)
            knobs, body, err = self._parse(raw, headers, route, entry)
            # Watch for client disconnects only when the response can take a while.
            if entry["stream"] or knobs["latency_ms"] > 0 or knobs["error_rate"] > 0 or knobs["keepalive_comments"]:
                ex.task = asyncio.current_task()
                watcher = asyncio.ensure_future(watch_disconnect(receive, ex))
            await self._respond(ex, route, knobs, body, err, scope["headers"])
        except asyncio.CancelledError:
            if not ex.client_gone or ex.task is None:
                raise
            ex.task.uncancel()
            entry["closed_by"] = "client"
        finally:
            if watcher is not None:
                watcher.cancel()
            stats.in_flight -= 1
            entry["t_end"] = time.time()

    def _parse(
        self, raw: bytes, headers: dict[str, str], route: str, entry: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], ErrorSpec | None]:
        """Decode the body and per-request knobs, then validate. Returns (knobs, body, error)."""
        flavor = self.flavor
        knobs = self.knobs
        if self.expected_auth is not None and headers.get(self.flavor.auth_header) != "valid":
            with contextlib.suppress(orjson.JSONDecodeError):  # auth first, as real servers; still log the body
                entry["body"] = orjson.loads(raw)
            return knobs, {}, flavor.unauthorized()
        if flavor.name == "sglang" and not headers.get("content-type", "").startswith("application/json"):
            return knobs, {}, bad_request("Content-Type must be application/json")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return knobs, {}, bad_request(f"Invalid JSON body: {exc}")
        if not isinstance(body, dict):
            return knobs, {}, bad_request("Request body must be a JSON object")
        entry["body"] = body
        entry["stream"] = body.get("stream") is True
        try:
            fake = body.get("fake")
            if isinstance(fake, dict) and fake:
                knobs = merge_knobs(knobs, fake)
            fault_header = headers.get("x-fault")
            if fault_header:  # the header wins over the body's "fake" object
                knobs = merge_knobs(knobs, parse_fault_header(fault_header))
        except KnobError as exc:
            return knobs, body, bad_request(f"fake upstream: {exc}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = flavor.default_model(self.models)
            if model is None:
                return knobs, body, missing_field("model")
        entry["model"] = model
        if route in CHAT_ROUTES:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return knobs, body, missing_field("messages")
        elif body.get("prompt") is None:
            return knobs, body, missing_field("prompt")
        if not self.any_model and model not in self.model_set:
            return knobs, body, flavor.model_not_found(model)
        return knobs, body, flavor.validate(route, body, self._reasoning_chunks(knobs, body, route) > 0)

    def _reasoning_chunks(self, knobs: dict[str, Any], body: dict[str, Any], route: str) -> int:
        if route not in CHAT_ROUTES:
            return 0
        r = knobs["reasoning"]
        if r is None:  # follow the request's thinking switch
            return DEFAULT_REASONING_CHUNKS if self.flavor.thinking_requested(body) else 0
        return int(r)

    async def _respond(
        self, ex: Exchange, route: str, knobs: dict[str, Any], body: dict[str, Any], err: ErrorSpec | None,
        raw_headers: Headers,
    ) -> None:
        flavor = self.flavor
        fault: str | None = None
        if knobs["encoding"] != "identity":
            ex.encoder = BodyEncoder(knobs["encoding"])

        def echo(spec: ErrorSpec) -> ErrorSpec:
            if not knobs["echo_request"]:
                return spec
            return spec._replace(message=echo_message(spec.message, raw_headers, body))

        if err is None:
            rate = knobs["error_rate"]
            if rate > 0 and (rate >= 1 or self.rng.random() < rate):
                fault = knobs["error_kind"]
                ex.entry["fault"] = fault
        if knobs["latency_ms"] > 0:
            await asyncio.sleep(knobs["latency_ms"] / 1000)
        if err is not None:
            await write_error(flavor, ex, echo(err))
            return
        stream = ex.entry["stream"]
        if fault in HTTP_ERROR_KINDS:
            if fault == "context_length":
                spec = flavor.context_error(estimate_prompt_tokens(body), max_output_tokens(body) or 0,
                                            knobs["max_model_len"])
            else:
                spec = FAULT_ERRORS[fault]
            retry = knobs["retry_after"]
            extra = [(b"retry-after", _retry_after(retry))] if fault == "429" and retry > 0 else []
            await write_error(flavor, ex, echo(spec), extra)
            return
        if fault == "redirect":
            await ex.start(302, [(b"location", REDIRECT_LOCATION), (b"content-length", b"0")])
            await ex.finish()
            return
        if fault in ("in_band", "in_band_mid") and not stream:
            await write_error(flavor, ex, echo(FAULT_ERRORS["in_band"]))
            return
        if fault == "gzip_bomb":
            size = knobs["bomb_bytes"]
            if (size, stream) not in self.bombs:
                self.bombs[(size, stream)] = gzip_bomb(size, stream=stream)
            await write_bomb(ex, self.bombs[(size, stream)], stream=stream)
            return
        if fault == "hang":
            await asyncio.sleep(knobs["stall_ms"] / 1000)
        chat = route in CHAT_ROUTES
        plan = build_plan(
            flavor.plan_body(body),
            knobs,
            chat=chat,
            reasoning_chunks=self._reasoning_chunks(knobs, body, route),
            empty_json=fault == "empty_json",
            new_tool_id=flavor.tool_id,
        )
        flavor.adjust_plan(plan, body)
        rid = flavor.chat_id() if chat else flavor.completion_id()
        created = int(time.time())
        if route == ROUTE_MESSAGES and stream:
            await anthropic.write_stream(flavor, ex, knobs, plan, fault, rid=rid, in_band=echo(FAULT_ERRORS["in_band"]))
        elif route == ROUTE_MESSAGES:
            await anthropic.write_json(flavor, ex, knobs, plan, fault, rid=rid)
        elif stream:
            await write_stream(flavor, ex, knobs, body, plan, fault, chat=chat, rid=rid, created=created,
                               in_band=echo(FAULT_ERRORS["in_band"]))
        else:
            await write_json(flavor, ex, knobs, plan, fault, chat=chat, rid=rid, created=created,
                             n=choices_of(body))


def create_app(config: FakeConfig) -> FakeUpstream:
    """Build the ASGI app for ``config``."""
    return FakeUpstream(config)
