"""Anthropic Messages answers -> OpenAI's shapes (pure).

- A message's content blocks: ``text`` joined into ``message.content``; ``thinking`` joined into
  ``reasoning_content``, and each thinking block (text + signature) or ``redacted_thinking`` block (data) kept in
  ``reasoning_details`` (OpenRouter's field: ``reasoning.text`` / ``reasoning.encrypted``, format
  ``anthropic-claude-v1``), which a client sends back on the assistant turn to continue a tool conversation;
  ``tool_use`` -> ``tool_calls`` (``input`` as JSON text); the forced :data:`JSON_TOOL`'s input -> the JSON text of
  ``message.content`` (and its ``tool_use`` stop is a ``stop``).
- Stop reasons: ``end_turn`` / ``stop_sequence`` / ``pause_turn`` -> ``stop``, ``max_tokens`` /
  ``model_context_window_exceeded`` -> ``length``, ``tool_use`` -> ``tool_calls``, ``refusal`` -> ``content_filter``.
- Usage: ``prompt_tokens`` = ``input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens`` (all
  input), ``prompt_tokens_details.cached_tokens`` = cache reads, ``prompt_tokens_details.cache_write_tokens`` = cache
  writes, ``completion_tokens`` = ``output_tokens``. A count Anthropic got wrong is passed on as it came, so the meter
  sees it and puts its estimate in its place.
- Streams (:class:`AnthropicStream`, one per stream): ``message_start`` (usage), ``content_block_start`` / ``delta`` /
  ``stop`` (text, ``thinking_delta`` and ``signature_delta``, ``input_json_delta`` -> tool-call argument fragments,
  or content fragments for the JSON tool), ``message_delta`` (stop reason, cumulative usage), ``message_stop``,
  ``ping``. Events that carry nothing for the client (start, ping, signature, stop) become no chunk, so the gateway's
  first-chunk gate holds until real generation and an ``error`` event before it still falls back. Unknown event and
  block types are skipped (Anthropic adds them over time); a known event of the wrong shape is the provider's fault.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from therouter.errors import UpstreamBadResponse
from therouter.providers._anthropic_request import JSON_TOOL, REASONING_FORMAT
from therouter.providers.shapes import bad_shape

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}


def finish_reason(stop_reason: Any, client_tools: bool) -> str | None:
    if stop_reason is None:
        return None
    reason = STOP_REASONS.get(str(stop_reason), "stop")
    return "stop" if reason == "tool_calls" and not client_tools else reason  # only the JSON tool was used


def openai_usage(u: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage -> OpenAI's shape (see the module docstring; ``total_tokens`` is the gateway's to add)."""
    inp, read, write = u.get("input_tokens"), u.get("cache_read_input_tokens"), u.get("cache_creation_input_tokens")
    prompt: Any = inp  # a count Anthropic got wrong goes on as it came: the meter names it and estimates
    if isinstance(inp, int) and _whole(inp):
        prompt = inp + sum(v for v in (read, write) if isinstance(v, int) and _whole(v))
    details: dict[str, Any] = {"cached_tokens": 0 if read is None else read}
    if write:
        details["cache_write_tokens"] = write
    return {"prompt_tokens": prompt, "completion_tokens": u.get("output_tokens"), "prompt_tokens_details": details}


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def reasoning_entry(index: int, *, text: str | None = None, signature: str | None = None,
                    data: str | None = None) -> dict[str, Any]:
    if data is not None:
        return {"type": "reasoning.encrypted", "data": data, "format": REASONING_FORMAT, "index": index}
    return {"type": "reasoning.text", "text": text or "", "signature": signature, "format": REASONING_FORMAT,
            "index": index}


# ---- non-stream -----------------------------------------------------------------------------------------------------


def to_completion(obj: Any) -> dict[str, Any]:
    """An Anthropic message -> an OpenAI chat.completion (UpstreamBadResponse for the wrong shape)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("content"), list):
        raise UpstreamBadResponse("The provider sent an answer without content.", sent=True,
                                  detail=f"body is {type(obj).__name__} without a content list")
    text: list[str] = []
    reasoning: list[str] = []
    details: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    json_text: str | None = None
    for b in obj["content"]:
        kind = b.get("type") if isinstance(b, dict) else None
        if not isinstance(kind, str):
            raise bad_shape("a content block is not an object with a type")
        if kind == "text":
            text.append(_str(b, "text"))
        elif kind == "thinking":
            reasoning.append(_str(b, "thinking"))
            details.append(reasoning_entry(len(details), text=reasoning[-1], signature=_str(b, "signature")))
        elif kind == "redacted_thinking":
            details.append(reasoning_entry(len(details), data=_str(b, "data")))
        elif kind == "tool_use":
            args = b.get("input")
            if not isinstance(args, dict) or not isinstance(b.get("name"), str) or not isinstance(b.get("id"), str):
                raise bad_shape("a tool_use block without id, name or an object input")
            if b["name"] == JSON_TOOL:
                json_text = orjson.dumps(args).decode()
            else:
                calls.append({"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": orjson.dumps(args).decode()}})
    msg: dict[str, Any] = {"role": "assistant",
                           "content": json_text if json_text is not None else ("".join(text) or
                                                                               (None if calls else "")),
                           "refusal": None}
    if reasoning or details:
        msg["reasoning_content"] = "".join(reasoning) or None
        msg["reasoning_details"] = details
    if calls:
        msg["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": str(obj.get("id") or ""), "object": "chat.completion", "created": int(time.time()),
        "model": str(obj.get("model") or ""),
        "choices": [{"index": 0, "message": msg, "finish_reason": finish_reason(obj.get("stop_reason"), bool(calls))
                     or "stop", "logprobs": None}],
    }
    _matched(obj, out["choices"][0])
    u = obj.get("usage")
    if u is not None:
        if not isinstance(u, dict):
            raise bad_shape(f"usage is {type(u).__name__}, not an object")
        out["usage"] = openai_usage(u)
    return out


def _matched(src: dict[str, Any], choice: dict[str, Any]) -> None:
    """The stop sequence that ended the answer, as vLLM names it (``choices[].stop_reason``): /v1/messages answers
    ``stop_reason: stop_sequence`` with it."""
    if src.get("stop_reason") == "stop_sequence" and isinstance(src.get("stop_sequence"), str):
        choice["stop_reason"] = src["stop_sequence"]


def _str(b: dict[str, Any], key: str) -> str:
    v = b.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise bad_shape(f"a {b.get('type')} block's {key} is {type(v).__name__}, not a string")
    return v


# ---- streams --------------------------------------------------------------------------------------------------------


class _Block:
    __slots__ = ("data", "kind", "signature", "text", "tool_index")

    def __init__(self, kind: str, tool_index: int = -1) -> None:
        self.kind = kind  # text | thinking | redacted | tool | json | other
        self.tool_index = tool_index
        self.text: list[str] = []
        self.signature = ""
        self.data = ""


class AnthropicStream:
    """One stream's translator: each Anthropic event -> an OpenAI chunk, or None (see the module docstring)."""

    def __init__(self) -> None:
        self.blocks: dict[int, _Block] = {}
        self.tools = 0  # client tool calls so far (their OpenAI index)
        self.reasoning_blocks = 0
        self.usage: dict[str, Any] = {}
        self.stopped = False  # message_stop seen
        self._role = False  # the first chunk says role: assistant, as OpenAI's do

    def __call__(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        kind = ev.get("type")
        if kind == "content_block_delta":
            return self._delta(ev)
        if kind == "content_block_start":
            return self._start(ev)
        if kind == "content_block_stop":
            return self._stop(ev)
        if kind == "message_start":
            msg = ev.get("message")
            if not isinstance(msg, dict):
                raise bad_shape("message_start without a message object")
            self._usage(msg.get("usage"))
            return None
        if kind == "message_delta":
            delta = ev.get("delta")
            if not isinstance(delta, dict):
                raise bad_shape("message_delta without a delta object")
            self._usage(ev.get("usage"))
            out = self._chunk({}, finish_reason(delta.get("stop_reason"), self.tools > 0))
            _matched(delta, out["choices"][0])
            if self.usage:
                out["usage"] = openai_usage(self.usage)
            return out
        if kind == "message_stop":
            self.stopped = True
        return None  # ping, message_stop, and event types added after this was written

    def _usage(self, u: Any) -> None:
        if u is None:
            return
        if not isinstance(u, dict):
            raise bad_shape(f"stream usage is {type(u).__name__}, not an object")
        self.usage.update({k: v for k, v in u.items() if v is not None})  # cumulative: the latest count wins

    def _index(self, ev: dict[str, Any]) -> int:
        i = ev.get("index")
        if not isinstance(i, int) or isinstance(i, bool):
            raise bad_shape(f"{ev.get('type')} without an integer index")
        return i

    def _start(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        i, b = self._index(ev), ev.get("content_block")
        if not isinstance(b, dict):
            raise bad_shape("content_block_start without a content_block object")
        kind = b.get("type")
        if kind == "text":
            self.blocks[i] = _Block("text")
            return self._chunk({"content": b["text"]}) if isinstance(b.get("text"), str) and b["text"] else None
        if kind == "thinking":
            self.blocks[i] = blk = _Block("thinking")
            first = _str(b, "thinking")
            blk.text.append(first)
            return self._chunk({"reasoning_content": first}) if first else None
        if kind == "redacted_thinking":
            self.blocks[i] = blk = _Block("redacted")
            blk.data = _str(b, "data")
            return None
        if kind == "tool_use":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("id"), str):
                raise bad_shape("a tool_use block without id or name")
            if b["name"] == JSON_TOOL:
                self.blocks[i] = _Block("json")
                return None
            self.blocks[i] = _Block("tool", self.tools)
            self.tools += 1
            call = {"index": self.tools - 1, "id": b["id"], "type": "function",
                    "function": {"name": b["name"], "arguments": ""}}
            return self._chunk({"tool_calls": [call]})
        self.blocks[i] = _Block("other")
        return None

    def _delta(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        i, d = self._index(ev), ev.get("delta")
        if not isinstance(d, dict):
            raise bad_shape("content_block_delta without a delta object")
        blk = self.blocks.get(i)
        if blk is None:
            raise bad_shape(f"content_block_delta for block {i}, which never started")
        kind = d.get("type")
        if kind == "text_delta":
            text = _str(d, "text")
            return self._chunk({"content": text}) if text else None
        if kind == "thinking_delta":
            text = _str(d, "thinking")
            blk.text.append(text)
            return self._chunk({"reasoning_content": text}) if text else None
        if kind == "signature_delta":
            blk.signature += _str(d, "signature")
            return None
        if kind == "input_json_delta":
            frag = _str(d, "partial_json")
            if not frag:
                return None
            if blk.kind == "json":
                return self._chunk({"content": frag})
            if blk.kind == "tool":
                return self._chunk({"tool_calls": [{"index": blk.tool_index, "function": {"arguments": frag}}]})
        return None  # citations and delta types added later

    def _stop(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        blk = self.blocks.get(self._index(ev))
        if blk is None or blk.kind not in ("thinking", "redacted"):
            return None
        n = self.reasoning_blocks
        self.reasoning_blocks += 1
        entry = (reasoning_entry(n, data=blk.data) if blk.kind == "redacted"
                 else reasoning_entry(n, text="".join(blk.text), signature=blk.signature))
        return self._chunk({"reasoning_details": [entry]})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if not self._role:
            self._role = True
            delta = {"role": "assistant", **delta}
        return {"id": "", "object": "chat.completion.chunk", "created": 0, "model": "",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
