"""An upstream's SSE answer as parsed data events, under the stream clocks.

:class:`UpstreamEvents` yields parsed data events from an upstream response under three clocks: first data event
(``first_token``), gap between data events (``idle``) and an absolute cap (``total``). Comments and blank keep-alives
never re-arm them (DeepSeek keeps a queued connection alive with ``: keep-alive`` for minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import orjson

from therouter.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout
from therouter.providers._http import UpstreamResponse
from therouter.sse import EventTooLarge, SSEDecoder

DEFAULT_MAX_EVENT = 1024 * 1024  # server.max_upstream_event_bytes


def parse_event(payload: bytes) -> dict[str, Any]:
    """A data event's JSON object, or the provider's fault (:class:`UpstreamBadResponse`)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamBadResponse("The provider sent a stream event that is not JSON.", sent=True,
                                  code="malformed_stream_event",
                                  detail=payload[:200].decode("utf-8", "replace")) from None
    if not isinstance(obj, dict):
        raise UpstreamBadResponse("The provider sent a response of the wrong shape.", sent=True,
                                  detail=f"stream event is {type(obj).__name__}, not an object")
    return obj


def _done_at(payloads: list[bytes]) -> int | None:
    """Where the first ``[DONE]`` of ``payloads`` is, if any: at the end, as a stream ends, it is found without a
    look at the others one by one (none before it starts below ``{``: no other is [DONE], nor is any JSON object;
    whitespace, which a strip would drop, sorts below ``{`` too)."""
    last = len(payloads) - 1
    if payloads[last].strip() == b"[DONE]" and (not last or min(payloads[:last])[:1] >= b"{"):
        return last
    for k, payload in enumerate(payloads):
        if payload.strip() == b"[DONE]":
            return k
    return None


class UpstreamEvents:
    """Async iterator of parsed JSON objects (dicts), or of raw payloads (:meth:`next_payload`); ends after
    ``[DONE]`` or EOF (``saw_done`` tells which).

    What is not an event we can use is the provider's fault (:class:`UpstreamBadResponse`): a payload that is not
    JSON, JSON that is not an object, a line or event over ``max_event_bytes``.
    """

    def __init__(self, resp: UpstreamResponse, *, first_token: float, idle: float, total: float,
                 clock: Any = time.monotonic, started: float | None = None,
                 max_event_bytes: int = DEFAULT_MAX_EVENT) -> None:
        self.resp = resp
        self._chunks = resp.chunks().__aiter__()
        self._decoder = SSEDecoder(max_event_bytes)
        self._pending: deque[bytes] = deque()
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
        return parse_event(await self.next_payload())

    def take_ready(self) -> list[bytes]:
        """Every payload already read, without waiting (what :meth:`next_payload` would return next, up to
        ``[DONE]``, which ends the events as it does there)."""
        pending = self._pending
        out = list(pending)
        pending.clear()
        if out and min(out)[:1] < b"{":  # not all JSON objects (compared in C): [DONE] may be one of them
            k = _done_at(out)
            if k is not None:
                self.saw_done = True  # nothing after [DONE] is an event
                del out[k:]
        if out:
            self.events += len(out)
            self._deadline = min(self._clock() + self._idle, self._cap)
        return out

    async def next_payload(self) -> bytes:
        """The next data event's payload as it came (a reader that needs no parse relays these bytes); raises
        StopAsyncIteration after ``[DONE]`` or at EOF."""
        while True:
            if self._pending:
                payload = self._pending.popleft()
                if payload.strip() == b"[DONE]":
                    self.saw_done = True
                    self._pending.clear()  # an exhausted iterator stays exhausted: nothing after [DONE] is an event
                    raise StopAsyncIteration
                self.events += 1
                self._deadline = min(self._clock() + self._idle, self._cap)
                return payload
            if self._eof or self.saw_done:
                raise StopAsyncIteration
            await self._read()

    async def _read(self) -> None:
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise self._timeout()
        try:
            if self.resp.ready():  # (bytes already here: the read cannot wait, no timer)
                chunk = await self._chunks.__anext__()
            else:
                async with asyncio.timeout(remaining):
                    chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            chunk = None
        except TimeoutError:
            raise self._timeout() from None
        try:
            self._pending.extend(self._decoder.flush() if chunk is None else self._decoder.feed_list(chunk))
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
        with contextlib.suppress(Exception):  # closing a broken connection must never raise
            await self.resp.close()
