"""Server-sent events: encode what we send, decode what upstreams send.

The decoder follows the SSE spec as far as the OpenAI-style streams need: events end at a blank line (LF, CRLF or
CR line endings, split anywhere across network chunks); ``:`` lines are comments (DeepSeek's ``: keep-alive``);
several ``data:`` lines in one event are joined with ``\\n``; ``event:``/``id:``/``retry:`` are ignored.
"""

from __future__ import annotations

from typing import Iterator

import orjson

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def encode(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def encode_raw(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class SSEDecoder:
    """Incremental decoder: ``feed(bytes)`` yields the ``data`` payload of every complete event (bytes)."""

    __slots__ = ("_buf", "_data", "_has_data", "_pending_cr", "comments")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._has_data = False
        self._pending_cr = False
        self.comments = 0

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if not chunk:
            return  # an empty read must not drop a pending CR (the LF of a split CRLF may come next)
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
            ev = self._line(buf[start:end])
            if ev is not None:
                yield ev
            start = nxt
        self._buf = buf[start:]

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            if self._has_data:
                data = b"\n".join(self._data)
                self._data = []
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
            self._data.append(value)
            self._has_data = True
        return None

    def flush(self) -> Iterator[bytes]:
        """At EOF: an event not terminated by a blank line still counts (servers that close right after data)."""
        if self._buf:
            rest, self._buf = self._buf, b""
            yield from self.feed(rest + b"\n")
        if self._has_data:
            data = b"\n".join(self._data)
            self._data = []
            self._has_data = False
            yield data
