"""The /v1/messages stream pump: the gateway's SSE bytes -> Anthropic's events, pings while the upstream is silent,
and an error event (never a silent end) when the gateway's stream stops short."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from therouter import anthropic_surface as surface
from therouter.api.anthropic import _events, _relayed


def req() -> surface.MessagesRequest:
    return surface.read_request({"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})


def kinds(raw: bytes) -> list[str]:
    return [json.loads(f.split("\n")[1][6:])["type"] for f in raw.decode().split("\n\n") if f]


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def test_pings_while_silent_then_the_answer() -> None:
    release = asyncio.Event()

    async def gateway() -> AsyncIterator[bytes]:
        yield data({"choices": [{"index": 0, "delta": {"content": "a"}}]})
        await release.wait()  # the upstream is silent until the test saw a ping
        yield data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n"

    got = b""
    async for piece in _events(gateway(), surface.MessageStream(req(), "g", 1), ping_seconds=0.01):
        got += piece
        if b"event: ping" in piece:
            release.set()
    ks = kinds(got)
    assert ks[:3] == ["message_start", "content_block_start", "content_block_delta"] and "ping" in ks
    assert ks[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_a_gateway_error_event_becomes_an_anthropic_error_event() -> None:
    async def gateway() -> AsyncIterator[bytes]:
        yield data({"choices": [{"index": 0, "delta": {"content": "a"}}]})
        yield data({"error": {"message": "Provider `x` failed mid-stream", "type": "server_error", "param": None,
                              "code": "upstream_cut"}})

    got = b"".join([p async for p in _events(gateway(), surface.MessageStream(req(), "g", 1))])
    ks = kinds(got)
    assert ks[-1] == "error" and "message_stop" not in ks
    assert b"failed mid-stream" in got


async def test_a_stream_that_stops_short_is_an_error_not_a_silent_end() -> None:
    async def gateway() -> AsyncIterator[bytes]:
        yield data({"choices": [{"index": 0, "delta": {"content": "a"}}]})

    got = b"".join([p async for p in _events(gateway(), surface.MessageStream(req(), "g", 1))])
    assert kinds(got)[-1] == "error"


async def test_a_native_relays_events_pass_as_they_are_with_pings_while_silent() -> None:
    release = asyncio.Event()
    closed: list[bool] = []
    start = surface.event("message_start", {"message": {"id": "g"}})
    stop = surface.event("message_stop", {})

    async def gateway() -> AsyncIterator[bytes]:
        try:
            yield start
            await release.wait()
            yield stop
        finally:
            closed.append(True)

    got: list[bytes] = []
    async for piece in _relayed(gateway(), ping_seconds=0.01):
        got.append(piece)
        if piece == surface.PING:
            release.set()
    assert got[0] == start and got[-1] == stop and surface.PING in got[1:-1]
    assert set(got[1:-1]) == {surface.PING} and closed == [True]


async def test_a_client_leaving_closes_the_native_relay() -> None:
    closed: list[bool] = []

    async def gateway() -> AsyncIterator[bytes]:
        try:
            yield b"event: message_start\ndata: {}\n\n"
            await asyncio.sleep(60)
            yield b""
        finally:
            closed.append(True)

    out = _relayed(gateway(), ping_seconds=30)
    assert (await out.__anext__()).startswith(b"event: message_start")
    await out.aclose()  # type: ignore[attr-defined]
    assert closed == [True]
