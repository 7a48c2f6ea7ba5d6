"""Deterministic generation of fake completions: text pieces, tool calls, token counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import orjson

_CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima")

Piece = tuple[str, int]  # (text, number of tokens in it)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    fragments: list[str]

    @property
    def tokens(self) -> int:
        return len(self.fragments) + 1  # name + one token per argument fragment


@dataclass
class Plan:
    """Everything needed to render one response, independent of the wire flavor."""

    content: list[Piece]
    reasoning: list[Piece] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 1
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # prompt tokens reported as written to the cache (anthropic flavour)
    stop_sequence: str | None = None  # the request's stop string that ended the text (cut before it)
    # anthropic flavour: citations on the text (documents with citations enabled), a redacted thinking block
    citations: list[dict[str, Any]] = field(default_factory=list)
    redacted_thinking: str | None = None

    # Cached: a plan is complete once build_plan() returns and is never mutated afterwards.
    @cached_property
    def reasoning_tokens(self) -> int:
        return sum(n for _, n in self.reasoning)

    @cached_property
    def completion_tokens(self) -> int:
        return (
            sum(n for _, n in self.content)
            + self.reasoning_tokens
            + sum(tc.tokens for tc in self.tool_calls)
        )

    @cached_property
    def text(self) -> str:
        return "".join(t for t, _ in self.content)

    @cached_property
    def reasoning_text(self) -> str:
        return "".join(t for t, _ in self.reasoning)


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, str):
                n += len(part)
            elif isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    n += len(t)
            elif isinstance(part, int):  # token ids: count ~4 chars each
                n += 4
            elif isinstance(part, list):
                n += _text_chars(part)
        return n
    return 0


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """max(1, characters of all message contents + prompt + suffix) // 4."""
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                chars += _text_chars(m.get("content"))
    chars += _text_chars(body.get("prompt"))
    chars += _text_chars(body.get("suffix"))
    return max(1, chars // 4)


def max_output_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return max(0, v)
    return None


def _pieces(prefix: str, n_tokens: int, per_chunk: int) -> list[Piece]:
    return list(_cached_pieces(prefix, n_tokens, per_chunk))


@lru_cache(maxsize=256)
def _cached_pieces(prefix: str, n_tokens: int, per_chunk: int) -> tuple[Piece, ...]:
    out: list[Piece] = []
    for start in range(0, n_tokens, per_chunk):
        stop = min(n_tokens, start + per_chunk)
        words = " ".join(f"{prefix}{i}" for i in range(start, stop))
        out.append((words if start == 0 else " " + words, stop - start))
    return tuple(out)


def json_mode(body: dict[str, Any]) -> bool:
    rf = body.get("response_format")
    return isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")


def wants_tool_call(body: dict[str, Any], mode: str) -> bool:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or mode == "never":
        return False
    return mode == "always" or body.get("tool_choice") != "none"


def _tool_names(body: dict[str, Any]) -> list[str]:
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return [fn["name"]]
    names: list[str] = []
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names or ["tool"]


def build_tool_calls(body: dict[str, Any], count: int, new_id: Callable[[], str]) -> list[ToolCall]:
    names = _tool_names(body)
    calls: list[ToolCall] = []
    for i in range(count):
        args = orjson.dumps({"city": _CITIES[i % len(_CITIES)]}).decode()
        head, _, tail = args.partition(":")
        calls.append(ToolCall(new_id(), names[i % len(names)], args, [head + ":", tail]))
    return calls


def build_plan(
    body: dict[str, Any],
    knobs: dict[str, Any],
    *,
    chat: bool,
    reasoning_chunks: int,
    empty_json: bool,
    new_tool_id: Callable[[], str],
) -> Plan:
    per = knobs["tokens_per_chunk"]
    prompt_tokens = estimate_prompt_tokens(body)
    cached = min(knobs["cached_tokens"], prompt_tokens)
    plan = Plan(content=[], prompt_tokens=prompt_tokens, cached_tokens=cached,
                cache_write_tokens=min(knobs["cache_write_tokens"], prompt_tokens - cached))
    budget = max_output_tokens(body)

    n_reason = reasoning_chunks * per if chat else 0
    if budget is not None and n_reason > budget:
        n_reason = budget
        plan.finish_reason = "length"
    plan.reasoning = _pieces("think", n_reason, per)
    if budget is not None:
        budget -= n_reason

    if chat and wants_tool_call(body, knobs["tool_call"]):
        plan.tool_calls = build_tool_calls(body, knobs["parallel_tools"], new_tool_id)
        plan.finish_reason = "tool_calls"
        return plan

    n_content = knobs["chunks"] * per
    if budget is not None and n_content > budget:
        n_content = budget
        plan.finish_reason = "length"
    content = _pieces("tok", n_content, per)
    if chat and json_mode(body) and content:
        text, n = content[0]
        content[0] = ('{"answer": "' + text, n)
        if plan.finish_reason != "length":
            text, n = content[-1]
            content[-1] = (text + '"}', n)
    if empty_json:
        content = [(" " * len(t), n) for t, n in content]
    plan.content = content
    apply_stop(plan, stops_of(body))
    return plan


def stops_of(body: dict[str, Any]) -> list[str]:
    """The request's stop strings (OpenAI's ``stop``: a string or a list)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


def apply_stop(plan: Plan, stops: list[str]) -> None:
    """Cut the text before the first stop string it holds, as a server does (the stop string is not sent): the
    answer then finished with ``stop``, and names the string (``plan.stop_sequence``)."""
    text = "".join(t for t, _ in plan.content)
    found = [(text.find(s), i, s) for i, s in enumerate(stops) if s in text]
    if not found:
        return
    at, _, matched = min(found)
    kept: list[Piece] = []
    seen = 0
    for piece, n in plan.content:
        if seen + len(piece) > at:
            if at > seen:
                kept.append((piece[: at - seen], n))
            break
        kept.append((piece, n))
        seen += len(piece)
    plan.content = kept
    plan.finish_reason = "stop"
    plan.stop_sequence = matched
    for name in ("completion_tokens", "text"):  # cached properties of the plan: counted again
        plan.__dict__.pop(name, None)


def sample(schema: Any, key: str = "") -> Any:
    """A small JSON value that follows ``schema`` (enough for structured outputs and tool inputs)."""
    if not isinstance(schema, dict):
        return "tok"
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for k in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(k), list) and schema[k]:
            return sample(schema[k][0], key)
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
        return {k: sample(v, k) for k, v in props.items()}
    if kind == "array":
        return [sample(schema.get("items"), key)]
    if kind == "integer":
        return 42
    if kind == "number":
        return 4.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _CITIES[0] if key in ("city", "location") else "tok"


def split_text(text: str, parts: int) -> list[str]:
    step = max(1, -(-len(text) // max(parts, 1)))
    return [text[i:i + step] for i in range(0, len(text), step)] or [""]


def schema_content(plan: Plan, schema: Any) -> None:
    """Structured output: the plan's content becomes JSON that follows ``schema``, over as many chunks."""
    if plan.content and plan.finish_reason != "length":
        plan.content = [(p, 1) for p in split_text(orjson.dumps(sample(schema)).decode(), len(plan.content))]
        for name in ("completion_tokens", "text"):  # cached properties of the plan: counted again
            plan.__dict__.pop(name, None)
