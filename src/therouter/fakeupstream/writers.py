"""Write a response (error, JSON or SSE stream) for one request, applying stream-level faults."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from therouter.fakeupstream.asgi import (
    JSON_HEADERS,
    SSE_HEADERS,
    Exchange,
    FakeConnectionCut,
    Headers,
    Send,
    content_length,
    send_bytes,
)
from therouter.fakeupstream.content import Plan
from therouter.fakeupstream.flavors import FAULT_ERRORS, ErrorSpec, Flavor
from therouter.fakeupstream.misbehave import huge_body, huge_event_pieces, misshape_body, misshape_event
from therouter.fakeupstream.render import BAD_JSON, DONE, Event, choices_of, response_body, sse, stream_events

KEEPALIVE = b": keep-alive\n\n"


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def write_bomb(ex: Exchange, payload: bytes, *, stream: bool) -> None:
    """A gzip bomb, sent as is in network-sized pieces (never through the exchange's own encoder)."""
    ex.encoder = None
    await ex.start(200, (SSE_HEADERS if stream else JSON_HEADERS) + [(b"content-encoding", b"gzip")])
    for i in range(0, len(payload), 65536):
        await ex.write(payload[i:i + 65536])
    await ex.finish()


async def write_error(flavor: Flavor, target: Exchange | Send, err: ErrorSpec, extra: Headers | None = None) -> None:
    payload = orjson.dumps(flavor.error_body(err))
    headers = JSON_HEADERS + flavor.error_headers(err) + (extra or [])
    if isinstance(target, Exchange):
        await target.start(err.status, headers + [content_length(payload)])
        await target.finish(payload)
    else:
        await send_bytes(target, err.status, payload, headers)


async def write_json(
    flavor: Flavor, ex: Exchange, knobs: dict[str, Any], plan: Plan, fault: str | None,
    *, chat: bool, rid: str, created: int, n: int = 1,
) -> None:
    payload = orjson.dumps(
        response_body(flavor, plan, chat=chat, rid=rid, created=created, model=ex.entry["model"],
                      send_usage=fault != "no_usage", usage_patch=knobs.get("usage_patch"), n=n)
    )
    if fault == "bad_json":
        payload = b"{not json"
    elif fault == "bad_shape":
        payload = misshape_body(payload, knobs["shape"])
    elif fault == "huge":
        payload = huge_body(knobs["huge_bytes"])
    if fault == "cut":
        await ex.start(200, JSON_HEADERS + [content_length(payload)])
        await ex.write(payload[: len(payload) // 2])
        raise FakeConnectionCut()
    # DeepSeek sends blank lines before the JSON body while a request is queued.
    keepalives = knobs["keepalive_comments"] if flavor.name == "deepseek" else 0
    if keepalives or fault == "stall":
        await ex.start(200, JSON_HEADERS)
        for _ in range(keepalives):
            await ex.write(b"\n")
            await _sleep_ms(knobs["keepalive_ms"])
        if fault == "stall":
            await _sleep_ms(knobs["stall_ms"])
    else:
        await ex.start(200, JSON_HEADERS + [content_length(payload)])
    ex.entry["tokens_sent"] = plan.completion_tokens * n
    await ex.finish(payload)


async def write_stream(
    flavor: Flavor, ex: Exchange, knobs: dict[str, Any], body: dict[str, Any], plan: Plan, fault: str | None,
    *, chat: bool, rid: str, created: int, in_band: ErrorSpec = FAULT_ERRORS["in_band"],
) -> None:
    entry = ex.entry
    await ex.start(200, SSE_HEADERS)
    for _ in range(knobs["keepalive_comments"]):
        await ex.write(KEEPALIVE)
        await _sleep_ms(knobs["keepalive_ms"])
    await _sleep_ms(knobs["ttft_ms"])
    if fault == "in_band":
        await ex.write(sse(flavor.stream_error(in_band)))
        await ex.finish(DONE)
        return
    events: list[Event] = stream_events(
        flavor, plan, chat=chat, rid=rid, created=created, model=entry["model"],
        include_usage=flavor.include_usage(body), send_usage=fault != "no_usage",
        usage_patch=knobs.get("usage_patch"), n=choices_of(body),
    )
    cut_at = _position_after_gen(events, knobs["cut_after"]) if fault in ("cut", "in_band_mid") else -1
    stall_at = _position_after_gen(events, knobs["stall_after"]) if fault == "stall" else -1
    if fault == "bad_json" and knobs["bad_json_at"] < len(events):
        idx = knobs["bad_json_at"]
        events[idx] = (BAD_JSON, 0, events[idx][2])
    at = min(knobs["fault_at"], len(events) - 1)
    if fault == "bad_shape" and at >= 0:
        events[at] = (misshape_event(events[at][0], knobs["shape"]), 0, events[at][2])
    huge_at = at if fault == "huge" else -1
    delay = knobs["chunk_delay_ms"] / 1000
    seen_gen = False
    tokens = 0
    for i, (data, n, gen) in enumerate(events):
        if i == cut_at and fault == "in_band_mid":
            await ex.write(sse(flavor.stream_error(in_band)))  # an error event after real content
            await ex.finish(DONE)
            return
        if i == cut_at:
            raise FakeConnectionCut()  # no finish chunk, no [DONE]
        if i == huge_at:
            for piece in huge_event_pieces(entry["model"], knobs["huge_bytes"]):  # one endless line
                await ex.write(piece)
        if i == stall_at:
            await _sleep_ms(knobs["stall_ms"])
        if gen:
            if seen_gen and delay > 0:
                await asyncio.sleep(delay)
            seen_gen = True
        await ex.write(data)
        tokens += n
        entry["tokens_sent"] = tokens
    if cut_at >= len(events):
        raise FakeConnectionCut()
    await ex.finish(b"" if fault == "no_done" else DONE)


def _position_after_gen(events: list[Event], n: int) -> int:
    """Index of the event following the n-th generated chunk (after the last one if there are fewer)."""
    seen = 0
    last_gen = -1
    for i, (_, _, gen) in enumerate(events):
        if gen:
            if seen == n:
                return i
            seen += 1
            last_gen = i
    return last_gen + 1 if last_gen >= 0 else (1 if events else 0)
