"""The per-chunk rewrite of an upstream stream (the events themselves: :mod:`therouter.providers.events`).

:class:`ChunkRewriter` turns each upstream chunk into what the client receives: our id, the public model, the
provider name, OpenAI's reasoning spelling, and usage placed the OpenAI way (only in a final ``choices: []`` chunk,
only when the client asked for it), while keeping the last usage the upstream reported for metering.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from itertools import repeat, takewhile
from operator import and_, itemgetter, le, truth
from typing import Any, Protocol

import orjson

from therouter import sse
from therouter.errors import (
    GatewayError,
    UpstreamError,
    UpstreamStreamError,
    UpstreamTimeout,
)
from therouter.metering.records import Outcome
from therouter.protocol.responses import ChatCompletionChunk
from therouter.protocol.usage import Usage
from therouter.providers.base import Provider
from therouter.providers.events import UpstreamEvents, parse_event

__all__ = ["ChunkRewriter", "ClientStream", "Relay", "UpstreamEvents", "UsageTap"]
log = logging.getLogger("therouter.gateway")
# (outcome, error or None) -> the usage and cost settled: the one way a stream ends
Finisher = Callable[[Outcome, "GatewayError | None"], Awaitable[tuple[Usage, int]]]


class UsageTap:
    """What every reader of an upstream stream keeps for metering: the last usage reported, the finish reason, and the
    produced text's length (for an estimate when usage never arrives)."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.usage_raw: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.chars = 0  # produced text, for an estimate when usage never arrives
        # per stream: shape checked (UpstreamBadResponse), provider spellings (or its own events) made OpenAI's
        self._translate = provider.stream_translator()

    def take(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """One upstream event -> the OpenAI chunk it becomes (None: nothing for the client), its usage kept."""
        chunk = self._translate(obj)
        if chunk is not None:
            usage = chunk.pop("usage", None)
            if isinstance(usage, dict):
                self.usage_raw = usage
        return chunk

    def final_usage(self, prompt_estimate: int) -> Usage:
        if self.usage_raw is not None:
            return self.provider.usage(self.usage_raw)
        return self.estimate(prompt_estimate)

    def estimate(self, prompt_estimate: int) -> Usage:
        """The gateway's own count: the prompt estimate and the relayed text / 4."""
        return Usage(prompt_tokens=prompt_estimate, completion_tokens=(self.chars + 3) // 4, estimated=True)


# ---- plain chunks, relayed as bytes --------------------------------------------------------------------------------
# Most events of a stream differ from the one before only in their text: a delta of content (or reasoning) and
# nothing else. Such an event is not parsed: once one has been parsed and rewritten, it is a template (the upstream's
# bytes around its text string, and our rewrite's bytes around the same string), and every later event that is
# exactly the upstream side's head + a valid JSON string body + tail is relayed as our head + that body + our tail.
# Anything else (usage, a finish reason, an error, tool calls, reasoning to strip, a field that changed) is parsed and
# rewritten in full, so the bytes sent are always what the full rewrite would send.


@dataclass(slots=True, frozen=True)
class _Template:
    head: bytes  # the upstream event up to its text string's opening quote
    tail: bytes  # from its closing quote on
    out_head: bytes  # our event, likewise
    out_tail: bytes
    mid: Callable[[bytes], bytes]  # an event of this template -> its text, between head and tail (an itemgetter)
    least: int  # len(head) + len(tail)

    def relay(self, payload: bytes) -> tuple[bytes, int] | None:
        """(our event, characters of text) if ``payload`` is this template's event with another text."""
        if not (payload.startswith(self.head) and payload.endswith(self.tail)):
            return None
        mid = payload[len(self.head):len(payload) - len(self.tail)]
        if len(self.head) + len(mid) + len(self.tail) != len(payload):
            return None  # head and tail overlap
        try:
            text = orjson.loads(b'"' + mid + b'"')  # one valid JSON string, nothing around it
        except orjson.JSONDecodeError:
            return None
        if not isinstance(text, str):
            return None
        return self.out_head + mid + self.out_tail, len(text)

    def fits(self, payload: bytes) -> bool:
        """``payload`` is head + something + tail (whether the something is a text: :meth:`take`)."""
        return len(payload) >= self.least and payload.startswith(self.head) and payload.endswith(self.tail)

    def whole(self, run: list[bytes]) -> list[bytes] | None:
        """The texts of ``run`` if every event of it is head + text + tail, else None: one join and one compare (each
        event's rebuilt length is its own only when head and tail fit in it, so the joins line the events up)."""
        mids = list(map(self.mid, run))
        return mids if b"".join(run) == self.head + (self.tail + self.head).join(mids) + self.tail else None

    def span(self, run: list[bytes]) -> list[bytes]:
        """The texts of ``run``'s leading events that are head + text + tail, found without a Python step per event
        and without looking past the first one that is not."""
        head, tail = self.head, self.tail
        k = len(list(takewhile(truth, map(and_, map(bytes.startswith, run, repeat(head)),
                                                  map(bytes.endswith, run, repeat(tail))))))
        run = run[:k]
        k = len(list(takewhile(partial(le, self.least), map(len, run))))  # (head and tail may not overlap)
        return list(map(self.mid, run[:k] if k < len(run) else run))

    def take(self, mids: list[bytes], out: list[bytes]) -> int | None:
        """Our events of these texts, appended to ``out`` as one piece: the characters of text; None (nothing
        appended) when one of them is not a JSON string's content (an invalid escape, a control character, a quote
        that ends it early, a lone surrogate: whatever one JSON parse of it alone refuses).

        ONE parse checks them all, of ``["t1",\\n"t2",\\n...]``: it is n strings exactly when each text alone is a
        valid string's content. No string can run on from one text into the next (it would hold the separator's raw
        line feed, which a string may not), so every separator stands between values and each text opens one
        string; a text that ends its string early must add a value after it (another element, or one that is not a
        string) or break the JSON -- the count and the join of the values catch the first two."""
        joined = b'",\n"'.join(mids)
        try:
            texts = orjson.loads(b'["' + joined + b'"]')
            chars = len("".join(texts))  # (a TypeError when one is not a string)
        except (orjson.JSONDecodeError, TypeError):
            return None
        if len(texts) != len(mids):
            return None
        out.append(self.out_head + (self.out_tail + self.out_head).join(mids) + self.out_tail)
        return chars


def _plain_text(obj: dict[str, Any], exclude_reasoning: bool) -> tuple[str, str] | None:
    """(field, text) of an event that is one choice's text and nothing else that varies; else None."""
    choices = obj.get("choices")
    if obj.get("usage") is not None or "error" in obj or type(choices) is not list or len(choices) != 1:
        return None
    ch = choices[0]
    if type(ch) is not dict or ch.get("finish_reason") is not None or ch.get("logprobs") is not None:
        return None
    delta = ch.get("delta")
    if delta is None:
        text = ch.get("text")
        return ("text", text) if type(text) is str else None
    if type(delta) is not dict or len(delta) != 1:
        return None
    (field, text), = delta.items()
    if field == "content" or (field == "reasoning_content" and not exclude_reasoning):
        return (field, text) if type(text) is str else None
    return None


def _template(payload: bytes, out: bytes, field: str, text: str) -> _Template | None:
    enc = orjson.dumps(text)
    key = b'"' + field.encode() + b'":'
    i, j = payload.find(key + enc), out.find(key + enc)
    if i < 0 or j < 0 or payload.count(key) != 1 or out.count(key) != 1:
        return None  # spelt another way (spaces, other escapes), or ambiguous: no template
    i, j = i + len(key) + 1, j + len(key) + 1  # after the opening quote
    n = len(enc) - 2
    head, tail = payload[:i], payload[i + n:]
    # (a tail holds at least the closing quote: -len(tail) is its start)
    return _Template(head, tail, out[:j], out[j + n:], itemgetter(slice(len(head), -len(tail))), len(head) + len(tail))


class InBandError(Exception):
    """An upstream event that is an error object (``error``: the mapped GatewayError). Before the first-chunk gate
    it fails the attempt as it is; after it, it breaks the stream with our own words."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class Relay(Protocol):
    """What :class:`ClientStream` relays through: upstream events in, the client's bytes out, in one wire format
    (:class:`ChunkRewriter`: OpenAI's; :class:`therouter.native.MessagesRelay`: the client's own, e.g. Anthropic's)."""

    gen_id: str
    usage_raw: dict[str, Any] | None
    finish_reason: str | None

    def relay(self, payload: bytes) -> bytes | None:
        """One upstream data event -> the client's bytes (None: nothing to send yet); :class:`InBandError` for an
        error event."""
        ...

    def relay_many(self, payloads: list[bytes], out: list[bytes]) -> None:
        """:meth:`relay` of each payload in order, the bytes appended to ``out`` (on an error, what came before it
        is there)."""
        ...

    def complete(self, saw_done: bool) -> bool:
        """Whether the upstream's stream, now over, finished its answer (else it was cut)."""
        ...

    def failure(self, error: GatewayError, provider_name: str) -> bytes:
        """The one event that ends a stream broken after its first byte (our words only)."""
        ...

    def closing(self, usage: Usage, cost: Any) -> bytes:
        """What ends a completed stream (``cost``: the settled cost as its JSON value)."""
        ...

    def final_usage(self, prompt_estimate: int) -> Usage: ...

    def estimate(self, prompt_estimate: int) -> Usage: ...


class ChunkRewriter(UsageTap):
    """Per-stream state: identity rewrite, usage capture and produced-text accounting."""

    def __init__(self, provider: Provider, *, gen_id: str, model: str, created: int, object_: str,
                 include_usage: bool, exclude_reasoning: bool = False) -> None:
        super().__init__(provider)
        self.exclude_reasoning = exclude_reasoning  # `reasoning.exclude`: not sent, still counted and billed
        self.gen_id = gen_id
        self.model = model
        self.created = created
        self.object = object_
        self.include_usage = include_usage
        self._templates: dict[str, _Template] = {}  # per text field (content, reasoning_content, text)
        self._learn = provider.plain_chunks

    def relay(self, payload: bytes) -> bytes | None:
        """One upstream data event, as it came -> the bytes of one client event (None: nothing to send). An event
        that only changes the text of one already seen is relayed without a parse (:class:`_Template`); any other is
        parsed and :meth:`rewrite`-n. Raises :class:`InBandError` for an error event, UpstreamBadResponse for an
        unusable one."""
        for t in self._templates.values():
            hit = t.relay(payload)
            if hit is not None:
                self.chars += hit[1]
                return hit[0]
        obj = parse_event(payload)
        err = self.provider.in_band_error(obj)
        if err is not None:
            raise InBandError(err)
        plain = _plain_text(obj, self.exclude_reasoning) if self._learn else None
        out = self.rewrite(obj)
        if plain is not None and out is not None:
            learnt = _template(payload, out, *plain)
            if learnt is not None:
                self._templates[plain[0]] = learnt
        return out

    def relay_many(self, payloads: list[bytes], out: list[bytes]) -> None:
        """:meth:`relay` of each payload in order, the bytes appended to ``out``, the same bytes as one by one; a run
        of events that only change the text of a template seen before (the common case: one upstream read of plain
        text chunks) goes at once, in a constant number of C-level steps (:class:`_Template`).

        Each step costs the run it finds, not the rest of the read (but for a copy of the list's pointers): the rest
        is checked at once (:meth:`_Template.whole`) only until such a check fails once (then runs are found event by
        event in C, stopping at the first that is not one, :meth:`_Template.span`), and after a run whose texts are
        not all valid the rest of the read goes one by one (:meth:`relay` finds the bad one)."""
        i, n = 0, len(payloads)
        probe = True
        while i < n:
            p = payloads[i]
            for t in self._templates.values():
                if i < n - 1 and t.fits(p):  # (one event alone is cheaper the one-by-one way)
                    break
            else:
                b = self.relay(p)
                if b:
                    out.append(b)
                i += 1
                continue
            # the common reads: the rest is this template's events, or all of it but the last (the finish)
            end = n if t.fits(payloads[-1]) else n - 1 if n - 2 > i and t.fits(payloads[-2]) else 0
            mids = t.whole(payloads[i:end] if i or end < n else payloads) if probe and end else None
            if mids is None:
                probe = probe and not end  # a failed check of the rest is paid once per read
                mids = t.span(payloads[i:])
            chars = t.take(mids, out)
            if chars is None:  # a text that is not one: one by one from here (relay finds it)
                for p in payloads[i:]:
                    b = self.relay(p)
                    if b:
                        out.append(b)
                return
            self.chars += chars
            i += len(mids)

    def rewrite(self, obj: dict[str, Any]) -> bytes | None:
        """One upstream chunk -> the bytes of one client event (or None when nothing is left to send)."""
        chunk = self.take(obj)
        if chunk is None:
            return None
        obj = chunk
        choices = obj.get("choices")
        if not choices:
            return None  # a usage-only chunk: re-emitted at the end, the OpenAI way
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            self._account(ch)
            fr = ch.get("finish_reason")
            if fr:
                self.finish_reason = fr
        if self.exclude_reasoning and not _strip_reasoning(choices):
            return None  # the chunk carried reasoning only
        obj["id"] = self.gen_id
        obj["object"] = self.object
        if "system_fingerprint" in obj and obj["system_fingerprint"] is None:
            del obj["system_fingerprint"]
        obj["created"] = self.created
        obj["model"] = self.model
        obj["provider"] = self.provider.name
        if self.include_usage:
            obj["usage"] = None
        return sse.encode(obj)

    def _account(self, ch: dict[str, Any]) -> None:
        delta = ch.get("delta")
        if isinstance(delta, dict):
            for k in ("content", "reasoning_content"):
                v = delta.get(k)
                if isinstance(v, str):
                    self.chars += len(v)
            for tc in delta.get("tool_calls") or ():
                fn = tc.get("function") if isinstance(tc, dict) else None
                if isinstance(fn, dict):
                    self.chars += len(fn.get("arguments") or "") + len(fn.get("name") or "")
        elif isinstance(ch.get("text"), str):
            self.chars += len(ch["text"])

    def complete(self, saw_done: bool) -> bool:
        return saw_done or self.finish_reason is not None

    def failure(self, error: GatewayError, provider_name: str) -> bytes:
        # naming the provider by its config name; the upstream's own words are in the log and the record
        return sse.error_event(error, f"Provider `{provider_name}` failed mid-stream: {error.message}")

    def closing(self, usage: Usage, cost: Any) -> bytes:
        """The usage chunk (when the client asked for it, the OpenAI way), then ``[DONE]``."""
        return (self.usage_event(usage, {"cost": cost}) if self.include_usage else b"") + sse.DONE

    def usage_event(self, usage: Usage, cost: dict[str, Any]) -> bytes:
        body = usage.to_openai(self.usage_raw)
        body.update(cost)
        return sse.encode_raw(ChatCompletionChunk(id=self.gen_id, object=self.object, created=self.created,
                                                  model=self.model, provider=self.provider.name, choices=[],
                                                  usage=body).to_json())


def _strip_reasoning(choices: list[Any]) -> bool:
    """Remove reasoning from every delta; False when nothing is left worth sending."""
    keep = False
    for ch in choices:
        if not isinstance(ch, dict):
            continue
        delta = ch.get("delta")
        if isinstance(delta, dict):
            had = delta.pop("reasoning_content", None) is not None
            delta.pop("reasoning", None)
            if not had or ch.get("finish_reason") or any(v not in (None, "") for k, v in delta.items()
                                                           if k != "role"):
                keep = True
        else:
            keep = True
    return keep


class ClientStream:
    """THE owner of one client stream, from the first-chunk gate to its last byte.

    It relays the upstream's events through the rewriter, frames everything the client receives (data events, the
    usage event, ``[DONE]``, or one error event after a mid-stream failure, via :mod:`therouter.sse`), and finishes
    the stream exactly once (upstream closed, slots freed, settled; :attr:`finish`) whatever ended it: the upstream's
    end, a break, or the client leaving -- even before the first event was pulled, when the response is closed without
    the generator ever starting (:meth:`aclose`). The finish is shielded: request cancellation cannot interrupt it.
    """

    def __init__(self, events: UpstreamEvents, rw: Relay, first: list[bytes], finish: Finisher, *,
                 provider: str, cost: Callable[[int], Any]) -> None:
        self.events = events
        self.rw = rw
        self._first = first
        self._finish = finish
        self._provider = provider
        self._cost = cost  # nano-USD -> the JSON value of usage.cost
        self._started = False
        self._done: asyncio.Future[tuple[Usage, int]] | None = None
        self.ended = False  # the chunk just yielded is the stream's last (the response can end with it)
        self._gen = self._relay()

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            await self.finish("client_cancelled", None)
        await self._gen.aclose()

    async def finish(self, outcome: Outcome, error: GatewayError | None) -> tuple[Usage, int]:
        """Close, free and settle: the first call does it, later ones get its result."""
        if self._done is None:
            self._done = asyncio.ensure_future(self._finish(outcome, error))
        return await asyncio.shield(self._done)

    def _take(self, payloads: list[bytes], batch: list[bytes]) -> None:
        try:
            self.rw.relay_many(payloads, batch)
        except InBandError as e:  # the upstream's words go to the log and the record, never to the client
            raise UpstreamError("The provider reported an error in its stream.", sent=True,
                                code="upstream_in_band_error", detail=e.error.detail) from None

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        outcome: Outcome = "client_cancelled"
        error: GatewayError | None = None
        try:
            # the events one upstream read brought go to the client in one write, as a plain proxy relays a read (the
            # first write: the gate's event and what came with it)
            batch: list[bytes] = list(self._first)
            read = self.events.take_ready()  # already read: no wait
            while True:
                try:
                    self._take(read, batch)
                except GatewayError:
                    if batch:  # what came before the failure is the client's, then the error event
                        yield b"".join(batch)
                    raise
                if batch:
                    yield b"".join(batch) if len(batch) > 1 else batch[0]
                    batch = []
                try:
                    payload = await self.events.next_payload()
                except StopAsyncIteration:
                    break
                read = [payload, *self.events.take_ready()]
            if not self.rw.complete(self.events.saw_done):
                raise UpstreamStreamError("upstream closed the stream before it finished", sent=True,
                                          code="upstream_cut")
            outcome = "completed"
        except GatewayError as e:
            outcome, error = broken_stream_outcome(e), e
            log.warning("stream %s from %s broke: %s: %s", self.rw.gen_id, self._provider, e.code,
                        e.detail or e.message)
        finally:
            usage, cost = await self.finish(outcome, error)
        if error is not None:
            self.ended = True
            yield self.rw.failure(error, self._provider)
            return
        tail = self.rw.closing(usage, self._cost(cost))
        if tail:  # (a native stream has none: message_stop ended it)
            self.ended = True
            yield tail


def broken_stream_outcome(e: GatewayError) -> Outcome:
    """A stream that failed after its first byte: its connection broke or stalled (``upstream_cut``), or the provider
    sent something unusable: an in-band error, a malformed or oversized event, a chunk of the wrong shape."""
    return "upstream_cut" if isinstance(e, (UpstreamStreamError, UpstreamTimeout)) else "upstream_error"
