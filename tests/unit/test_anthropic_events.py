"""The /v1/messages stream pump: the gateway's SSE bytes -> Anthropic's events, pings while the upstream is silent,
and an error event (never a silent end) when the gateway's stream stops short."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from therouter import anthropic_surface as surface
from therouter.api.anthropic import _events


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
