"""Server-sent events: THE framing of what we send (data events, named events, ``[DONE]``, error events) and the
decoder of what upstreams send.

The decoder follows the SSE spec as far as the OpenAI-style streams need: events end at a blank line (LF, CRLF or
CR line endings, split anywhere across network chunks); ``:`` lines are comments (DeepSeek's ``: keep-alive``);
several ``data:`` lines in one event are joined with ``\\n``; ``event:``/``id:``/``retry:`` are ignored.

Memory is bounded: with ``max_event_bytes`` set, a line or an event's data longer than that raises
:class:`EventTooLarge` as soon as the decoder has seen that many bytes of it (an upstream that never sends a line
break cannot make it buffer without end). Pieces of a line that is still open are kept aside, not re-joined on
every read, so a long line arriving in small reads costs linear time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from therouter.errors import GatewayError
from therouter.protocol.responses import ErrorObject, ErrorResponse

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def encode(obj: object) -> bytes:
    """One data event of a JSON value."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def encode_raw(payload: bytes) -> bytes:
    """One data event of an already serialised JSON value."""
    return b"data: " + payload + b"\n\n"


def named(kind: str, data: dict[str, Any]) -> bytes:
    """A named event (``event: kind``) whose data carries its ``type`` too (Anthropic's Messages stream)."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def error_event(err: GatewayError, message: str | None = None) -> bytes:
    """An error after the stream's first byte: one data event with OpenAI's error body (``message`` overrides the
    error's own words, e.g. to name the provider); nothing follows it, not even ``[DONE]``."""
    body = ErrorResponse(ErrorObject(err.message if message is None else message, err.type, err.param, err.code))
    return encode_raw(body.to_json())


class EventTooLarge(ValueError):
    """A line or an event's data passed the decoder's ``max_event_bytes``."""


class SSEDecoder:
    """Incremental decoder: ``feed(bytes)`` yields the ``data`` payload of every complete event (bytes)."""

    __slots__ = ("_buf", "_data", "_has_data", "_max", "_open", "_open_len", "_pending_cr", "_size", "comments")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buf = b""
        self._open: list[bytes] = []  # later pieces of the unterminated line that starts in _buf
        self._open_len = 0
        self._data: list[bytes] = []
        self._size = 0  # bytes of data in the current event
        self._has_data = False
        self._pending_cr = False
        self._max = max_event_bytes
        self.comments = 0

    def _too_large(self, what: str, n: int) -> EventTooLarge:
        return EventTooLarge(f"{what} of at least {n} bytes is over the {self._max}-byte limit")

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if not chunk:
            return  # an empty read must not drop a pending CR (the LF of a split CRLF may come next)
        if self._at_boundary(chunk):
            yield from self._blocks(chunk)
            return
        yield from self._lines(chunk)

    def _at_boundary(self, chunk: bytes) -> bool:
        """Nothing pending and LF line endings: the read can be cut at blank lines."""
        return not (self._buf or self._open or self._has_data or self._pending_cr) and b"\r" not in chunk

    def feed_list(self, chunk: bytes) -> list[bytes]:
        """:meth:`feed` as a list. The common case -- LF line endings, every complete event one ``data: `` line within
        the limit -- is cut by a constant number of C-level steps (no Python step per event): the complete part is
        split at ``\\n\\ndata: `` and it is that case exactly when no piece holds a line feed (then the separators'
        are the only ones: every blank line is one of them, every event one ``data: `` line). An event begun in an
        earlier read is finished line by line up to the read's first blank line (after one, nothing is pending);
        anything else goes the general way."""
        if not chunk or b"\r" in chunk or self._pending_cr:
            return list(self.feed(chunk))
        first: list[bytes] = []
        if self._buf or self._open or self._has_data:
            k = chunk.find(b"\n\n") + 2
            if k < 2:
                return list(self._lines(chunk))
            first = list(self._lines(chunk[:k]))
            chunk = chunk[k:]
        end = chunk.rfind(b"\n\n")  # the complete events end there (what follows: an event still incomplete)
        done = chunk[:end] if end >= 0 else b""
        if done.startswith(b"data: "):
            payloads = done.split(b"\n\ndata: ")
            payloads[0] = payloads[0][6:]
            if b"\n" not in b"".join(payloads) and (  # (a copy and a memchr: cheaper than counting)
                    self._max is None or len(done) <= self._max or max(map(len, payloads)) + 6 <= self._max):
                if end + 2 < len(chunk):
                    payloads.extend(self._lines(chunk[end + 2:]))
                return first + payloads if first else payloads
        first.extend(self.feed(chunk))
        return first

    def _blocks(self, chunk: bytes) -> Iterator[bytes]:
        """The common case, at an event boundary with LF line endings: whole events are cut at blank lines, and an
        event of one ``data: `` line is its payload as it is; anything else goes line by line (:meth:`_line`)."""
        blocks = chunk.split(b"\n\n")
        rest = blocks.pop()  # after the last blank line: an event still incomplete (or nothing)
        for block in blocks:
            if self._max is not None and len(block) > self._max and b"\n" not in block:
                raise self._too_large("a line", len(block))
            if block.startswith(b"data: ") and b"\n" not in block:
                yield block[6:]
                continue
            for line in block.split(b"\n"):
                if self._max is not None and len(line) > self._max:
                    raise self._too_large("a line", len(line))
                ev = self._line(line)
                if ev is not None:
                    yield ev
            ev = self._line(b"")
            if ev is not None:
                yield ev
        if rest:
            yield from self._lines(rest)

    def _lines(self, chunk: bytes) -> Iterator[bytes]:
        if b"\n" not in chunk and b"\r" not in chunk and (self._buf or self._open):
            # the middle of a long line: set the piece aside and count it, nothing to decode yet
            self._pending_cr = False
            self._open.append(chunk)
            self._open_len += len(chunk)
            if self._max is not None and len(self._buf) + self._open_len > self._max:
                raise self._too_large("a line", len(self._buf) + self._open_len)
            return
        if self._open:
            buf = self._buf + b"".join(self._open) + chunk
            self._open, self._open_len = [], 0
        else:
            buf = self._buf + chunk if self._buf else chunk
        if self._pending_cr:
            # a CR ended the previous chunk: a following LF belongs to it
            self._pending_cr = False
            if buf.startswith(b"\n"):
                buf = buf[1:]
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf >= 0 else n)
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt < n and buf[nxt] == 0x0A:
                    nxt += 1
                elif nxt == n:
                    self._pending_cr = True
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            if self._max is not None and end - start > self._max:
                raise self._too_large("a line", end - start)
            ev = self._line(buf[start:end])
            if ev is not None:
                yield ev
            start = nxt
        self._buf = buf[start:]
        if self._max is not None and len(self._buf) > self._max:
            raise self._too_large("a line", len(self._buf))

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            if self._has_data:
                data = b"\n".join(self._data)
                self._data = []
                self._size = 0
                self._has_data = False
                return data
            return None
        if line[0] == 0x3A:  # ':' comment
            self.comments += 1
            return None
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._size += len(value) + (1 if self._has_data else 0)
            if self._max is not None and self._size > self._max:
                raise self._too_large("an event", self._size)
            self._data.append(value)
            self._has_data = True
        return None

    def flush(self) -> Iterator[bytes]:
        """At EOF: an event not terminated by a blank line still counts (servers that close right after data)."""
        if self._buf or self._open:
            rest = self._buf + b"".join(self._open)
            self._buf, self._open, self._open_len = b"", [], 0
            yield from self.feed(rest + b"\n")
        if self._has_data:
            data = b"\n".join(self._data)
            self._data = []
            self._size = 0
            self._has_data = False
            yield data
