"""Reading an upstream SSE stream: clocks that count data events only, and the per-chunk rewrite.

:class:`UpstreamEvents` yields parsed data events from an upstream response under three clocks: first data event
(``first_token``), gap between data events (``idle``) and an absolute cap (``total``). Comments and blank keep-alives
never re-arm them (DeepSeek keeps a queued connection alive with ``: keep-alive`` for minutes).

:class:`ChunkRewriter` turns each upstream chunk into what the client receives: our id, the public model, the
provider name, OpenAI's reasoning spelling, and usage placed the OpenAI way (only in a final ``choices: []`` chunk,
only when the client asked for it), while keeping the last usage the upstream reported for metering.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from therouter.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout
from therouter.protocol.usage import Usage
from therouter.providers._http import UpstreamResponse
from therouter.providers.base import Provider
from therouter.sse import EventTooLarge, SSEDecoder

DEFAULT_MAX_EVENT = 1024 * 1024  # server.max_upstream_event_bytes


class UpstreamEvents:
    """Async iterator of parsed JSON objects (dicts); ends after ``[DONE]`` or EOF (``saw_done`` tells which).

    What is not an event we can use is the provider's fault (:class:`UpstreamBadResponse`): a payload that is not
    JSON, JSON that is not an object, a line or event over ``max_event_bytes``.
    """

    def __init__(self, resp: UpstreamResponse, *, first_token: float, idle: float, total: float,
                 clock: Any = time.monotonic, started: float | None = None,
                 max_event_bytes: int = DEFAULT_MAX_EVENT) -> None:
        self.resp = resp
        self._chunks = resp.chunks().__aiter__()
        self._decoder = SSEDecoder(max_event_bytes)
        self._pending: list[bytes] = []
        self._clock = clock
        self._start = clock() if started is None else started  # the attempt's send time
        self._cap = self._start + total
        self._deadline = min(self._start + first_token, self._cap)
        self._idle = idle
        self.saw_done = False
        self.events = 0
        self._eof = False

    def __aiter__(self) -> UpstreamEvents:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._pending:
                payload = self._pending.pop(0)
                if payload.strip() == b"[DONE]":
                    self.saw_done = True
                    self._pending.clear()  # an exhausted iterator stays exhausted: nothing after [DONE] is an event
                    raise StopAsyncIteration
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise UpstreamBadResponse("The provider sent a stream event that is not JSON.", sent=True,
                                              code="malformed_stream_event",
                                              detail=payload[:200].decode("utf-8", "replace")) from None
                if not isinstance(obj, dict):
                    raise UpstreamBadResponse("The provider sent a response of the wrong shape.", sent=True,
                                              detail=f"stream event is {type(obj).__name__}, not an object")
                self.events += 1
                now = self._clock()
                self._deadline = min(now + self._idle, self._cap)
                return obj
            if self._eof or self.saw_done:
                raise StopAsyncIteration
            await self._read()

    async def _read(self) -> None:
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise self._timeout()
        try:
            async with asyncio.timeout(remaining):
                chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            chunk = None
        except TimeoutError:
            raise self._timeout() from None
        try:
            self._pending.extend(self._decoder.flush() if chunk is None else self._decoder.feed(chunk))
        except EventTooLarge as e:
            raise UpstreamBadResponse("The provider sent a stream event larger than the gateway accepts.",
                                      sent=True, code="upstream_event_too_large", detail=str(e)) from None

    def _timeout(self) -> GatewayError:
        if self._clock() >= self._cap - 1e-6:
            return UpstreamTimeout("upstream stream exceeded its time cap", sent=True, code="stream_time_cap")
        if self.events == 0:
            return UpstreamTimeout("upstream sent no data before the first-token timeout", sent=True,
                                   code="first_token_timeout")
        return UpstreamTimeout("upstream stream stalled (idle timeout)", sent=True, code="stream_idle_timeout")

    async def aclose(self) -> None:
        try:
            await self.resp.close()
        except Exception:  # noqa: BLE001, S110 - closing a broken connection must never raise
            pass


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
        return b"data: " + orjson.dumps(obj) + b"\n\n"

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

    def usage_event(self, usage: Usage, cost: dict[str, Any]) -> bytes:
        body = usage.to_openai(self.usage_raw)
        body.update(cost)
        obj = {"id": self.gen_id, "object": self.object, "created": self.created, "model": self.model,
               "provider": self.provider.name, "choices": [], "usage": body}
        return b"data: " + orjson.dumps(obj) + b"\n\n"


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
