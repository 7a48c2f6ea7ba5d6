"""Render a :class:`Plan` into a flavor's non-stream body or list of SSE events.

With ``n`` > 1 (the request's ``n``) every choice is the same plan under its own ``index``; a stream interleaves the
choices' chunks round-robin (as vLLM does) and usage counts the completion ``n`` times.
"""

from __future__ import annotations

from dataclasses import replace
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


def usage_of(flavor: Flavor, plan: Plan, patch: dict[str, Any] | None, n: int = 1) -> dict[str, Any]:
    """The flavor's usage object (``n`` sequences generated), with the ``usage_patch`` knob's fields put over it."""
    if n > 1:
        plan = replace(plan, content=plan.content * n, reasoning=plan.reasoning * n, tool_calls=plan.tool_calls * n)
    return {**flavor.usage(plan), **(patch or {})}


def choices_of(body: dict[str, Any]) -> int:
    """The request's ``n`` (1 unless a sane integer)."""
    n = body.get("n")
    return n if type(n) is int and 1 <= n <= 16 else 1


def response_body(
    flavor: Flavor, plan: Plan, *, chat: bool, rid: str, created: int, model: str, send_usage: bool,
    usage_patch: dict[str, Any] | None = None, n: int = 1,
) -> dict[str, Any]:
    choices = []
    for i in range(n):
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice["message"] = flavor.message(plan)
        else:
            choice["text"] = plan.text
        choice["logprobs"] = None
        choice["finish_reason"] = plan.finish_reason
        choice.update(flavor.choice_extra)
        if plan.stop_sequence is not None and flavor.matched_field:
            choice[flavor.matched_field] = plan.stop_sequence
        choices.append(choice)
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if send_usage:
        body["usage"] = usage_of(flavor, plan, usage_patch, n)
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
    n: int = 1,
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

    def chunk(part: dict[str, Any], finish: str | None = None, usage: Any = _MISSING,
              index: int = 0) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
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

    usage = usage_of(flavor, plan, usage_patch, n) if send_usage else None
    per_choice = [_choice_events(flavor, plan, chunk, chat, i, usage if i == n - 1 else _MISSING, send_usage)
                  for i in range(n)]
    events = per_choice[0] if n == 1 else _round_robin(per_choice)

    if flavor.finish_mode != "empty_content" and include_usage and send_usage:
        d = dict(base)
        d["choices"] = []
        d["usage"] = usage
        events.append((d, 0, False))
    return [(sse(d), tokens, gen) for d, tokens, gen in events]


Chunk = Any  # the stream's chunk(part, finish, usage, index) builder


def _choice_events(flavor: Flavor, plan: Plan, chunk: Chunk, chat: bool, index: int, usage: Any,
                   send_usage: bool) -> list[tuple[dict[str, Any], int, bool]]:
    """One choice's chunks; ``usage`` rides on its finish chunk in DeepSeek's way (the last choice's only)."""

    def wrap(delta: dict[str, Any]) -> dict[str, Any]:
        return {"delta": delta} if chat else delta

    def at(part: dict[str, Any], finish: str | None = None, u: Any = _MISSING) -> dict[str, Any]:
        return chunk(part, finish, u, index)  # type: ignore[no-any-return]

    events: list[tuple[dict[str, Any], int, bool]] = []
    if chat:
        events.append((at({"delta": flavor.role_delta(plan)}), 0, False))
        for text, n in plan.reasoning if not flavor.hidden_reasoning else ():
            events.append((at({"delta": flavor.reasoning_delta(text)}), n, True))
        for i, tc in enumerate(plan.tool_calls):
            head = {"index": i, "id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}}
            events.append((at({"delta": {"tool_calls": [head]}}), 1, True))
            for frag in tc.fragments:
                part = {"index": i, "function": {"arguments": frag}}
                events.append((at({"delta": {"tool_calls": [part]}}), 1, True))
        for text, n in plan.content:
            events.append((at({"delta": {"content": text}}), n, True))
    else:
        for text, n in plan.content:
            events.append((at({"text": text}), n, True))

    finish = plan.finish_reason
    empty = wrap({"content": ""}) if chat else {"text": ""}
    if flavor.finish_mode == "empty_content":
        # DeepSeek: usage rides on the finish chunk whether or not include_usage was asked.
        if send_usage and usage is not _MISSING:
            events.append((at(empty, finish, usage), 0, False))
        else:
            events.append((at(empty, finish), 0, False))
    elif flavor.finish_mode == "attach" and events and events[-1][2]:
        events[-1][0]["choices"][0]["finish_reason"] = finish
    elif flavor.finish_mode == "attach":
        events.append((at(empty, finish), 0, False))
    else:
        events.append((at(wrap({}) if chat else {"text": ""}, finish), 0, False))
    if plan.stop_sequence is not None and flavor.matched_field:  # vLLM / SGLang name the stop string that matched
        events[-1][0]["choices"][0][flavor.matched_field] = plan.stop_sequence
    return events


def _round_robin(lists: list[list[Any]]) -> list[Any]:
    out: list[Any] = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i] for x in lists if i < len(x))
    return out
