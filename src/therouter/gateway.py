"""The use case: key -> validate -> admit (limits, budget) -> route (attempts, fallback) -> stream/collect -> settle.

Nothing here knows FastAPI. The api layer hands in the raw body and a way to learn that the client went away, and
gets back a :class:`JSONAnswer` or a :class:`StreamAnswer` (whose first event already passed the first-chunk gate).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson

from therouter import validate
from therouter.config import Settings
from therouter.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NoDeploymentAvailable,
    PermissionDenied,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStreamError,
    UpstreamTimeout,
)
from therouter.keys import KeyRecord
from therouter.metering.meter import Admission, Meter
from therouter.metering.records import GenerationRecord
from therouter.protocol.usage import Usage
from therouter.routing.attempts import AttemptPolicy
from therouter.routing.router import Candidate, Needs, Router, Skip
from therouter.streaming import ChunkRewriter, UpstreamEvents

log = logging.getLogger("therouter.gateway")
NANO = Decimal(10**9)


@dataclass(slots=True)
class JSONAnswer:
    body: bytes
    headers: dict[str, str]
    status: int = 200


@dataclass(slots=True)
class StreamAnswer:
    headers: dict[str, str]
    events: AsyncIterator[bytes]


@dataclass(slots=True)
class Call:
    """Everything about one client request once it is validated and admitted."""

    key: KeyRecord
    endpoint: str  # "chat" | "completions"
    checked: validate.Checked
    gen_id: str
    request_id: str
    created: int
    started: float
    adm: Admission | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    settled: bool = False

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex


def cost_fragment(nano: int) -> orjson.Fragment:
    """USD as an exact JSON number (never a float)."""
    return orjson.Fragment(format(Decimal(nano) / NANO, "f").encode())


class Gateway:
    def __init__(self, settings: Settings, router: Router, meter: Meter, policy: AttemptPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.router = router
        self.meter = meter
        self.policy = policy or AttemptPolicy()
        self.clock = clock

    # ---- entry ----------------------------------------------------------------------------------------------

    async def handle(self, key: KeyRecord, endpoint: str, raw: bytes, request_id: str,
                     wait_disconnect: Callable[[], Awaitable[None]] | None = None) -> JSONAnswer | StreamAnswer:
        s = self.settings.server
        body = validate.parse_body(raw, s.max_body_bytes, s.max_json_depth)
        model = validate.require_model(body)
        card = self.router.card(model)
        if card is None:
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.",
                                param="model")
        if key.models and model not in key.models:
            raise PermissionDenied(f"This API key is not allowed to use the model `{model}`.", param="model")
        checked = (validate.check_chat if endpoint == "chat" else validate.check_completion)(body, card, model)
        call = Call(key=key, endpoint=endpoint, checked=checked, gen_id=new_id(endpoint), request_id=request_id,
                    created=int(time.time()), started=self.clock())
        cands = self._candidates(call)
        max_out = checked.max_tokens or card.max_output_tokens
        call.adm = await self.meter.admit(key, model, checked.prompt_tokens, max_out, call.gen_id)
        try:
            if checked.stream:
                return await self._stream(call, cands)
            return await self._json(call, cands, wait_disconnect)
        except BaseException as e:
            if not call.settled:
                await self._settle_failure(call, e)
            raise

    def _candidates(self, call: Call) -> list[Candidate]:
        b = call.checked.body
        rf = b.get("response_format") if isinstance(b.get("response_format"), dict) else {}
        stop = b.get("stop")
        needs = validate_needs(b, call, rf, stop)
        cands, skipped = self.router.candidates(call.checked.model, needs)
        call.skipped = skipped
        if cands:
            return cands
        if skipped and all(s.reason.startswith("missing capability") for s in skipped):
            cap = skipped[0].reason.split(": ", 1)[1]
            param = {"tools": "tools", "fim": "suffix"}.get(cap, "response_format")
            raise InvalidRequest(f"No deployment of `{call.checked.model}` supports {cap}.", param=param,
                                 code="unsupported_parameter")
        why = "; ".join(f"{s.provider}: {s.reason}" for s in skipped)
        raise NoDeploymentAvailable(f"No deployment of `{call.checked.model}` is available ({why}).")

    def _headers(self, call: Call, provider: str | None) -> dict[str, str]:
        h = dict(call.adm.headers) if call.adm else {}
        if provider:
            h["x-therouter-provider"] = provider
        h["x-therouter-attempts"] = str(len(call.attempts))
        h["x-therouter-generation-id"] = call.gen_id
        return h

    def _deadline(self, call: Call) -> float:
        return call.started + self.settings.server.request_deadline

    # ---- non-stream -------------------------------------------------------------------------------------------

    async def _json(self, call: Call, cands: list[Candidate],
                    wait_disconnect: Callable[[], Awaitable[None]] | None) -> JSONAnswer:
        async def attempt(c: Candidate) -> tuple[dict[str, Any], Usage]:
            return await self._json_attempt(call, c)

        cand, (obj, usage) = await self.policy.run(call, cands, attempt, self._deadline(call), self.clock,
                                                    cancel_on=wait_disconnect)
        cost = await self._settle(call, cand, usage, "completed", stream=False)
        obj["id"] = call.gen_id
        obj["model"] = call.checked.model
        obj["provider"] = cand.name
        u = usage.to_openai(obj.get("usage") if isinstance(obj.get("usage"), dict) else None)
        u["cost"] = cost_fragment(cost)
        obj["usage"] = u
        return JSONAnswer(orjson.dumps(obj), self._headers(call, cand.name))

    async def _json_attempt(self, call: Call, c: Candidate) -> tuple[dict[str, Any], Usage]:
        p, t = c.provider, c.provider.config.timeouts
        build = p.chat_request if call.endpoint == "chat" else p.completion_request
        req = build(call.checked.body, c.dep, stream=False, request_id=call.request_id)
        budget = max(min(t.total, self._deadline(call) - self.clock()), 0.001)
        resp = await p.transport.send(req, connect=t.connect, headers_timeout=budget)
        try:
            try:
                async with asyncio.timeout(max(budget - 0.0, 0.001)):
                    raw = await resp.read()
            except TimeoutError:
                raise UpstreamTimeout("upstream did not finish its answer in time", sent=True) from None
            if resp.status != 200:
                raise p.map_error(resp.status, raw, resp.headers)
            obj = p.parse_json(raw)
        finally:
            await resp.close()
        u = obj.get("usage")
        if isinstance(u, dict):
            usage = p.usage(u)
        else:
            usage = Usage(prompt_tokens=call.checked.prompt_tokens,
                          completion_tokens=_json_chars(obj) // 4 + 1, estimated=True)
        return obj, usage

    # ---- stream -----------------------------------------------------------------------------------------------

    async def _stream(self, call: Call, cands: list[Candidate]) -> StreamAnswer:
        async def attempt(c: Candidate) -> tuple[UpstreamEvents, ChunkRewriter, list[bytes]]:
            return await self._open_stream(call, c)

        cand, (events, rw, first) = await self.policy.run(call, cands, attempt, self._deadline(call), self.clock)
        return StreamAnswer(self._headers(call, cand.name), self._pump(call, cand, events, rw, first))

    async def _open_stream(self, call: Call, c: Candidate) -> tuple[UpstreamEvents, ChunkRewriter, list[bytes]]:
        """Open the upstream stream and hold it until its first data event is real generation (first-chunk gate)."""
        p, t = c.provider, c.provider.config.timeouts
        build = p.chat_request if call.endpoint == "chat" else p.completion_request
        req = build(call.checked.body, c.dep, stream=True, request_id=call.request_id)
        first_token = min(t.first_token, max(self._deadline(call) - self.clock(), 0.001))
        sent_at = self.clock()
        resp = await p.transport.send(req, connect=t.connect, headers_timeout=first_token)
        if resp.status != 200:
            try:
                async with asyncio.timeout(5):
                    raw = await resp.read()
            except (TimeoutError, GatewayError):
                raw = b""
            finally:
                await resp.close()
            raise p.map_error(resp.status, raw, resp.headers)
        events = UpstreamEvents(resp, first_token=first_token, idle=t.idle, total=t.total, clock=self.clock,
                                started=sent_at)
        rw = ChunkRewriter(p, gen_id=call.gen_id, model=call.checked.model, created=call.created,
                           object_=call.object, include_usage=call.checked.include_usage)
        first: list[bytes] = []
        try:
            while not first:
                try:
                    obj = await events.__anext__()
                except StopAsyncIteration:
                    raise UpstreamStreamError("upstream stream ended before any content", sent=True) from None
                err = p.in_band_error(obj)
                if err is not None:
                    raise err
                out = rw.rewrite(obj)
                if out:
                    first.append(out)
        except BaseException:
            await events.aclose()
            raise
        return events, rw, first

    async def _pump(self, call: Call, cand: Candidate, events: UpstreamEvents, rw: ChunkRewriter,
                    first: list[bytes]) -> AsyncIterator[bytes]:
        outcome = "client_cancelled"
        error: GatewayError | None = None
        try:
            for b in first:
                yield b
            async for obj in events:
                err = cand.provider.in_band_error(obj)
                if err is not None:
                    raise UpstreamStreamError(f"upstream failed mid-stream: {err.message}", sent=True)
                out = rw.rewrite(obj)
                if out:
                    yield out
            if not events.saw_done and rw.finish_reason is None:
                raise UpstreamStreamError("upstream closed the stream before it finished", sent=True,
                                          code="upstream_cut")
            outcome = "completed"
        except GatewayError as e:
            outcome, error = "upstream_cut", e
            log.warning("stream %s from %s broke: %s", call.gen_id, cand.name, e.message)
        finally:
            await events.aclose()
            usage = rw.final_usage(call.checked.prompt_tokens)
            if outcome != "completed":
                usage.estimated = usage.estimated or rw.usage_raw is None
            settle = asyncio.ensure_future(self._settle(call, cand, usage, outcome, stream=True))
            cost = await asyncio.shield(settle)
        if error is not None:
            yield b"data: " + orjson.dumps({"error": {"message": error.message, "type": error.type,
                                                      "param": None, "code": error.code}}) + b"\n\n"
            return
        if call.checked.include_usage:
            yield rw.usage_event(usage, {"cost": cost_fragment(cost)})
        yield b"data: [DONE]\n\n"

    # ---- metering ---------------------------------------------------------------------------------------------

    def _record(self, call: Call, cand: Candidate | None, usage: Usage, outcome: str, stream: bool,
                ttft_ms: int | None = None) -> GenerationRecord:
        return GenerationRecord(
            id=call.gen_id, key_id=call.key.id, model=call.checked.model,
            provider=cand.name if cand else "", upstream_model=cand.dep.model if cand else "",
            usage=usage, cost_nano=0, price_version=call.adm.price_version if call.adm else 0,
            created=call.created, latency_ms=int((self.clock() - call.started) * 1000), ttft_ms=ttft_ms,
            outcome=outcome, stream=stream, attempts=list(call.attempts),
            skipped=[s.to_dict() for s in call.skipped],
        )

    async def _settle(self, call: Call, cand: Candidate | None, usage: Usage, outcome: str, stream: bool) -> int:
        call.settled = True
        assert call.adm is not None
        rec = self._record(call, cand, usage, outcome, stream)
        return await asyncio.shield(self.meter.settle(call.adm, rec))

    async def _settle_failure(self, call: Call, exc: BaseException) -> None:
        """A request that produced nothing: release its reservation and keep a zero-cost record of the attempts."""
        call.settled = True
        if call.adm is None:
            return
        outcome = "client_cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
        rec = self._record(call, None, Usage(), outcome, call.checked.stream)
        await asyncio.shield(self.meter.settle(call.adm, rec))


def validate_needs(b: dict[str, Any], call: Call, rf: dict[str, Any], stop: Any) -> Needs:
    return Needs(
        tools=bool(b.get("tools")) and b.get("tool_choice") != "none",
        json_object=rf.get("type") == "json_object",
        json_schema=rf.get("type") == "json_schema",
        fim=call.endpoint == "completions" and b.get("suffix") is not None,
        tokens=call.checked.prompt_tokens + (call.checked.max_tokens or 0),
        stops=len(stop) if isinstance(stop, list) else (1 if stop else 0),
    )


def _json_chars(obj: dict[str, Any]) -> int:
    n = 0
    for ch in obj.get("choices") or ():
        msg = ch.get("message") if isinstance(ch, dict) else None
        if isinstance(msg, dict):
            n += len(str(msg.get("content") or "")) + len(str(msg.get("reasoning_content") or ""))
        elif isinstance(ch, dict):
            n += len(str(ch.get("text") or ""))
    return n


__all__ = ["Gateway", "JSONAnswer", "StreamAnswer", "UpstreamError", "UpstreamRateLimited"]
