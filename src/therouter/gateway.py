"""The use case: key -> validate -> admit (limits, budget) -> route (attempts, fallback) -> stream/collect -> settle.

Nothing here knows FastAPI. The api layer hands in the raw body and a way to learn that the client went away, and
gets back a :class:`JSONAnswer` or a :class:`StreamAnswer` (whose first event already passed the first-chunk gate).

Reading order: :meth:`Gateway.handle` (validate, admit) -> :meth:`Gateway._route` (each model of the plan through
:class:`~therouter.routing.attempts.AttemptPolicy`: pick / try / record) -> an attempt asks the provider
(:meth:`Provider.complete` for a JSON answer, :meth:`Provider.open_stream` for events, held at :meth:`_gate`) ->
a stream is handed to :class:`~therouter.streaming.ClientStream`, which relays, frames and finishes it once
(:meth:`_finish_stream` settles); a JSON answer is settled in :meth:`_json` / :meth:`_assemble`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from therouter import native as native_relay
from therouter import params, validate
from therouter.assembly import Assembler
from therouter.config import Deployment, ModelConfig, Settings
from therouter.disconnect import Gone, unless_gone
from therouter.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    UpstreamError,
    UpstreamStreamError,
)
from therouter.keys import KeyRecord
from therouter.logs import log_request
from therouter.metering.admission import Admission
from therouter.metering.meter import Meter
from therouter.metering.prices import nano_to_usd
from therouter.metering.records import GenerationRecord, Outcome
from therouter.observability import Finished, Metrics
from therouter.protocol.endpoint import Endpoint
from therouter.protocol.endpoint import endpoint as protocol_endpoint
from therouter.protocol.responses import ChatCompletion, Identity
from therouter.protocol.usage import Usage
from therouter.providers import Provider, UpstreamEvents, UpstreamRequest
from therouter.providers.wire import NativeRequest
from therouter.routing.attempts import (
    Attempt,
    AttemptPolicy,
    Exhausted,
    all_failed,
)
from therouter.routing.balance import prompt_prefix
from therouter.routing.preferences import NO_PREFERENCES, Preferences, parse_preferences
from therouter.routing.router import Candidate, Needs, Router, Skip, SkipKind
from therouter.routing.state import Lease
from therouter.streaming import (
    ChunkRewriter,
    ClientStream,
    InBandError,
    Relay,
    UsageTap,
    broken_stream_outcome,
)
from therouter.tracing import Tracing

log = logging.getLogger("therouter.gateway")
T = TypeVar("T")


@dataclass(slots=True)
class JSONAnswer:
    body: bytes
    headers: dict[str, str]
    status: int = 200
    native: bool = False  # the body is already in the client's wire format (see therouter.native)


@dataclass(slots=True)
class StreamAnswer:
    headers: dict[str, str]
    events: AsyncIterator[bytes]
    native: bool = False  # the events are already in the client's wire format


@dataclass(slots=True)
class Call:
    """Everything about one client request once it is validated and admitted."""

    key: KeyRecord
    endpoint: Endpoint
    checked: validate.Checked
    gen_id: str
    request_id: str
    created: int
    started: float
    prefs: Preferences = NO_PREFERENCES
    adm: Admission | None = None
    attempts: list[Attempt] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    settled: bool = False
    lease: Lease | None = None  # the serving attempt's in-flight slot, held until the answer is complete
    ttft: float | None = None  # streamed upstream: seconds from the request to the first content chunk (the gate)
    release: Callable[[], None] | None = None  # leaves the retry budget's count of requests in flight
    # per (provider, id of the deployment): a deployment is a frozen pydantic model, whose hash is computed per call
    built: dict[tuple[str, int], UpstreamRequest] = field(default_factory=dict)
    observed: bool = False  # its answer was counted and logged (once)
    native: NativeRequest | None = None  # the client's own wire request (/v1/messages), for a provider that speaks it

    def built_for(self, provider: str, dep: Deployment) -> UpstreamRequest | None:
        """The upstream request built for this deployment, if it was."""
        return self.built.get((provider, id(dep)))

    @property
    def plan(self) -> list[str]:
        """The models to try, in order: the request's model, then its `models` fallbacks."""
        return [self.checked.model, *self.prefs.models]

    def done(self) -> None:
        """The request is over: free its in-flight slots (idempotent)."""
        if self.lease is not None:
            self.lease.close()
        if self.release is not None:
            self.release()
            self.release = None


@dataclass(slots=True)
class _Assembly:
    """A non-stream answer being assembled from an upstream stream that passed the first-chunk gate."""

    events: UpstreamEvents
    asm: Assembler


def cost_fragment(nano: int) -> orjson.Fragment:
    """USD as an exact JSON number (never a float)."""
    return orjson.Fragment(nano_to_usd(nano).encode())


class Gateway:
    def __init__(self, settings: Settings, router: Router, meter: Meter, policy: AttemptPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.router = router
        self.meter = meter
        self.policy = policy or AttemptPolicy(router)
        self.clock = clock
        self.metrics = metrics
        self.tracing = tracing

    # ---- entry ----------------------------------------------------------------------------------------------

    async def handle(self, key: KeyRecord, endpoint: str, raw: bytes, request_id: str,
                     wait_disconnect: Gone | None = None,
                     native: NativeRequest | None = None) -> JSONAnswer | StreamAnswer:
        """``native``: the request as the client sent it in another wire format (an Anthropic Messages body), of
        which ``raw`` is the OpenAI translation: a provider that speaks it gets it as it is (see
        :meth:`Provider.native_request`); everything else (limits, routing, metering) reads the translation."""
        s = self.settings.server
        started, model = self.clock(), ""
        label = _label(endpoint, native)
        if self.tracing is not None:
            self.tracing.begin(label, request_id)
        try:
            body = validate.parse_body(raw, s.max_body_bytes, s.max_json_depth)
            asked = validate.require_model(body)
            model = self.settings.canonical(asked)  # an alias resolves here: everything after sees the canonical id
            card = self.router.card(model)
            if card is None:
                raise ModelNotFound(f"The model `{asked}` does not exist or you do not have access to it.",
                                    param="model")
            allowed = tuple(self.settings.canonical(m) for m in key.models)
            if allowed and model not in allowed:
                raise PermissionDenied(f"This API key is not allowed to use the model `{asked}`.", param="model")
            ep = protocol_endpoint(endpoint)
            checked = validate.check(ep.name, body, card, model,
                                     catalogue=self._allowed_models(key))
            prefs = parse_preferences(body, self.router.providers, self.settings.models, model, allowed,
                                      self.router.state.options.max_models, aliases=self.settings.aliases)
            call = Call(key=key, endpoint=ep, checked=checked, gen_id=ep.new_id(), request_id=request_id,
                        created=int(time.time()), started=started, prefs=prefs, native=native)
            routes = self._first_routes(call)
            # the prompt bound builds every deployment's request: only a budget needs it (the reservation)
            bound = self._prompt_bound(call) if key.budget_nano is not None else None
            call.adm = await self.meter.admit(key, model, checked.prompt_tokens, checked.max_tokens or 0,
                                              call.gen_id, sequences=checked.sequences, prompt_bound=bound,
                                              fallbacks=prefs.models)
        except BaseException as e:  # refused before admission: counted and logged, nothing to settle
            outcome = "refused" if isinstance(e, GatewayError) else _failure_outcome(e)
            self._finish(Finished(request_id, _status(e), outcome, model if model in self.settings.models else "",
                                  seconds=self.clock() - started, key_id=key.id,
                                  error=e if isinstance(e, GatewayError) else None, endpoint=label))
            raise
        budget = self.router.state.budget
        budget.enter()
        call.release = budget.leave
        try:
            if checked.stream:
                return await self._stream(call, routes, wait_disconnect)
            return await self._json(call, routes, wait_disconnect)
        except BaseException as e:
            call.done()
            usage, cost = None, 0
            if not call.settled:
                usage, cost = await self._settle_failure(call, e)
            self._observe(call, None, _status(e), _failure_outcome(e), usage, cost, e)
            if isinstance(e, GatewayError) and call.adm is not None:
                # x-ratelimit-* on every answer of a limited key; the generation id leads to the attempts' record
                e.headers = {**call.adm.headers, "x-therouter-generation-id": call.gen_id, **e.headers}
            raise

    def _allowed_models(self, key: KeyRecord) -> Mapping[str, ModelConfig]:
        """The catalogue this key may use (what a refusal may point it to)."""
        models = self.settings.models
        return {m: c for m, c in models.items() if m in key.models} if key.models else models

    # ---- routing ----------------------------------------------------------------------------------------------

    def _candidates(self, call: Call, model_id: str) -> list[Candidate]:
        b = call.checked.body
        rf: dict[str, Any] = b["response_format"] if isinstance(b.get("response_format"), dict) else {}
        strict = call.prefs.require_parameters or self.settings.routing.unsupported_parameters == "reject"
        needs = validate_needs(b, call, rf, b.get("stop"), strict)
        opts = self.router.state.options
        prefix = prompt_prefix(b, opts.affinity_prefix_chars) if opts.affinity_for(model_id) else ""
        cands, skipped = self.router.candidates(model_id, needs, call.prefs, prefix)
        # what only a deployment speaking the client's wire format takes (documents) narrows the choice
        cands = native_relay.keep_native(call.native, cands, skipped, model_id)
        call.skipped.extend(skipped)
        return cands

    def _first_routes(self, call: Call) -> dict[str, list[Candidate]]:
        """Candidates of the first model that has any (checked before admission: a fast 4xx / 503 costs nothing)."""
        routes: dict[str, list[Candidate]] = {}
        for model_id in call.plan:
            routes[model_id] = self._candidates(call, model_id)
            if routes[model_id]:
                return routes
        raise self._nothing_served(call, [])

    def _nothing_served(self, call: Call, errors: list[tuple[Candidate, GatewayError]]) -> GatewayError:
        """Nothing served: a 400 naming the parameter when every deployment lacks what the request asks for, else
        the attempts' and skips' account (502 / 503 / 504)."""
        skipped = call.skipped
        if not errors and skipped and all(s.kind is SkipKind.UNSUITED for s in skipped):
            first = skipped[0]
            raise InvalidRequest(f"No deployment of `{call.checked.model}` supports {first.lacking}.",
                                 param=first.param, code="unsupported_parameter")
        return all_failed(errors, skipped, call.checked.model)

    async def _route(self, call: Call, routes: dict[str, list[Candidate]], attempt: Callable[[Candidate], Any],
                     cancel_on: Gone | None = None) -> tuple[Candidate, Any]:
        errors: list[tuple[Candidate, GatewayError]] = []
        deadline = self._deadline(call)
        for model_id in call.plan:
            if model_id not in routes and self.clock() >= deadline:
                break
            cands = routes[model_id] if model_id in routes else self._candidates(call, model_id)
            if not cands:
                continue
            try:
                cand, result, lease = await self.policy.run(call, cands, attempt, deadline, self.clock,
                                                            cancel_on=cancel_on, stream=call.checked.stream)
            except Exhausted as ex:
                errors.extend(ex.errors)
                continue
            call.lease = lease
            return cand, result
        raise self._nothing_served(call, errors)

    def _request(self, call: Call, p: Provider, dep: Deployment, model_id: str) -> UpstreamRequest:
        """The upstream request for one deployment, built once per call: what is reserved for is what is sent."""
        req = call.built_for(p.name, dep)
        if req is None:
            # hints this host does not honour are left out (and named in the answer); see params.py
            dropped = params.dropped_for(call.checked.body, self.settings.models[model_id], dep)
            body = params.without(call.checked.body, dropped)
            stream = call.checked.stream or p.config.assembles
            native = None if call.native is None else p.native_request(call.native, call.checked.body, dep,
                                                                       stream=stream, request_id=call.request_id)
            req = native or p.request(call.endpoint, body, dep, stream=stream, request_id=call.request_id,
                                      max_output=self.settings.models[model_id].max_output_tokens)
            req.meta["dropped"] = dropped
            call.built[(p.name, id(dep))] = req
        return req


    def _prompt_bound(self, call: Call) -> int:
        """The most prompt tokens any deployment that may serve this call can be billed for: the largest upstream
        request as built (instructions an adapter adds included), capped at the largest context window."""
        bound, window = 0, 0
        for model_id in call.plan:
            card = self.settings.models[model_id]
            window = max(window, card.context_length)
            for dep in card.deployments:
                try:
                    req = self._request(call, self.router.providers[dep.provider], dep, model_id)
                except GatewayError:
                    continue  # this deployment cannot take the request at all (e.g. no FIM): it is never sent
                bound = max(bound, validate.prompt_bound(req.body, call.checked))
        return min(bound, window) if bound else call.checked.prompt_tokens

    def _headers(self, call: Call, cand: Candidate | None) -> dict[str, str]:
        h = dict(call.adm.headers) if call.adm else {}
        if cand is not None:
            h["x-therouter-provider"] = cand.name
            if cand.model_id != call.checked.model:
                h["x-therouter-model"] = cand.model_id
            dropped = self._dropped(call, cand)
            if dropped:
                h["x-therouter-dropped-params"] = ",".join(dropped)
            downgraded = self._downgraded(call, cand)
            if downgraded:
                h["x-therouter-downgraded"] = ",".join(downgraded)
        h["x-therouter-attempts"] = str(len(call.attempts))
        h["x-therouter-generation-id"] = call.gen_id
        return h

    @staticmethod
    def _dropped(call: Call, cand: Candidate) -> list[str]:
        req = call.built_for(cand.name, cand.dep)
        return list(req.meta.get("dropped") or ()) if req is not None else []  # type: ignore[call-overload]

    @staticmethod
    def _downgraded(call: Call, cand: Candidate) -> list[str]:
        """json_schema served by a JSON-mode-only deployment (the schema went as an instruction)."""
        rf = call.checked.body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema" and "json_schema" not in cand.dep.capabilities:
            return ["json_schema"]
        return []

    def _deadline(self, call: Call) -> float:
        return call.started + self.settings.server.request_deadline

    # ---- non-stream -------------------------------------------------------------------------------------------

    async def _json(self, call: Call, routes: dict[str, list[Candidate]],
                    wait_disconnect: Gone | None) -> JSONAnswer:
        async def attempt(c: Candidate) -> tuple[dict[str, Any], Usage] | _Assembly:
            if c.provider.config.assembles:  # sent as a stream: the first-chunk gate and stream timeouts apply
                return await self._open_assembly(call, c)
            return await self._json_attempt(call, c)

        cand, result = await self._route(call, routes, attempt, cancel_on=wait_disconnect)
        if isinstance(result, _Assembly):
            return await self._assemble(call, cand, result.events, result.asm, wait_disconnect)
        obj, usage = result
        if call.lease is not None:
            self.router.state.observe_throughput(cand.key, usage.completion_tokens,
                                                 self.clock() - call.lease.started)
        call.done()
        relayed = native_relay.relays(call.built_for(cand.name, cand.dep))
        cost = await self._settle(call, cand, usage, "completed", stream=False, estimate=_json_estimate(call, obj),
                                  finish_reason=native_relay.message_finish(obj) if relayed else _finish_reason(obj))
        if relayed and call.native is not None:  # the upstream's own message: our id and the client's model
            answer = JSONAnswer(native_relay.message_answer(obj, call.gen_id, call.native.model),
                                self._headers(call, cand), native=True)
            self._observe(call, cand, 200, "completed", usage, cost)
            return answer
        return self._json_answer(call, cand, obj, usage, cost)

    def _json_answer(self, call: Call, cand: Candidate, obj: dict[str, Any], usage: Usage, cost: int) -> JSONAnswer:
        if _exclude_reasoning(call):
            for ch in obj.get("choices") or ():
                if isinstance(ch, dict) and isinstance(ch.get("message"), dict):
                    ch["message"].pop("reasoning_content", None)
        u = usage.to_openai(obj.get("usage") if isinstance(obj.get("usage"), dict) else None)
        u["cost"] = cost_fragment(cost)
        who = Identity(id=call.gen_id, object=call.endpoint.object, created=call.created, model=cand.model_id,
                       provider=cand.name)
        answer = JSONAnswer(ChatCompletion.from_upstream(obj, who, u).to_json(), self._headers(call, cand))
        self._observe(call, cand, 200, "completed", usage, cost)
        return answer

    async def _json_attempt(self, call: Call, c: Candidate) -> tuple[dict[str, Any], Usage]:
        self.meter.serving(call.gen_id, c.model_id, c.name, c.dep.model, stream=False)  # checkpointed if it dies
        budget = max(min(c.provider.config.timeouts.total, self._deadline(call) - self.clock()), 0.001)
        req = self._request(call, c.provider, c.dep, c.model_id)
        limit = self.settings.server.max_upstream_body_bytes
        if native_relay.relays(req):  # the answer is kept in the client's wire format
            raw = await c.provider.complete_raw(req, budget=budget, max_body_bytes=limit)
            return native_relay.read_message(c.provider, raw, call.checked.prompt_tokens)
        obj, usage = await c.provider.complete(req, budget=budget, max_body_bytes=limit)
        return obj, usage or _json_estimate(call, obj)

    async def _open_assembly(self, call: Call, c: Candidate) -> _Assembly:
        """A non-stream request sent upstream as a stream: opened and held at the first-chunk gate like a stream."""
        events = await self._connect(call, c, total=self._deadline(call) - self.clock())
        asm = Assembler(c.provider, chat=call.endpoint.chat,
                        max_bytes=self.settings.server.max_upstream_body_bytes)
        self.meter.serving(call.gen_id, c.model_id, c.name, c.dep.model, stream=False,
                           usage=lambda: asm.final_usage(call.checked.prompt_tokens))
        async def take() -> Any:
            obj = await events.__anext__()
            err = c.provider.in_band_error(obj)
            if err is not None:
                raise InBandError(err)
            return asm.feed(obj)

        await self._gate(events, take)
        return _Assembly(events, asm)

    async def _assemble(self, call: Call, cand: Candidate, events: UpstreamEvents, asm: Assembler,
                        wait_disconnect: Gone | None) -> JSONAnswer:
        """Past the gate: read the rest into one answer. A client that leaves closes the upstream and is billed what
        was produced; a break is an error answer (502) billed like a broken stream. Settled once, shielded."""
        call.ttft = self.clock() - call.started
        outcome: Outcome = "client_cancelled"
        error: GatewayError | None = None
        try:
            drain = self._drain(cand, events, asm)
            await (unless_gone(drain, wait_disconnect) if wait_disconnect is not None else drain)
            outcome = "completed"
        except GatewayError as e:
            outcome, error = broken_stream_outcome(e), e
            log.warning("assembled answer %s from %s broke: %s: %s", call.gen_id, cand.name, e.code,
                        e.detail or e.message)
        finally:
            usage, cost = await asyncio.shield(asyncio.ensure_future(
                self._finish_stream(call, cand, events, asm, outcome, error)))
        if error is not None:
            failed = UpstreamError(f"Provider `{cand.name}` failed mid-answer: {error.message}", code=error.code,
                                   headers=self._headers(call, cand))
            self._observe(call, cand, failed.status, outcome, usage, cost, failed)
            raise failed
        obj = cand.provider.normalize_completion(asm.result(gen_id=call.gen_id, created=call.created,
                                                            model=cand.model_id))
        return self._json_answer(call, cand, obj, usage, cost)

    async def _drain(self, cand: Candidate, events: UpstreamEvents, asm: Assembler) -> None:
        async for obj in events:
            err = cand.provider.in_band_error(obj)
            if err is not None:  # the upstream's words go to the log and the record, never to the client
                raise UpstreamError("The provider reported an error in its stream.", sent=True,
                                    code="upstream_in_band_error", detail=err.detail)
            asm.feed(obj)
        if not events.saw_done and asm.finish_reason is None:
            raise UpstreamStreamError("upstream closed the stream before it finished", sent=True, code="upstream_cut")

    # ---- stream -----------------------------------------------------------------------------------------------

    async def _stream(self, call: Call, routes: dict[str, list[Candidate]],
                      wait_disconnect: Gone | None = None) -> StreamAnswer:
        async def attempt(c: Candidate) -> tuple[UpstreamEvents, Relay, list[bytes]]:
            return await self._open_stream(call, c)

        # a client that leaves while the first-chunk gate holds the answer cancels the upstream at once
        cand, (events, rw, first) = await self._route(call, routes, attempt, cancel_on=wait_disconnect)
        call.ttft = self.clock() - call.started

        async def finish(outcome: Outcome, error: GatewayError | None) -> tuple[Usage, int]:
            return await self._finish_stream(call, cand, events, rw, outcome, error)

        return StreamAnswer(self._headers(call, cand), ClientStream(events, rw, first, finish, provider=cand.name,
                                                                   cost=cost_fragment),
                            native=isinstance(rw, native_relay.MessagesRelay))

    async def _open_stream(self, call: Call, c: Candidate) -> tuple[UpstreamEvents, Relay, list[bytes]]:
        """Open the upstream stream and hold it until its first data event is real generation (first-chunk gate)."""
        p = c.provider
        events = await self._connect(call, c)
        rw: Relay
        if native_relay.relays(call.built_for(c.name, c.dep)) and call.native is not None:
            # the upstream speaks the client's wire format: its events are relayed as they come (therouter.native)
            rw = native_relay.MessagesRelay(p, gen_id=call.gen_id, model=call.native.model)
        else:
            rw = ChunkRewriter(p, gen_id=call.gen_id, model=c.model_id, created=call.created,
                               object_=call.endpoint.chunk_object, include_usage=call.checked.include_usage,
                               exclude_reasoning=_exclude_reasoning(call))
        # checkpoints read the rewriter's own counters: what a lost instance's stream is billed for
        self.meter.serving(call.gen_id, c.model_id, c.name, c.dep.model, stream=True,
                           usage=lambda: rw.final_usage(call.checked.prompt_tokens))
        async def take() -> bytes | None:
            return rw.relay(await events.next_payload())

        return events, rw, [await self._gate(events, take)]

    async def _connect(self, call: Call, c: Candidate, total: float | None = None) -> UpstreamEvents:
        """The provider opens the upstream stream under the first-token / idle / total clocks (an answer for a
        non-stream client is also capped at the request's deadline)."""
        t, srv = c.provider.config.timeouts, self.settings.server
        first_token = min(t.first_token, max(self._deadline(call) - self.clock(), 0.001))
        cap = t.total if total is None else max(min(t.total, total), 0.001)
        return await c.provider.open_stream(self._request(call, c.provider, c.dep, c.model_id),
                                            first_token=first_token, total=cap, clock=self.clock,
                                            max_event_bytes=srv.max_upstream_event_bytes,
                                            max_error_bytes=srv.max_upstream_body_bytes)

    async def _gate(self, events: UpstreamEvents, take: Callable[[], Awaitable[T | None]]) -> T:
        """Read until ``take`` returns something (the first data event that is real generation) and return it; an
        in-band error, an empty stream or any failure before that closes the upstream and fails the attempt."""
        try:
            while True:
                try:
                    out = await take()
                except StopAsyncIteration:
                    raise UpstreamStreamError("upstream stream ended before any content", sent=True) from None
                except InBandError as e:
                    raise e.error from None
                if out:
                    return out
        except BaseException:
            await events.aclose()
            raise

    async def _finish_stream(self, call: Call, cand: Candidate, events: UpstreamEvents, rw: UsageTap,
                             outcome: Outcome, error: GatewayError | None) -> tuple[Usage, int]:
        """Close the upstream, free the slots, feed the measurements and settle: once, whatever ended the stream."""
        if call.settled:
            return Usage(), 0
        await events.aclose()
        usage = rw.final_usage(call.checked.prompt_tokens)
        state = self.router.state
        if error is not None:
            usage.estimated = usage.estimated or rw.usage_raw is None
            state.observe_stream_break(cand.key, f"{error.code}: {error.message}")
            if call.attempts:  # the serving attempt passed the gate, then broke: the record says how, in full
                call.attempts[-1].stream_error = {"code": error.code,
                                                     "error": (error.detail or error.message)[:2000]}
            if self.metrics is not None:
                self.metrics.observe_stream_error(cand.name, error)
        elif outcome == "completed" and call.lease is not None:
            state.observe_throughput(cand.key, usage.completion_tokens, self.clock() - call.lease.started)
        call.done()
        cost = await self._settle(call, cand, usage, outcome, stream=call.checked.stream,
                                  estimate=rw.estimate(call.checked.prompt_tokens), finish_reason=rw.finish_reason)
        if call.checked.stream:
            self._observe(call, cand, 200, outcome, usage, cost, error)  # the stream's 200 was sent
        return usage, cost

    # ---- metering ---------------------------------------------------------------------------------------------

    def _record(self, call: Call, cand: Candidate | None, usage: Usage, outcome: Outcome,
                stream: bool, finish_reason: str | None = None) -> GenerationRecord:
        ttft_ms = int(call.ttft * 1000) if call.ttft is not None else None
        return GenerationRecord(
            id=call.gen_id, key_id=call.key.id, model=cand.model_id if cand else call.checked.model,
            provider=cand.name if cand else "", upstream_model=cand.dep.model if cand else "",
            usage=usage, cost_nano=0, price_version=call.adm.price_version if call.adm else 0,
            created=call.created, latency_ms=int((self.clock() - call.started) * 1000), ttft_ms=ttft_ms,
            outcome=outcome, stream=stream, attempts=[a.to_dict() for a in call.attempts],
            skipped=[s.to_dict() for s in call.skipped], request_id=call.request_id, finish_reason=finish_reason,
            dropped_params=self._dropped(call, cand) if cand else [],
            downgraded=self._downgraded(call, cand) if cand else [],
        )

    async def _settle(self, call: Call, cand: Candidate | None, usage: Usage, outcome: Outcome, stream: bool,
                      estimate: Usage | None = None, finish_reason: str | None = None) -> int:
        call.settled = True
        assert call.adm is not None
        rec = self._record(call, cand, usage, outcome, stream, finish_reason)
        # the cost is known here; the record is stored after the answer has left (the meter's own reads wait for it)
        return await self.meter.settle(call.adm, rec, estimate, call.checked.sequences, wait=False)

    async def _settle_failure(self, call: Call, exc: BaseException) -> tuple[Usage | None, int]:
        """A request that produced no answer: release its reservation and keep a record of the attempts."""
        call.settled = True
        if call.adm is None:
            return None, 0
        outcome, usage = _failure_outcome(exc), Usage()
        if outcome == "client_cancelled":
            # the client left while an upstream had the request: the prompt was processed, so it is billed
            # (estimated); a passthrough answer on a `finish` provider never gets here, it completes and is billed
            usage = Usage(prompt_tokens=call.checked.prompt_tokens, estimated=True)
        rec = self._record(call, None, usage, outcome, call.checked.stream)
        return usage, await asyncio.shield(self.meter.settle(call.adm, rec, choices=call.checked.sequences))

    # ---- observation --------------------------------------------------------------------------------------------

    def _observe(self, call: Call, cand: Candidate | None, status: int, outcome: str, usage: Usage | None,
                 cost: int, error: BaseException | None = None) -> None:
        """An admitted request's answer is known: observed once, whatever path ended it."""
        if call.observed:
            return
        call.observed = True
        first = call.attempts[0] if call.attempts else None
        moved = cand is not None and first is not None and (first.provider, first.model_id) != (
            cand.name, cand.model_id)
        self._finish(Finished(
            call.request_id, status, outcome, cand.model_id if cand else call.checked.model,
            cand.name if cand else "", seconds=self.clock() - call.started, ttft=call.ttft,
            generation_id=call.gen_id, key_id=call.key.id, usage=usage, cost_nano=cost, attempts=len(call.attempts),
            requested=call.checked.model, fallback_from=first.provider if moved and first else "",
            error=error if isinstance(error, GatewayError) else None, endpoint=_label(call.endpoint.name, call.native)))

    def _finish(self, f: Finished) -> None:
        """THE place a request's answer is observed: its metrics, its log line, its trace."""
        if self.metrics is not None:
            self.metrics.finish(f)
        log_request(f)
        if self.tracing is not None:
            self.tracing.finish(f)

    def refused(self, endpoint: str, request_id: str, err: GatewayError) -> None:
        """A completion request refused before it reached :meth:`handle` (401, 413): observed like the others."""
        if self.tracing is not None:
            self.tracing.begin(endpoint, request_id)
        self._finish(Finished(request_id, err.status, "refused", error=err, endpoint=endpoint))


def _status(e: BaseException) -> int:
    """The HTTP status a failure is answered with (499: the client left first, as nginx logs it)."""
    if isinstance(e, GatewayError):
        return e.status
    return 499 if isinstance(e, asyncio.CancelledError) else 500


def _failure_outcome(e: BaseException) -> Outcome:
    """The outcome of a request that got no answer: the client left, the upstream refused the request itself
    (e.g. its content), or it failed."""
    if isinstance(e, asyncio.CancelledError):
        return "client_cancelled"
    if isinstance(e, GatewayError) and 400 <= e.status < 500 and not e.fallback_ok:
        return "rejected"
    return "failed"


def validate_needs(b: dict[str, Any], call: Call, rf: dict[str, Any], stop: Any, strict: bool = False) -> Needs:
    """What a deployment must offer to serve this call. ``strict``: hints may not be dropped (require_parameters)."""
    return Needs(
        tools=bool(b.get("tools")) and b.get("tool_choice") != "none",
        json_object=rf.get("type") == "json_object",
        json_schema=rf.get("type") == "json_schema",
        fim=not call.endpoint.chat and b.get("suffix") is not None,
        tokens=call.checked.window_tokens,
        stops=len(stop) if isinstance(stop, list) else (1 if stop else 0),
        stream=call.checked.stream,
        params=params.asked_shaping(b) | (params.asked_hints(b) if strict else frozenset()),
    )


def _label(endpoint: str, native: NativeRequest | None) -> str:
    """The endpoint metrics, logs and traces name: /v1/messages is served through chat, labelled `messages`."""
    return "messages" if native is not None and native.wire == "anthropic" else endpoint


def _exclude_reasoning(call: Call) -> bool:
    r = call.checked.body.get("reasoning")
    return isinstance(r, dict) and r.get("exclude") is True


def _json_estimate(call: Call, obj: dict[str, Any]) -> Usage:
    """The gateway's own count of a non-stream answer: the prompt estimate and the answer's text / 4."""
    return Usage(prompt_tokens=call.checked.prompt_tokens, completion_tokens=_json_chars(obj) // 4 + 1, estimated=True)


def _finish_reason(obj: dict[str, Any]) -> str | None:
    choices = obj.get("choices")
    fr = choices[0].get("finish_reason") if isinstance(choices, list) and choices else None
    return fr if isinstance(fr, str) else None


def _json_chars(obj: dict[str, Any]) -> int:
    n = 0
    choices = obj.get("choices")
    for ch in choices if isinstance(choices, list) else ():
        msg = ch.get("message") if isinstance(ch, dict) else None
        if isinstance(msg, dict):
            n += len(str(msg.get("content") or "")) + len(str(msg.get("reasoning_content") or ""))
        elif isinstance(ch, dict):
            n += len(str(ch.get("text") or ""))
    return n
