"""The ``anthropic`` flavour: Anthropic's Messages API (``POST /v1/messages``, ``x-api-key``), JSON and SSE.

Enough of Anthropic's behaviour to exercise an adapter honestly: it refuses what the real API refuses (unknown
top-level fields, roles that do not alternate, empty text blocks, a ``tool_result`` without the ``tool_use`` it
answers, a forced tool choice or sampling changes together with thinking, a temperature above 1, a missing
``max_tokens``, a thinking block whose signature it did not issue, and -- with thinking on -- an assistant tool-use
turn sent back without its thinking block); it answers with thinking blocks (signed), text, ``tool_use`` blocks
(inputs drawn from each tool's ``input_schema``), structured outputs (``output_config.format``: JSON that follows the
schema), text cut at the first of its ``stop_sequences`` (``stop_reason: stop_sequence`` naming it), ``citations``
on the text when a ``document`` has them enabled (``citations_delta`` in a stream), a ``redacted_thinking`` block
(knob ``redacted_thinking``), and usage with cache reads (knob ``cached_tokens``) and writes (knob
``cache_write_tokens``). Streams are
Anthropic's events with ``event:`` lines, ``ping``, and no ``[DONE]``; errors are ``{"type": "error", "error":
{"type", "message"}}`` with Anthropic's statuses (``error_kind=529`` is ``overloaded_error``), in-stream as an
``error`` event.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from therouter.fakeupstream.asgi import (
    JSON_HEADERS,
    SSE_HEADERS,
    Exchange,
    FakeConnectionCut,
    content_length,
)
from therouter.fakeupstream.content import Plan, sample, schema_content, split_text
from therouter.fakeupstream.flavors import ErrorSpec, Flavor, bad_request

Event = tuple[bytes, int, bool]  # (encoded event, completion tokens carried, is a generated chunk)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
TOP_LEVEL = frozenset({"model", "messages", "system", "max_tokens", "metadata", "stop_sequences", "stream",
                       "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "output_config",
                       "service_tier", "container", "mcp_servers", "context_management", "fake"})
BLOCKS = frozenset({"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"})


def signature(thinking: str) -> str:
    """The signature this fake issues for a thinking block (and checks when the block comes back)."""
    return "sig_" + hashlib.sha256(thinking.encode()).hexdigest()[:40]


class AnthropicFlavor(Flavor):
    name = "anthropic"
    owned_by = "anthropic"
    auth_header = "x-api-key"

    def auth_value(self, api_key: str) -> str:
        return api_key

    def chat_id(self) -> str:
        return f"msg_{uuid.uuid4().hex[:24]}"

    def tool_id(self) -> str:
        return f"toolu_{uuid.uuid4().hex[:24]}"

    def error_body(self, err: ErrorSpec) -> dict[str, Any]:
        return {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message},
                "request_id": f"req_{uuid.uuid4().hex[:24]}"}

    def stream_error(self, err: ErrorSpec) -> dict[str, Any]:
        return {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message}}

    def error_headers(self, err: ErrorSpec) -> list[tuple[bytes, bytes]]:
        return [(b"request-id", f"req_{uuid.uuid4().hex[:24]}".encode())]

    def model_not_found(self, model: str) -> ErrorSpec:
        return ErrorSpec(404, f"model: {model}", "not_found_error", "not_found_error")

    def unauthorized(self) -> ErrorSpec:
        return ErrorSpec(401, "invalid x-api-key", "authentication_error", "authentication_error")

    def context_error(self, prompt_tokens: int, completion_tokens: int, max_model_len: int) -> ErrorSpec:
        return bad_request(f"prompt is too long: {max_model_len + prompt_tokens} tokens > {max_model_len} maximum")

    def usage(self, plan: Plan) -> dict[str, Any]:
        written = min(plan.cache_write_tokens, plan.prompt_tokens - plan.cached_tokens)
        return {"input_tokens": plan.prompt_tokens - plan.cached_tokens - written,
                "cache_creation_input_tokens": written, "cache_read_input_tokens": plan.cached_tokens,
                "output_tokens": plan.completion_tokens, "service_tier": "standard"}

    def default_model(self, models: list[str]) -> str | None:
        return None

    def thinking_requested(self, body: dict[str, Any]) -> bool:
        th = body.get("thinking")
        return isinstance(th, dict) and th.get("type") in ("enabled", "adaptive")

    def validate(self, route: str, body: dict[str, Any], reasoning_on: bool) -> ErrorSpec | None:
        return validate_request(body, self.thinking_requested(body))

    def model_entry(self, model_id: str, created: int, max_model_len: int) -> dict[str, Any]:
        when = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"type": "model", "id": model_id, "display_name": model_id, "created_at": when}

    def plan_body(self, body: dict[str, Any]) -> dict[str, Any]:
        return plan_view(body)

    def adjust_plan(self, plan: Plan, body: dict[str, Any]) -> None:
        adjust_plan(plan, body)


# ---- request checks -------------------------------------------------------------------------------------------------


def validate_request(body: dict[str, Any], thinking: bool) -> ErrorSpec | None:
    extra = sorted(set(body) - TOP_LEVEL)
    if extra:
        return bad_request(f"{extra[0]}: Extra inputs are not permitted")
    mt = body.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        return bad_request("max_tokens: Field required")
    t = body.get("temperature")
    if isinstance(t, (int, float)) and not 0 <= t <= 1:
        return bad_request("temperature: range: 0..1")
    if thinking:
        if any(k in body for k in ("temperature", "top_k")):
            return bad_request("`temperature` may only be set to 1 when thinking is enabled.")
        tc = body.get("tool_choice")
        if isinstance(tc, dict) and tc.get("type") in ("any", "tool"):
            return bad_request("Thinking may not be enabled when tool_choice forces tool use.")
    return _check_messages(body.get("messages") or [], thinking)


def _check_messages(messages: list[Any], thinking: bool) -> ErrorSpec | None:
    prev_role: str | None = None
    prev_tool_ids: set[Any] = set()
    last_tool_turn = -1
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            return bad_request(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if role == prev_role:
            return bad_request("messages: roles must alternate between \"user\" and \"assistant\", but found "
                               f"multiple \"{role}\" roles in a row")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            return bad_request(f"messages.{i}.content: must be a non-empty string or list of content blocks")
        ids = set()
        for j, b in enumerate(blocks):
            err = _check_block(b, f"messages.{i}.content.{j}", role, prev_tool_ids)
            if err is not None:
                return err
            if b.get("type") == "tool_use":
                ids.add(b.get("id"))
                last_tool_turn = i
        prev_role, prev_tool_ids = role, ids
    if thinking and last_tool_turn >= 0:
        first = messages[last_tool_turn]["content"][0].get("type")
        if first not in ("thinking", "redacted_thinking"):
            return bad_request(
                f"messages.{last_tool_turn}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                f"`{first}`. When `thinking` is enabled, a final `assistant` message must start with a thinking "
                "block (preceeding the lastmost set of `tool_use` and `tool_result` blocks).")
    return None


def _check_block(b: Any, where: str, role: str, answerable: set[Any]) -> ErrorSpec | None:
    kind = b.get("type") if isinstance(b, dict) else None
    if kind not in BLOCKS:
        return bad_request(f"{where}.type: unknown content block type {kind!r}")
    if kind == "text" and not (isinstance(b.get("text"), str) and b["text"].strip()):
        return bad_request(f"{where}.text: text content blocks must contain non-whitespace text")
    if kind == "thinking" and b.get("signature") != signature(str(b.get("thinking"))):
        return bad_request(f"{where}: Invalid `signature` in `thinking` block")
    if kind in ("tool_use", "thinking", "redacted_thinking") and role != "assistant":
        return bad_request(f"{where}.type: `{kind}` blocks are only allowed in assistant messages")
    if kind == "tool_use" and not isinstance(b.get("input"), dict):
        return bad_request(f"{where}.input: Input should be a valid dictionary")
    if kind == "tool_result" and b.get("tool_use_id") not in answerable:
        return bad_request(f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                           f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                           "block in the previous message.")
    if kind == "image":
        src = b.get("source") if isinstance(b.get("source"), dict) else {}
        ok = (src.get("type") == "base64" and src.get("media_type") in ("image/jpeg", "image/png", "image/gif",
                                                                         "image/webp") and src.get("data")) or \
             (src.get("type") == "url" and str(src.get("url", "")).startswith("https://"))
        if not ok:
            return bad_request(f"{where}.source: invalid image source")
    return None


# ---- what the answer says -------------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for b in content if isinstance(content, list) else ():
        if isinstance(b, dict):
            if isinstance(b.get("text"), str):
                out.append(b["text"])
            elif b.get("type") == "tool_result":
                out.append(_text(b.get("content")))
    return " ".join(out)


def plan_view(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the flavour-neutral planner reads it (OpenAI-shaped)."""
    messages = body.get("messages") or []
    view: dict[str, Any] = {"messages": [{"role": "system", "content": _text(body.get("system"))}]
                            + [{"role": m.get("role"), "content": _text(m.get("content"))} for m in messages
                               if isinstance(m, dict)],
                            "max_tokens": body.get("max_tokens"), "stop": body.get("stop_sequences")}
    tc: dict[str, Any] = body["tool_choice"] if isinstance(body.get("tool_choice"), dict) else {}
    forced = tc.get("type") in ("any", "tool")
    last = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    answered = isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in last)
    tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
    if tools and (forced or not answered):  # with the tool results in hand, the model answers in text
        view["tools"] = [{"type": "function", "function": {"name": t.get("name")}} for t in tools]
        if tc.get("type") == "none":
            view["tool_choice"] = "none"
        elif tc.get("type") == "tool":
            view["tool_choice"] = {"type": "function", "function": {"name": tc.get("name")}}
    return view


def adjust_plan(plan: Plan, body: dict[str, Any]) -> None:
    """Tool inputs that follow each tool's input_schema; structured output that follows its schema."""
    schemas = {t.get("name"): t.get("input_schema") for t in body.get("tools") or () if isinstance(t, dict)}
    for tc in plan.tool_calls:  # the planner's {"city": ...} where the tool takes a city, a sample elsewhere
        schema = schemas.get(tc.name)
        props = schema.get("properties") if isinstance(schema, dict) else None
        if isinstance(props, dict) and props and "city" not in props:
            tc.arguments = orjson.dumps(sample(schema)).decode()
        tc.fragments = split_text(tc.arguments, 3)
    plan.citations = citations(body) if plan.content else []
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema_content(plan, fmt.get("schema"))
    for name in ("completion_tokens", "text"):  # cached properties of the plan: counted again
        plan.__dict__.pop(name, None)


def citations(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One citation of each document that has citations enabled (``document_index`` counts the request's
    documents in order): of a text document its opening words (``char_location``), of others a page."""
    out: list[dict[str, Any]] = []
    index = 0
    messages = body.get("messages")
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        for b in content if isinstance(content, list) else ():
            if not isinstance(b, dict) or b.get("type") != "document":
                continue
            cit = b.get("citations")
            if isinstance(cit, dict) and cit.get("enabled") is True:
                given = b.get("source")
                src: dict[str, Any] = given if isinstance(given, dict) else {}
                title = b.get("title") if isinstance(b.get("title"), str) else None
                if src.get("type") == "text" and isinstance(src.get("data"), str):
                    cited = src["data"][:40]
                    out.append({"type": "char_location", "cited_text": cited, "document_index": index,
                                "document_title": title, "start_char_index": 0, "end_char_index": len(cited)})
                else:
                    out.append({"type": "page_location", "cited_text": "tok", "document_index": index,
                                "document_title": title, "start_page_number": 1, "end_page_number": 2})
            index += 1
    return out


def _stop(plan: Plan) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence)."""
    if plan.stop_sequence is not None:
        return "stop_sequence", plan.stop_sequence
    return STOP_REASONS.get(plan.finish_reason, "end_turn"), None


def redacted_data(plan: Plan) -> str:
    return "EqQBCgIYAhIM" + hashlib.sha256(plan.reasoning_text.encode()).hexdigest()[:32]


# ---- rendering ------------------------------------------------------------------------------------------------------


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def message_body(flavor: AnthropicFlavor, plan: Plan, *, rid: str, model: str, send_usage: bool,
                 usage_patch: dict[str, Any] | None, redacted: bool = False) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if plan.reasoning:
        content.append({"type": "thinking", "thinking": plan.reasoning_text,
                        "signature": signature(plan.reasoning_text)})
    if redacted:
        content.append({"type": "redacted_thinking", "data": redacted_data(plan)})
    if plan.text:
        text: dict[str, Any] = {"type": "text", "text": plan.text}
        if plan.citations:
            text["citations"] = plan.citations
        content.append(text)
    content.extend({"type": "tool_use", "id": tc.id, "name": tc.name, "input": orjson.loads(tc.arguments)}
                   for tc in plan.tool_calls)
    reason, seq = _stop(plan)
    body: dict[str, Any] = {"id": rid, "type": "message", "role": "assistant", "model": model, "content": content,
                            "stop_reason": reason, "stop_sequence": seq}
    if send_usage:
        body["usage"] = {**flavor.usage(plan), **(usage_patch or {})}
    return body


def stream_events(flavor: AnthropicFlavor, plan: Plan, *, rid: str, model: str, send_usage: bool,
                  usage_patch: dict[str, Any] | None, redacted: bool = False) -> list[Event]:
    usage = {**flavor.usage(plan), **(usage_patch or {})}
    start_usage = {**usage, "output_tokens": 1}
    events: list[Event] = [
        (_event({"type": "message_start", "message": {"id": rid, "type": "message", "role": "assistant",
                                                       "model": model, "content": [], "stop_reason": None,
                                                       "stop_sequence": None, "usage": start_usage}}), 0, False),
        (_event({"type": "ping"}), 0, False),
    ]
    index = 0

    def block(start: dict[str, Any], deltas: list[tuple[dict[str, Any], int, bool]], start_tokens: int = 0) -> None:
        nonlocal index
        events.append((_event({"type": "content_block_start", "index": index, "content_block": start}),
                       start_tokens, start_tokens > 0))
        for d, n, gen in deltas:
            events.append((_event({"type": "content_block_delta", "index": index, "delta": d}), n, gen))
        events.append((_event({"type": "content_block_stop", "index": index}), 0, False))
        index += 1

    if plan.reasoning:
        block({"type": "thinking", "thinking": "", "signature": ""},
              [({"type": "thinking_delta", "thinking": t}, n, True) for t, n in plan.reasoning]
              + [({"type": "signature_delta", "signature": signature(plan.reasoning_text)}, 0, False)])
    if redacted:
        block({"type": "redacted_thinking", "data": redacted_data(plan)}, [])
    if plan.content:
        deltas: list[tuple[dict[str, Any], int, bool]] = [({"type": "text_delta", "text": t}, n, True)
                                                          for t, n in plan.content]
        deltas[1:1] = [({"type": "citations_delta", "citation": c}, 0, False) for c in plan.citations]
        block({"type": "text", "text": ""}, deltas)
    for tc in plan.tool_calls:  # the block start carries the call's name: one token, as in the other flavours
        block({"type": "tool_use", "id": tc.id, "name": tc.name, "input": {}},
              [({"type": "input_json_delta", "partial_json": f}, 1, True) for f in tc.fragments], start_tokens=1)
    reason, seq = _stop(plan)
    end: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}}
    if send_usage:
        end["usage"] = {"output_tokens": usage["output_tokens"]}
    events.append((_event(end), 0, False))
    events.append((_event({"type": "message_stop"}), 0, False))
    return events


# ---- writers (the same fault knobs as the OpenAI-shaped flavours) ---------------------------------------------------


async def write_json(flavor: Flavor, ex: Exchange, knobs: dict[str, Any], plan: Plan, fault: str | None, *,
                     rid: str) -> None:
    assert isinstance(flavor, AnthropicFlavor)
    payload = orjson.dumps(message_body(flavor, plan, rid=rid, model=ex.entry["model"],
                                        send_usage=fault != "no_usage", usage_patch=knobs.get("usage_patch"),
                                        redacted=knobs["redacted_thinking"]))
    if fault == "bad_json":
        payload = b"{not json"
    if fault == "cut":
        await ex.start(200, JSON_HEADERS + [content_length(payload)])
        await ex.write(payload[: len(payload) // 2])
        raise FakeConnectionCut()
    await ex.start(200, JSON_HEADERS + [content_length(payload)])
    if fault == "stall":
        await asyncio.sleep(knobs["stall_ms"] / 1000)
    ex.entry["tokens_sent"] = plan.completion_tokens
    await ex.finish(payload)


async def write_stream(flavor: Flavor, ex: Exchange, knobs: dict[str, Any], plan: Plan, fault: str | None, *,
                       rid: str, in_band: ErrorSpec) -> None:
    assert isinstance(flavor, AnthropicFlavor)
    await ex.start(200, SSE_HEADERS)
    for _ in range(knobs["keepalive_comments"]):  # Anthropic keeps a stream alive with ping events
        await ex.write(_event({"type": "ping"}))
        await asyncio.sleep(knobs["keepalive_ms"] / 1000)
    if knobs["ttft_ms"] > 0:
        await asyncio.sleep(knobs["ttft_ms"] / 1000)
    error = _event(flavor.stream_error(in_band))
    if fault == "in_band":
        await ex.finish(error)
        return
    events = stream_events(flavor, plan, rid=rid, model=ex.entry["model"], send_usage=fault != "no_usage",
                           usage_patch=knobs.get("usage_patch"), redacted=knobs["redacted_thinking"])
    if fault == "no_done":
        events.pop()  # no message_stop
    if fault == "bad_json" and knobs["bad_json_at"] < len(events):
        events[knobs["bad_json_at"]] = (b"event: content_block_delta\ndata: {not json\n\n", 0, True)
    gens = [i for i, (_, _, gen) in enumerate(events) if gen]
    cut_at = gens[knobs["cut_after"]] if fault in ("cut", "in_band_mid") and knobs["cut_after"] < len(gens) else -1
    stall_at = gens[knobs["stall_after"]] if fault == "stall" and knobs["stall_after"] < len(gens) else -1
    delay, seen, tokens = knobs["chunk_delay_ms"] / 1000, False, 0
    for i, (data, n, gen) in enumerate(events):
        if i == cut_at and fault == "in_band_mid":
            await ex.finish(error)
            return
        if i == cut_at:
            raise FakeConnectionCut()
        if i == stall_at:
            await asyncio.sleep(knobs["stall_ms"] / 1000)
        if gen and seen and delay > 0:
            await asyncio.sleep(delay)
        seen = seen or gen
        await ex.write(data)
        tokens += n
        ex.entry["tokens_sent"] = tokens
    if fault == "cut" and cut_at < 0:
        raise FakeConnectionCut()
    await ex.finish()
