"""The fake upstream as a raw ASGI application (no framework on the hot path)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable

import httpx
import orjson

from therouter.fakeupstream.config import (
    DEFAULT_MODELS,
    DEFAULT_REASONING_CHUNKS,
    FakeConfig,
    KnobError,
    merge_knobs,
    parse_fault_header,
)
from therouter.fakeupstream.content import Plan, build_plan, estimate_prompt_tokens, max_output_tokens
from therouter.fakeupstream.flavors import (
    FAULT_ERRORS,
    ROUTE_BETA_CHAT,
    ROUTE_BETA_COMPLETIONS,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ErrorSpec,
    Flavor,
    context_length_error,
    get_flavor,
)
from therouter.fakeupstream.render import BAD_JSON, DONE, Event, response_body, sse, stream_events
from therouter.fakeupstream.stats import Stats

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
KEEPALIVE = b": keep-alive\n\n"
HTTP_ERROR_KINDS = frozenset({"400", "401", "402", "408", "429", "500", "503", "context_length"})
CHAT_ROUTES = frozenset({ROUTE_CHAT, ROUTE_BETA_CHAT})
REDIRECT_LOCATION = b"http://127.0.0.1:1/"


class FakeConnectionCut(httpx.RemoteProtocolError):
    """Raised by the app to drop the connection mid-response (fault ``cut``).

    Under a real server (uvicorn) this closes the TCP connection; in-process via
    ``httpx.ASGITransport`` the client sees this exception, the same type httpx raises
    for a real truncated response.
    """

    def __init__(self) -> None:
        super().__init__("peer closed connection without sending complete message body (fake upstream cut)")


class _Exchange:
    """One generation request: response helpers, log entry and disconnect bookkeeping."""

    __slots__ = ("send", "entry", "client_gone", "finished", "task")

    def __init__(self, send: Send, entry: dict[str, Any]) -> None:
        self.send = send
        self.entry = entry
        self.client_gone = False
        self.finished = False
        self.task: asyncio.Task[Any] | None = None

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.entry["status"] = status
        self.entry["t_first_byte"] = time.time()
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, data: bytes = b"") -> None:
        self.finished = True
        await self.send({"type": "http.response.body", "body": data, "more_body": False})


async def _watch_disconnect(receive: Receive, ex: _Exchange) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            if not ex.finished and ex.task is not None:
                ex.client_gone = True
                ex.task.cancel()
            return


def _retry_after(seconds: float) -> bytes:
    return (str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}").encode()


class FakeUpstream:
    """ASGI callable simulating a DeepSeek, vLLM or SGLang OpenAI-compatible server."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.flavor: Flavor = get_flavor(config.flavor)
        self.initial_knobs: dict[str, Any] = config.knobs()
        self.knobs: dict[str, Any] = dict(self.initial_knobs)
        self.stats = Stats()
        self.rng = random.Random(config.seed)
        self.set_models(list(config.models or []))
        self.set_api_key(config.api_key)
        self.started_at = int(time.time())
        routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/chat/completions": ("POST", self._chat),
            "/completions": ("POST", self._completions),
            "/models": ("GET", self._models),
            "/health": ("GET", self._health),
        }
        if self.flavor.name == "deepseek":
            routes["/beta/chat/completions"] = ("POST", self._beta_chat)
            routes["/beta/completions"] = ("POST", self._beta_completions)
        else:
            routes["/metrics"] = ("GET", self._metrics)
        if self.flavor.name == "sglang":
            routes["/health_generate"] = ("GET", self._health)
        self.routes = routes

    def set_models(self, models: list[str]) -> None:
        self.models = models
        self.model_set = frozenset(models)
        self.any_model = "*" in self.model_set

    def set_api_key(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.expected_auth = f"Bearer {api_key}" if api_key else None

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
            await _send_json(send, 404, {"detail": "Not Found"})
            return
        if scope["method"] != route[0]:
            await _send_json(send, 405, {"detail": "Method Not Allowed"})
            return
        await route[1](scope, receive, send)

    # ---- simple endpoints -------------------------------------------------------------
    def _auth_error(self, scope: Scope) -> ErrorSpec | None:
        if self.expected_auth is None:
            return None
        for k, v in scope["headers"]:
            if k == b"authorization":
                return None if v.decode("latin-1") == self.expected_auth else self.flavor.unauthorized()
        return self.flavor.unauthorized()

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = self._auth_error(scope)
        if err is not None:
            await self._send_error(send, err)
            return
        ids = [m for m in self.models if m != "*"] or list(DEFAULT_MODELS[self.flavor.name])
        mlen = self.knobs["max_model_len"]
        data = [self.flavor.model_entry(m, self.started_at, mlen) for m in ids]
        await _send_json(send, 200, {"object": "list", "data": data})

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.knobs["health_status"], "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        k = self.knobs
        running, waiting, kv = self.stats.in_flight, k["queue_depth"], k["kv_cache_usage"]
        lines: list[str] = []
        for m in [m for m in self.models if m != "*"] or DEFAULT_MODELS[self.flavor.name]:
            if self.flavor.name == "vllm":
                lbl = f'{{engine="0",model_name="{m}"}}'
                lines += [
                    f"vllm:num_requests_running{lbl} {running}.0",
                    f"vllm:num_requests_waiting{lbl} {waiting}.0",
                    f"vllm:kv_cache_usage_perc{lbl} {kv}",
                ]
            else:
                lbl = f'{{model_name="{m}"}}'
                lines += [
                    f"sglang:num_running_reqs{lbl} {running}.0",
                    f"sglang:num_queue_reqs{lbl} {waiting}.0",
                    f"sglang:token_usage{lbl} {kv}",
                ]
        body = ("\n".join(lines) + "\n").encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})

    async def _admin(self, norm: str, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if norm == "/_fake/stats" and method == "GET":
            snap = self.stats.snapshot()
            snap["flavor"] = self.flavor.name
            await _send_json(send, 200, snap)
        elif norm == "/_fake/reset" and method == "POST":
            body = await _read_json_or_empty(receive)
            self.stats.reset()
            if isinstance(body, dict) and body.get("knobs"):
                self.knobs = dict(self.initial_knobs)
            await _send_json(send, 200, {"ok": True})
        elif norm == "/_fake/config" and method == "GET":
            await _send_json(send, 200, self.knobs)
        elif norm == "/_fake/config" and method == "POST":
            body = await _read_json_or_empty(receive)
            if not isinstance(body, dict):
                await _send_json(send, 400, {"error": "expected a JSON object of knobs"})
                return
            body = dict(body)
            models = body.pop("models", None)
            has_key = "api_key" in body
            api_key = body.pop("api_key", None)
            try:
                knobs = merge_knobs(self.knobs, body)
            except KnobError as exc:
                await _send_json(send, 400, {"error": str(exc)})
                return
            self.knobs = knobs
            if isinstance(models, list):
                self.set_models([str(m) for m in models])
            if has_key:
                self.set_api_key(api_key or None)
            await _send_json(send, 200, knobs)
        else:
            await _send_json(send, 404, {"detail": "Not Found"})

    # ---- generation endpoints ---------------------------------------------------------
    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, ROUTE_CHAT)

    async def _beta_chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, ROUTE_BETA_CHAT)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, ROUTE_COMPLETIONS)

    async def _beta_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, ROUTE_BETA_COMPLETIONS)

    async def _generate(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1")] = v.decode("latin-1")
        auth = headers.get("authorization")
        if auth is not None:
            headers["authorization"] = "valid" if auth == self.expected_auth else "present"
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
        ex = _Exchange(send, entry)
        watcher: asyncio.Task[None] | None = None
        try:
            raw = await _read_body(receive)
            knobs, body, err = self._parse(raw, headers, route, entry)
            # Watch for client disconnects only when the response can take a while.
            slow = knobs["latency_ms"] > 0 or knobs["error_rate"] > 0 or knobs["keepalive_comments"] > 0
            if entry["stream"] or slow:
                ex.task = asyncio.current_task()
                watcher = asyncio.ensure_future(_watch_disconnect(receive, ex))
            await self._respond(ex, route, knobs, body, err)
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
        """Decode body + knobs and validate. Returns (knobs, body, error-or-None)."""
        flavor = self.flavor
        knobs = self.knobs
        if flavor.name == "sglang" and not headers.get("content-type", "").startswith("application/json"):
            return knobs, {}, ErrorSpec(400, "Content-Type must be application/json", "invalid_request_error",
                                        "invalid_request_error")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return knobs, {}, ErrorSpec(400, f"Invalid JSON body: {exc}", "invalid_request_error",
                                        "invalid_request_error")
        if not isinstance(body, dict):
            return knobs, {}, ErrorSpec(400, "Request body must be a JSON object", "invalid_request_error",
                                        "invalid_request_error")
        entry["body"] = body
        entry["stream"] = body.get("stream") is True
        try:
            fake = body.get("fake")
            if isinstance(fake, dict) and fake:
                knobs = merge_knobs(knobs, fake)
            fault_header = headers.get("x-fault")
            if fault_header:
                knobs = merge_knobs(knobs, parse_fault_header(fault_header))
        except KnobError as exc:
            return knobs, body, ErrorSpec(400, f"fake upstream: {exc}", "invalid_request_error",
                                          "invalid_request_error")
        err = self._auth_error_from(headers)
        if err is not None:
            return knobs, body, err
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = flavor.default_model(self.models)
            if model is None:
                return knobs, body, _missing("model")
            body["model"] = model
        entry["model"] = model
        if route in CHAT_ROUTES:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return knobs, body, _missing("messages")
        elif body.get("prompt") is None:
            return knobs, body, _missing("prompt")
        if not self.any_model and model not in self.model_set:
            return knobs, body, flavor.model_not_found(model)
        return knobs, body, flavor.validate(route, body, self._reasoning_chunks(knobs, body, route) > 0)

    def _auth_error_from(self, headers: dict[str, str]) -> ErrorSpec | None:
        if self.expected_auth is None or headers.get("authorization") == "valid":
            return None
        return self.flavor.unauthorized()

    def _reasoning_chunks(self, knobs: dict[str, Any], body: dict[str, Any], route: str) -> int:
        if route not in CHAT_ROUTES:
            return 0
        r = knobs["reasoning"]
        if r is None:
            return DEFAULT_REASONING_CHUNKS if self.flavor.thinking_requested(body) else 0
        return int(r)

    async def _respond(
        self, ex: _Exchange, route: str, knobs: dict[str, Any], body: dict[str, Any], err: ErrorSpec | None
    ) -> None:
        fault: str | None = None
        if err is None:
            rate = knobs["error_rate"]
            if rate > 0 and (rate >= 1 or self.rng.random() < rate):
                fault = knobs["error_kind"]
                ex.entry["fault"] = fault
        if knobs["latency_ms"] > 0:
            await asyncio.sleep(knobs["latency_ms"] / 1000)
        if err is not None:
            await self._send_error(ex, err)
            return
        stream = ex.entry["stream"]
        if fault is not None:
            if fault in HTTP_ERROR_KINDS:
                if fault == "context_length":
                    spec = context_length_error(estimate_prompt_tokens(body), max_output_tokens(body) or 0,
                                                knobs["max_model_len"])
                else:
                    spec = FAULT_ERRORS[fault]
                extra = [(b"retry-after", _retry_after(knobs["retry_after"]))] if (
                    fault == "429" and knobs["retry_after"] > 0) else []
                await self._send_error(ex, spec, extra)
                return
            if fault == "redirect":
                await ex.start(302, [(b"location", REDIRECT_LOCATION), (b"content-length", b"0")])
                await ex.finish()
                return
            if fault == "in_band" and not stream:
                await self._send_error(ex, FAULT_ERRORS["in_band"])
                return
            if fault == "hang":
                await asyncio.sleep(knobs["stall_ms"] / 1000)
        flavor = self.flavor
        chat = route in CHAT_ROUTES
        plan = build_plan(
            body,
            knobs,
            chat=chat,
            reasoning_chunks=self._reasoning_chunks(knobs, body, route),
            empty_json=fault == "empty_json",
            new_tool_id=flavor.tool_id,
        )
        rid = flavor.chat_id() if chat else flavor.completion_id()
        created = int(time.time())
        send_usage = fault != "no_usage"
        if stream:
            await self._stream(ex, knobs, body, plan, fault, chat=chat, rid=rid, created=created,
                               send_usage=send_usage)
        else:
            await self._non_stream(ex, knobs, body, plan, fault, chat=chat, rid=rid, created=created,
                                   send_usage=send_usage)

    async def _non_stream(
        self, ex: _Exchange, knobs: dict[str, Any], body: dict[str, Any], plan: Plan, fault: str | None,
        *, chat: bool, rid: str, created: int, send_usage: bool,
    ) -> None:
        payload = orjson.dumps(
            response_body(self.flavor, plan, chat=chat, rid=rid, created=created, model=body["model"],
                          send_usage=send_usage)
        )
        if fault == "bad_json":
            payload = b"{not json"
        keepalives = knobs["keepalive_comments"] if self.flavor.name == "deepseek" else 0
        if fault == "cut":
            await ex.start(200, JSON_HEADERS + [(b"content-length", str(len(payload)).encode())])
            await ex.write(payload[: len(payload) // 2])
            raise FakeConnectionCut()
        if keepalives or fault == "stall":
            await ex.start(200, JSON_HEADERS)
            for _ in range(keepalives):
                await ex.write(b"\n")
                if knobs["keepalive_ms"] > 0:
                    await asyncio.sleep(knobs["keepalive_ms"] / 1000)
            if fault == "stall":
                await asyncio.sleep(knobs["stall_ms"] / 1000)
        else:
            await ex.start(200, JSON_HEADERS + [(b"content-length", str(len(payload)).encode())])
        ex.entry["tokens_sent"] = plan.completion_tokens
        await ex.finish(payload)

    async def _stream(
        self, ex: _Exchange, knobs: dict[str, Any], body: dict[str, Any], plan: Plan, fault: str | None,
        *, chat: bool, rid: str, created: int, send_usage: bool,
    ) -> None:
        flavor = self.flavor
        entry = ex.entry
        await ex.start(200, SSE_HEADERS)
        for _ in range(knobs["keepalive_comments"]):
            await ex.write(KEEPALIVE)
            if knobs["keepalive_ms"] > 0:
                await asyncio.sleep(knobs["keepalive_ms"] / 1000)
        if knobs["ttft_ms"] > 0:
            await asyncio.sleep(knobs["ttft_ms"] / 1000)
        if fault == "in_band":
            await ex.write(sse(flavor.stream_error(FAULT_ERRORS["in_band"])))
            await ex.write(DONE)
            await ex.finish()
            return
        events: list[Event] = stream_events(
            flavor, plan, chat=chat, rid=rid, created=created, model=body["model"],
            include_usage=flavor.include_usage(body), send_usage=send_usage,
        )
        cut_at = _position_after_gen(events, knobs["cut_after"]) if fault == "cut" else -1
        stall_at = _position_after_gen(events, knobs["stall_after"]) if fault == "stall" else -1
        if fault == "bad_json" and knobs["bad_json_at"] < len(events):
            idx = knobs["bad_json_at"]
            events[idx] = (BAD_JSON, 0, events[idx][2])
        delay = knobs["chunk_delay_ms"] / 1000
        seen_gen = False
        tokens = 0
        for i, (data, n, gen) in enumerate(events):
            if i == cut_at:
                raise FakeConnectionCut()  # no finish chunk, no [DONE]
            if i == stall_at:
                await asyncio.sleep(knobs["stall_ms"] / 1000)
            if gen:
                if seen_gen and delay > 0:
                    await asyncio.sleep(delay)
                seen_gen = True
            await ex.write(data)
            tokens += n
            entry["tokens_sent"] = tokens
        if cut_at >= len(events):
            raise FakeConnectionCut()
        if fault == "no_done":
            await ex.finish()
        else:
            await ex.finish(DONE)

    async def _send_error(
        self, target: _Exchange | Send, err: ErrorSpec, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        payload = orjson.dumps(self.flavor.error_body(err))
        headers = JSON_HEADERS + [(b"content-length", str(len(payload)).encode())]
        headers += self.flavor.error_headers(err)
        if extra:
            headers += extra
        if isinstance(target, _Exchange):
            await target.start(err.status, headers)
            await target.finish(payload)
        else:
            await target({"type": "http.response.start", "status": err.status, "headers": headers})
            await target({"type": "http.response.body", "body": payload})


def _position_after_gen(events: list[Event], n: int) -> int:
    """Index of the event that follows the n-th generated chunk (or the last one if fewer)."""
    seen = 0
    last_gen = -1
    for i, (_, _, gen) in enumerate(events):
        if gen:
            if seen == n:
                return i
            seen += 1
            last_gen = i
    return last_gen + 1 if last_gen >= 0 else (1 if events else 0)


def _missing(field: str) -> ErrorSpec:
    return ErrorSpec(400, f"Failed to deserialize the JSON body into the target type: missing field `{field}`",
                     "invalid_request_error", "invalid_request_error", field)


async def _read_body(receive: Receive) -> bytes:
    msg = await receive()
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        return body
    parts = [body]
    while msg.get("more_body"):
        msg = await receive()
        parts.append(msg.get("body", b""))
    return b"".join(parts)


async def _read_json_or_empty(receive: Receive) -> Any:
    raw = await _read_body(receive)
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _send_json(send: Send, status: int, obj: Any) -> None:
    payload = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": JSON_HEADERS + [(b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app(config: FakeConfig) -> FakeUpstream:
    """Build the ASGI app for ``config``."""
    return FakeUpstream(config)
