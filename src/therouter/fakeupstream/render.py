"""Render a :class:`Plan` into a flavor's non-stream body or list of SSE events."""

from __future__ import annotations

from typing import Any

import orjson

from therouter.fakeupstream.content import Plan
from therouter.fakeupstream.flavors import Flavor

#: (encoded ``data: ...\\n\\n`` event, completion tokens carried, is a generated chunk)
Event = tuple[bytes, int, bool]

DONE = b"data: [DONE]\n\n"
BAD_JSON = b"data: {not json\n\n"
_MISSING: Any = object()


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage_of(flavor: Flavor, plan: Plan, patch: dict[str, Any] | None) -> dict[str, Any]:
    """The flavor's usage object, with the ``usage_patch`` knob's fields put over it."""
    return {**flavor.usage(plan), **(patch or {})}


def response_body(
    flavor: Flavor, plan: Plan, *, chat: bool, rid: str, created: int, model: str, send_usage: bool,
    usage_patch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = flavor.message(plan)
    else:
        choice["text"] = plan.text
    choice["logprobs"] = None
    choice["finish_reason"] = plan.finish_reason
    choice.update(flavor.choice_extra)
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if send_usage:
        body["usage"] = usage_of(flavor, plan, usage_patch)
    body.update(flavor.response_extra)
    return body


def stream_events(
    flavor: Flavor,
    plan: Plan,
    *,
    chat: bool,
    rid: str,
    created: int,
    model: str,
    include_usage: bool,
    send_usage: bool,
    usage_patch: dict[str, Any] | None = None,
) -> list[Event]:
    """All SSE events of a successful stream, ``[DONE]`` excluded."""
    base: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
    }
    base.update(flavor.chunk_extra)
    null_usage = flavor.usage_null_on_chunks(include_usage)
    choice_extra = flavor.choice_extra

    def chunk(part: dict[str, Any], finish: str | None = None, usage: Any = _MISSING) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        choice.update(part)
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if choice_extra:
            choice.update(choice_extra)
        d = dict(base)
        d["choices"] = [choice]
        if usage is not _MISSING:
            d["usage"] = usage
        elif null_usage:
            d["usage"] = None
        return d

    def wrap(delta: dict[str, Any]) -> dict[str, Any]:
        return {"delta": delta} if chat else delta

    events: list[tuple[dict[str, Any], int, bool]] = []
    if chat:
        events.append((chunk({"delta": flavor.role_delta(plan)}), 0, False))
        for text, n in plan.reasoning if not flavor.hidden_reasoning else ():
            events.append((chunk({"delta": flavor.reasoning_delta(text)}), n, True))
        for i, tc in enumerate(plan.tool_calls):
            head = {"index": i, "id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}}
            events.append((chunk({"delta": {"tool_calls": [head]}}), 1, True))
            for frag in tc.fragments:
                part = {"index": i, "function": {"arguments": frag}}
                events.append((chunk({"delta": {"tool_calls": [part]}}), 1, True))
        for text, n in plan.content:
            events.append((chunk({"delta": {"content": text}}), n, True))
    else:
        for text, n in plan.content:
            events.append((chunk({"text": text}), n, True))

    usage = usage_of(flavor, plan, usage_patch) if send_usage else None
    finish = plan.finish_reason
    empty = wrap({"content": ""}) if chat else {"text": ""}
    if flavor.finish_mode == "empty_content":
        # DeepSeek: usage rides on the finish chunk whether or not include_usage was asked.
        if send_usage:
            events.append((chunk(empty, finish, usage), 0, False))
        else:
            events.append((chunk(empty, finish), 0, False))
    elif flavor.finish_mode == "attach" and events and events[-1][2]:
        events[-1][0]["choices"][0]["finish_reason"] = finish
    elif flavor.finish_mode == "attach":
        events.append((chunk(empty, finish), 0, False))
    else:
        events.append((chunk(wrap({}) if chat else {"text": ""}, finish), 0, False))

    if flavor.finish_mode != "empty_content" and include_usage and send_usage:
        d = dict(base)
        d["choices"] = []
        d["usage"] = usage
        events.append((d, 0, False))
    return [(sse(d), n, gen) for d, n, gen in events]
