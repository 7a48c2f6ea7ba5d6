"""Anthropic's Messages API on top of the gateway (pure translation, no I/O).

A ``/v1/messages`` request is translated ONCE into an OpenAI chat body (:func:`to_openai`), which the gateway then
validates, admits, routes, meters and records exactly like ``/v1/chat/completions``; its answer is translated back:
a completion into a ``message`` object (:func:`to_message`), a chunk stream into Anthropic's events
(:class:`MessageStream`), a :class:`~therouter.errors.GatewayError` into Anthropic's error type and status
(:func:`error_status`). The reverse direction (OpenAI -> Messages, for the hosted adapter) is
``providers/_anthropic_request.py``; thinking blocks travel as its ``reasoning_details`` entries (format
``anthropic-claude-v1``), so a signature sent back by the client reaches an Anthropic deployment intact.

Mapping (request):
- ``system`` (string or text blocks) -> a system message; ``cache_control`` anywhere is dropped.
- user ``text`` / ``image`` (base64 or url) blocks -> content parts; ``tool_result`` blocks -> ``tool`` messages
  (placed before the rest of that user turn, as OpenAI wants them right after the assistant's calls).
- assistant ``text`` -> content, ``tool_use`` -> ``tool_calls`` (input as JSON text), ``thinking`` /
  ``redacted_thinking`` -> ``reasoning_content`` + ``reasoning_details``.
- ``tools[].input_schema`` -> function ``parameters``; ``tool_choice`` auto / any / tool / none -> auto / required /
  the named function / none (``disable_parallel_tool_use`` -> ``parallel_tool_calls: false``);
  ``stop_sequences`` -> ``stop``; ``metadata.user_id`` -> ``user``; ``thinking.budget_tokens`` -> ``reasoning``;
  ``temperature`` / ``top_p`` / ``top_k`` as they are; ``max_tokens`` is required, as Anthropic requires it.

Mapping (answer): ``stop`` -> ``end_turn`` (``stop_sequence`` when the upstream names the matched sequence),
``length`` -> ``max_tokens``, ``tool_calls`` -> ``tool_use``, ``content_filter`` -> ``refusal``. Usage: input tokens
are the prompt less its cache reads and writes, which are reported in their own fields, as Anthropic does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from therouter.errors import GatewayError, InvalidRequest
from therouter.providers._anthropic_request import REASONING_FORMAT
from therouter.providers.anthropic import reasoning_entry

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
# GatewayError status -> (status, Anthropic error type), the statuses Anthropic's SDKs map to their exception
# classes. A budget exhausted is our 402 -> Anthropic's own 402 `billing_error` (PaymentRequiredError in the SDKs):
# never retried by an SDK (a 429 would be, in a loop), and it says what it is. Every deployment unavailable (our 503)
# is Anthropic's 529 `overloaded_error`.
ERROR_TYPES: dict[int, tuple[int, str]] = {
    400: (400, "invalid_request_error"), 401: (401, "authentication_error"), 402: (402, "billing_error"),
    403: (403, "permission_error"), 404: (404, "not_found_error"), 408: (408, "timeout_error"),
    413: (413, "request_too_large"), 429: (429, "rate_limit_error"), 431: (413, "request_too_large"),
    503: (529, "overloaded_error"), 504: (504, "timeout_error"),
}
PING_SECONDS = 10.0  # a `ping` event after this long without an event from the upstream


def error_status(err: GatewayError) -> tuple[int, str]:
    """The status and Anthropic error ``type`` a gateway error is answered with."""
    if err.status in ERROR_TYPES:
        return ERROR_TYPES[err.status]
    if err.status >= 500:
        return err.status, "api_error"
    return err.status, "invalid_request_error"


def error_body(err: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_status(err)[1], "message": err.message}}


# ---- request ------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MessagesRequest:
    """A Messages request as the gateway will see it: the OpenAI body, and what the answer needs to say."""

    model: str  # the id the client sent (the answer's `model`)
    stream: bool
    openai: dict[str, Any]
    native: dict[str, Any]  # the body as the client sent it: an Anthropic deployment gets it as it is
    stop_sequences: list[str] = field(default_factory=list)
    # what the translation cannot carry (document blocks, server tools): only an Anthropic deployment may serve it
    native_only: tuple[str, ...] = ()


def read_request(body: dict[str, Any], *, count_only: bool = False) -> MessagesRequest:
    """Anthropic's Messages request -> the gateway's OpenAI chat body. ``count_only``: for count_tokens (no
    ``max_tokens`` needed)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required (a model id string).", param="model",
                             code="missing_required_parameter")
    mt = body.get("max_tokens")
    if not count_only and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        raise InvalidRequest("max_tokens: Field required (an integer of at least 1).", param="max_tokens",
                             code="missing_required_parameter" if mt is None else "invalid_value")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidRequest("messages: Field required (a non-empty list).", param="messages",
                             code="missing_required_parameter")
    messages = _system(body.get("system"))
    for i, m in enumerate(raw_messages):
        messages.extend(_message(m, f"messages[{i}]"))
    out: dict[str, Any] = {"model": model, "messages": messages}
    if not count_only:
        out["max_tokens"] = mt
    stream = body.get("stream") is True
    if stream:
        out["stream"], out["stream_options"] = True, {"include_usage": True}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidRequest("stop_sequences must be a list of strings.", param="stop_sequences",
                                 code="invalid_value")
        if stops:
            out["stop"] = stops
    meta = body.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
        out["user"] = meta["user_id"]
    native_only: list[str] = []
    _tools(body, out, native_only)
    _thinking(body.get("thinking"), out)
    if _has_documents(raw_messages):
        native_only.insert(0, "document blocks")
    return MessagesRequest(model=model, stream=stream, openai=out, native=body, stop_sequences=list(stops or ()),
                           native_only=tuple(native_only))


def _has_documents(messages: list[Any]) -> bool:
    for m in messages:
        for b in m["content"] if isinstance(m.get("content"), list) else ():
            inner = b.get("content") if b.get("type") == "tool_result" else None
            if b.get("type") == "document" or (isinstance(inner, list) and any(
                    isinstance(c, dict) and c.get("type") == "document" for c in inner)):
                return True
    return False


def _document(b: dict[str, Any], at: str) -> dict[str, Any]:
    """A document block -> a text part, for the gateway's own estimate of the prompt only: a request holding one is
    served by an Anthropic deployment, which gets the block as it came (citations and all). A PDF's or a URL's text
    is unknown here: it counts as its title (the upstream's usage is what is billed)."""
    given = b.get("source")
    src: dict[str, Any] = given if isinstance(given, dict) else {}
    kind = src.get("type")
    if kind == "text" and isinstance(src.get("data"), str):
        text = src["data"]
    elif kind == "content" and isinstance(src.get("content"), (str, list)):
        inner = src["content"]
        text = inner if isinstance(inner, str) else "\n".join(
            str(c.get("text") or "") for c in inner if isinstance(c, dict) and c.get("type") == "text")
    elif kind in ("base64", "url", "file"):
        text = ""
    else:
        raise InvalidRequest("A document block needs a `source` of type text, content, base64, url or file.",
                             param=f"{at}.source", code="invalid_value")
    title = b.get("title") if isinstance(b.get("title"), str) else ""
    context = b.get("context") if isinstance(b.get("context"), str) else ""
    return {"type": "text", "text": "\n".join(t for t in (title, context, text) if t) or "[document]"}


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of content blocks.", param=where,
                             code="invalid_value")
    texts = []
    for j, b in enumerate(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise InvalidRequest(f"{where}[{j}] must be a text block.", param=f"{where}[{j}]", code="invalid_value")
        texts.append(b["text"])
    return "\n\n".join(texts)


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None or system == "" or system == []:
        return []
    return [{"role": "system", "content": _text_of(system, "system")}]


def _blocks(m: dict[str, Any], where: str) -> list[dict[str, Any]]:
    content = m.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of content blocks.",
                             param=f"{where}.content", code="invalid_value")
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise InvalidRequest(f"{where}.content[{j}] must be a content block with a `type`.",
                                 param=f"{where}.content[{j}]", code="invalid_value")
    return content


def _message(m: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(m, dict):
        raise InvalidRequest(f"{where} must be an object.", param=where, code="invalid_value")
    role = m.get("role")
    if role == "user":
        return _user(_blocks(m, where), where)
    if role == "assistant":
        return [_assistant(_blocks(m, where), where)]
    raise InvalidRequest(f"{where}.role must be 'user' or 'assistant'.", param=f"{where}.role", code="invalid_value")


def _image(b: dict[str, Any], at: str) -> dict[str, Any]:
    src = b.get("source")
    if isinstance(src, dict) and src.get("type") == "base64" and isinstance(src.get("data"), str):
        url = f"data:{src.get('media_type') or 'image/png'};base64,{src['data']}"
    elif isinstance(src, dict) and src.get("type") == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise InvalidRequest("An image block needs a `source` of type base64 (with data) or url.",
                             param=f"{at}.source", code="invalid_value")
    return {"type": "image_url", "image_url": {"url": url}}


def _user(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        at, kind = f"{where}.content[{j}]", b["type"]
        if kind == "text":
            parts.append({"type": "text", "text": str(b.get("text") or "")})
        elif kind == "image":
            parts.append(_image(b, at))
        elif kind == "tool_result":
            tools.append(_tool_result(b, at, parts))
        elif kind == "document":
            parts.append(_document(b, at))
        else:
            raise InvalidRequest(f"The content block type `{kind}` is not supported in a user message.",
                                 param=f"{at}.type", code="unsupported_parameter")
    out = list(tools)
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text and len(parts) == 1
                    else parts})
    return out


def _tool_result(b: dict[str, Any], at: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    tid = b.get("tool_use_id")
    if not isinstance(tid, str) or not tid:
        raise InvalidRequest("A tool_result block needs the `tool_use_id` of the call it answers.",
                             param=f"{at}.tool_use_id", code="missing_required_parameter")
    content = b.get("content")
    texts: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for k, c in enumerate(content):
            if isinstance(c, dict) and c.get("type") == "text":
                texts.append(str(c.get("text") or ""))
            elif isinstance(c, dict) and c.get("type") == "image":
                parts.append(_image(c, f"{at}.content[{k}]"))  # a tool message carries text: the image follows
            elif isinstance(c, dict) and c.get("type") == "document":
                texts.append(_document(c, f"{at}.content[{k}]")["text"])
            else:
                raise InvalidRequest("A tool_result's content must be text, image or document blocks.",
                                     param=f"{at}.content[{k}]", code="invalid_value")
    text = "\n".join(texts)
    if b.get("is_error") is True:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": tid, "content": text}


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    details: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        at, kind = f"{where}.content[{j}]", b["type"]
        if kind == "text":
            texts.append(str(b.get("text") or ""))
        elif kind == "thinking":
            thinking.append(str(b.get("thinking") or ""))
            details.append(reasoning_entry(len(details), text=str(b.get("thinking") or ""),
                                           signature=b.get("signature") if isinstance(b.get("signature"), str)
                                           else None))
        elif kind == "redacted_thinking" and isinstance(b.get("data"), str):
            details.append(reasoning_entry(len(details), data=b["data"]))
        elif kind == "tool_use":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                raise InvalidRequest("A tool_use block needs an `id` and a `name`.", param=at, code="invalid_value")
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": orjson.dumps(b.get("input") or {}).decode()}})
        else:
            raise InvalidRequest(f"The content block type `{kind}` is not supported in an assistant message.",
                                 param=f"{at}.type", code="unsupported_parameter")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if thinking:
        msg["reasoning_content"] = "".join(thinking)
    if details:
        msg["reasoning_details"] = details
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tools(body: dict[str, Any], out: dict[str, Any], native_only: list[str]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be a list.", param="tools", code="invalid_value")
        fns = []
        for i, t in enumerate(tools):
            if isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("input_schema") is None and \
                    isinstance(t.get("type"), str) and t["type"] != "custom":
                # a server tool (web search, code execution, ...): Anthropic runs it; no other host can
                if "server tools" not in native_only:
                    native_only.append("server tools")
                continue
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(
                    t.get("input_schema"), dict):
                raise InvalidRequest("Each tool needs a `name` and an `input_schema` (or a server tool's `type`).",
                                     param=f"tools[{i}]", code="invalid_value")
            fn: dict[str, Any] = {"name": t["name"], "parameters": t["input_schema"]}
            if isinstance(t.get("description"), str):
                fn["description"] = t["description"]
            fns.append({"type": "function", "function": fn})
        if fns:
            out["tools"] = fns
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise InvalidRequest("tool_choice must be {type: auto | any | none} or {type: tool, name}.",
                             param="tool_choice", code="invalid_value")
    if choice.get("disable_parallel_tool_use") is True and "tools" in out:
        out["parallel_tool_calls"] = False


def _thinking(thinking: Any, out: dict[str, Any]) -> None:
    if thinking is None:
        return
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise InvalidRequest("thinking.budget_tokens must be a positive integer.", param="thinking.budget_tokens",
                                 code="invalid_value")
        out["reasoning"] = {"enabled": True, "max_tokens": budget}
    elif kind == "adaptive":
        out["reasoning"] = {"enabled": True}
    elif kind == "disabled":
        out["reasoning"] = {"enabled": False}
    else:
        raise InvalidRequest("thinking must be {type: enabled, budget_tokens} or {type: disabled}.",
                             param="thinking", code="invalid_value")


# ---- answer -------------------------------------------------------------------------------------------------------


def usage_of(u: Any) -> dict[str, int]:
    """OpenAI usage (ours: prompt includes cache reads and writes) -> Anthropic's four counts."""
    u = u if isinstance(u, dict) else {}
    details = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    read, write = int(details.get("cached_tokens") or 0), int(details.get("cache_write_tokens") or 0)
    prompt = int(u.get("prompt_tokens") or 0)
    return {"input_tokens": max(prompt - read - write, 0), "output_tokens": int(u.get("completion_tokens") or 0),
            "cache_read_input_tokens": read, "cache_creation_input_tokens": write}


def stop_reason(finish: Any, matched: Any, stops: list[str]) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence). ``matched``: the stop string an upstream names (vLLM's ``stop_reason``)."""
    if finish == "stop" and isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return (STOP_REASONS.get(finish, "end_turn") if finish else None), None


def matched_stop(choice: dict[str, Any]) -> Any:
    """The stop string an upstream says ended the text: vLLM's ``stop_reason``, SGLang's ``matched_stop`` (which is
    a token id when generation hit end-of-sequence: not one of the client's strings)."""
    v = choice.get("stop_reason")
    return v if v is not None else choice.get("matched_stop")


def _thinking_blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for d in msg.get("reasoning_details") or ():
        if not isinstance(d, dict) or d.get("format", REASONING_FORMAT) != REASONING_FORMAT:
            continue
        if d.get("type") == "reasoning.text":
            out.append({"type": "thinking", "thinking": str(d.get("text") or ""),
                        "signature": str(d.get("signature") or "")})
        elif d.get("type") == "reasoning.encrypted" and isinstance(d.get("data"), str):
            out.append({"type": "redacted_thinking", "data": d["data"]})
    if not out and msg.get("reasoning_content"):
        out.append({"type": "thinking", "thinking": str(msg["reasoning_content"]), "signature": ""})
    return out


def _input(arguments: Any) -> Any:
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def to_message(obj: dict[str, Any], req: MessagesRequest) -> dict[str, Any]:
    """An OpenAI chat completion (the gateway's answer) -> Anthropic's ``message`` object."""
    choices = obj.get("choices")
    ch = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    msg = ch["message"] if isinstance(ch.get("message"), dict) else {}
    content = _thinking_blocks(msg)
    if msg.get("content"):
        content.append({"type": "text", "text": str(msg["content"])})
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            content.append({"type": "tool_use", "id": str(tc.get("id") or ""), "name": str(fn.get("name") or ""),
                            "input": _input(fn.get("arguments"))})
    reason, seq = stop_reason(ch.get("finish_reason"), matched_stop(ch), req.stop_sequences)
    return {"id": str(obj.get("id") or ""), "type": "message", "role": "assistant", "model": req.model,
            "content": content, "stop_reason": reason, "stop_sequence": seq, "usage": usage_of(obj.get("usage"))}


# ---- stream -------------------------------------------------------------------------------------------------------


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


PING = event("ping", {})


class MessageStream:
    """The gateway's chunk stream (OpenAI shape, ours) -> Anthropic's events, one content block per thinking / text /
    tool-call segment, indices in order. Feed it each chunk (:meth:`chunk`), then :meth:`done` at ``[DONE]``, or
    :meth:`error` for a failure after the first event (an ``error`` event: never a silent end)."""

    def __init__(self, req: MessagesRequest, gen_id: str, input_tokens: int) -> None:
        self.req = req
        self.gen_id = gen_id
        self.input_tokens = input_tokens
        self.started = False
        self.index = -1  # the open block's index (-1: none open yet)
        self.open: tuple[str, int] | None = None  # (kind, tool index) of the open block
        self.finish: Any = None
        self.matched: Any = None
        self.usage: Any = None

    def begin(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        return [event("message_start", {"message": {
            "id": self.gen_id, "type": "message", "role": "assistant", "model": self.req.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}})]

    def _block(self, kind: str, tool: int = -1, start: dict[str, Any] | None = None) -> list[bytes]:
        if self.open == (kind, tool):
            return []
        out = self._close()
        self.index += 1
        self.open = (kind, tool)
        block = start or ({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                          else {"type": "text", "text": ""})
        out.append(event("content_block_start", {"index": self.index, "content_block": block}))
        return out

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"index": self.index})]

    def _delta(self, delta: dict[str, Any]) -> list[bytes]:
        return [event("content_block_delta", {"index": self.index, "delta": delta})]

    def chunk(self, obj: dict[str, Any]) -> list[bytes]:
        out = self.begin()
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        choices = obj.get("choices")
        ch = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if ch is None:
            return out
        d = ch["delta"] if isinstance(ch.get("delta"), dict) else {}
        reasoning = d.get("reasoning_content") or d.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out += self._block("thinking") + self._delta({"type": "thinking_delta", "thinking": reasoning})
        for entry in d.get("reasoning_details") or ():
            if isinstance(entry, dict) and isinstance(entry.get("signature"), str) and entry["signature"]:
                out += self._block("thinking") + self._delta({"type": "signature_delta",
                                                              "signature": entry["signature"]})
        if isinstance(d.get("content"), str) and d["content"]:
            out += self._block("text") + self._delta({"type": "text_delta", "text": d["content"]})
        for tc in d.get("tool_calls") or ():
            if not isinstance(tc, dict):
                continue
            fn = tc["function"] if isinstance(tc.get("function"), dict) else {}
            idx = tc["index"] if isinstance(tc.get("index"), int) else 0
            out += self._block("tool", idx, {"type": "tool_use", "id": str(tc.get("id") or ""),
                                             "name": str(fn.get("name") or ""), "input": {}})
            if isinstance(fn.get("arguments"), str) and fn["arguments"]:
                out += self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]})
        if ch.get("finish_reason"):
            self.finish, self.matched = ch["finish_reason"], matched_stop(ch)
        return out

    def done(self) -> list[bytes]:
        out = self.begin() + self._close()
        reason, seq = stop_reason(self.finish or "stop", self.matched, self.req.stop_sequences)
        u = usage_of(self.usage) if self.usage is not None else {"output_tokens": 0}
        out.append(event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": u}))
        out.append(event("message_stop", {}))
        return out

    def ping(self) -> list[bytes]:
        return self.begin() + [PING]

    def error(self, kind: str, message: str) -> list[bytes]:
        return self.begin() + [event("error", {"error": {"type": kind, "message": message}})]
