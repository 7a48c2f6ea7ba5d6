"""Minimal ASGI plumbing: types, body reading, JSON responses, per-request exchange."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class FakeConnectionCut(httpx.RemoteProtocolError):
    """Raised by the app to drop the connection mid-response (fault ``cut``).

    Under a real server (uvicorn) this closes the TCP connection; in-process via
    ``httpx.ASGITransport`` the client sees this exception, the same type httpx raises
    for a real truncated response.
    """

    def __init__(self) -> None:
        super().__init__("peer closed connection without sending complete message body (fake upstream cut)")


class BodyEncoder:
    """Content-encoding of one response (knob ``encoding``): each write is compressed and flushed at once, so a
    compressed stream still arrives event by event. ``br`` only labels the body (it is sent as is)."""

    __slots__ = ("_z", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(name)
        self._z = zlib.compressobj(6, zlib.DEFLATED, wbits) if wbits is not None else None

    def write(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH) if self._z is not None else data

    def finish(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush() if self._z is not None else data


class Exchange:
    """One generation request: response helpers, its log entry and disconnect bookkeeping."""

    __slots__ = ("client_gone", "encoder", "entry", "finished", "send", "task")

    def __init__(self, send: Send, entry: dict[str, Any]) -> None:
        self.send = send
        self.entry = entry
        self.client_gone = False
        self.finished = False
        self.task: asyncio.Task[Any] | None = None
        self.encoder: BodyEncoder | None = None  # set before start() to content-encode the answer

    async def start(self, status: int, headers: Headers) -> None:
        self.entry["status"] = status
        self.entry["t_first_byte"] = time.time()
        if self.encoder is not None:  # the length changes: sent chunked, labelled with its encoding
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            headers.append((b"content-encoding", self.encoder.name.encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes) -> None:
        """Send one piece of the body immediately (each SSE event is its own write)."""
        if self.encoder is not None:
            data = self.encoder.write(data)
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, data: bytes = b"") -> None:
        self.finished = True
        if self.encoder is not None:
            data = self.encoder.finish(data)
        await self.send({"type": "http.response.body", "body": data, "more_body": False})


async def watch_disconnect(receive: Receive, ex: Exchange) -> None:
    """Cancel ``ex.task`` when the client goes away before the response is finished."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            if not ex.finished and ex.task is not None:
                ex.client_gone = True
                ex.task.cancel()
            return


async def read_body(receive: Receive) -> bytes:
    msg = await receive()
    body: bytes = msg.get("body", b"")
    if not msg.get("more_body"):
        return body
    parts = [body]
    while msg.get("more_body"):
        msg = await receive()
        parts.append(msg.get("body", b""))
    return b"".join(parts)


async def read_json_or_empty(receive: Receive) -> Any:
    """Parsed JSON body, ``{}`` for an empty body, ``None`` if it is not JSON."""
    raw = await read_body(receive)
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def content_length(payload: bytes) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(payload)).encode())


async def send_json(send: Send, status: int, obj: Any) -> None:
    payload = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS + [content_length(payload)]})
    await send({"type": "http.response.body", "body": payload})


async def send_bytes(send: Send, status: int, payload: bytes, headers: Headers) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers + [content_length(payload)]})
    await send({"type": "http.response.body", "body": payload})
