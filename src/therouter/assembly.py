"""One non-stream answer assembled from an upstream stream (providers whose ``non_stream`` mode is ``stream``).

A client's non-stream request goes upstream as a stream with usage, so the first-token and idle timeouts and the
first-chunk gate bound it like any stream, and a client that leaves is billed what was produced. :class:`Assembler`
takes each chunk as it comes (after the provider's own shape checks and spellings) and keeps only what the answer
needs: per choice (by its ``index``) the text pieces, reasoning, refusal, tool calls by their ``index`` (id, type,
name, argument fragments), ``finish_reason`` and logprobs (every list under ``logprobs`` concatenated, so
``content`` token lists and legacy ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` alike); at
the top level ``system_fingerprint`` and any other field the chunks carry; the last usage reported. Nothing is joined
or serialised until :meth:`result`, and nothing per chunk goes through a model.

:meth:`result` builds what the upstream's own non-stream answer holds (``chat.completion`` with ``message``, or
``text_completion`` with ``text``); the provider's ``normalize_completion`` then applies the same normalisation as to
a passthrough answer, so both modes give a client the same answer for the same generation.

What is held is bounded like a non-stream body (``server.max_upstream_body_bytes``): an upstream that streams more
is a provider fault, never unbounded memory.
"""

from __future__ import annotations

from typing import Any

from therouter.errors import UpstreamBadResponse
from therouter.providers.base import Provider
from therouter.providers.shapes import bad_shape
from therouter.streaming import UsageTap

_TOP_SKIP = frozenset({"id", "object", "created", "model", "choices", "usage", "provider"})
_CHOICE_SKIP = frozenset({"index", "delta", "text", "logprobs", "finish_reason"})
_DELTA_TEXT = ("content", "reasoning_content", "refusal")
LOGPROB_ENTRY_BYTES = 64  # what one logprob entry is counted as toward the held-bytes bound


class _Choice:
    __slots__ = ("delta_extra", "extra", "finish_reason", "index", "logprobs", "role", "text", "tools")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.text: dict[str, list[str]] = {}  # content / reasoning_content / refusal (chat) or text: pieces
        self.tools: dict[int, _ToolCall] = {}
        self.finish_reason: str | None = None
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}  # other choice fields (vLLM's stop_reason, SGLang's matched_stop): last value
        self.delta_extra: dict[str, Any] = {}  # other delta fields: last non-null value


class _ToolCall:
    __slots__ = ("args", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.args: list[str] = []


class Assembler(UsageTap):
    """Per-request state of one assembled answer; :meth:`feed` per upstream chunk, :meth:`result` once at the end."""

    def __init__(self, provider: Provider, *, chat: bool, max_bytes: int) -> None:
        super().__init__(provider)
        self.chat = chat
        self.max_bytes = max_bytes
        self._choices: dict[int, _Choice] = {}
        self._top: dict[str, Any] = {}
        self._held = 0  # text characters and logprob entries held (bounded by max_bytes)

    def feed(self, obj: dict[str, Any]) -> bool:
        """Take one upstream chunk; True when it carried choices (the first-chunk gate's test)."""
        chunk = self.take(obj)
        if chunk is None:
            return False
        obj = chunk
        for k, v in obj.items():
            if k not in _TOP_SKIP and (v is not None or k not in self._top):
                self._top[k] = v
        choices = obj.get("choices")
        if not choices:
            return False
        for ch in choices:
            self._take(ch)
        if self._held > self.max_bytes:
            raise UpstreamBadResponse("The provider sent a response larger than the gateway accepts.", sent=True,
                                      code="upstream_response_too_large",
                                      detail=f"assembled answer is over the {self.max_bytes}-byte limit")
        return True

    def _take(self, ch: dict[str, Any]) -> None:
        idx = ch.get("index", 0)
        if type(idx) is not int or idx < 0:
            raise bad_shape(f"a chunk choice index is {idx!r}, not a non-negative integer")
        c = self._choices.get(idx)
        if c is None:
            c = self._choices[idx] = _Choice(idx)
        delta = ch.get("delta")
        if isinstance(delta, dict):
            self._delta(c, delta)
        text = ch.get("text")
        if isinstance(text, str):
            c.text.setdefault("text", []).append(text)
            self.chars += len(text)
            self._held += len(text)
        lp = ch.get("logprobs")
        if isinstance(lp, dict):
            self._logprobs(c, lp)
        fr = ch.get("finish_reason")
        if fr is not None:
            c.finish_reason = self.finish_reason = fr
        for k, v in ch.items():
            if k not in _CHOICE_SKIP:
                c.extra[k] = v

    def _delta(self, c: _Choice, delta: dict[str, Any]) -> None:
        for k, v in delta.items():
            if k in _DELTA_TEXT:
                if isinstance(v, str):
                    c.text.setdefault(k, []).append(v)
                    self._held += len(v)
                    if k != "refusal":
                        self.chars += len(v)
            elif k == "tool_calls":
                for tc in v or ():
                    self._tool_call(c, tc)
            elif k == "role":
                if v is not None:
                    c.role = v
            elif v is not None:
                c.delta_extra[k] = v

    def _tool_call(self, c: _Choice, tc: dict[str, Any]) -> None:
        i = tc.get("index")
        if i is None:  # tolerated: a fragment without index continues the last call, or opens one with a new id
            last = max(c.tools) if c.tools else None
            i = (last + 1 if last is not None else 0) if tc.get("id") or last is None else last
        elif type(i) is not int or i < 0:
            raise bad_shape(f"a tool call index is {i!r}, not a non-negative integer")
        call = c.tools.get(i)
        if call is None:
            call = c.tools[i] = _ToolCall()
        if tc.get("id"):
            call.id = tc["id"]
        if tc.get("type"):
            call.type = tc["type"]
        fn = tc.get("function")
        if isinstance(fn, dict):
            name, args = fn.get("name"), fn.get("arguments")
            if name:
                call.name = name
                self.chars += len(name)
            if args:
                call.args.append(args)
                self.chars += len(args)
                self._held += len(args)

    def _logprobs(self, c: _Choice, lp: dict[str, Any]) -> None:
        acc = c.logprobs if c.logprobs is not None else {}
        c.logprobs = acc
        for k, v in lp.items():
            if isinstance(v, list):
                have = acc.get(k)
                if isinstance(have, list):
                    have.extend(v)
                else:
                    acc[k] = list(v)
                self._held += LOGPROB_ENTRY_BYTES * len(v)
            elif v is not None or k not in acc:
                acc[k] = v

    # ---- the answer ---------------------------------------------------------------------------------------------

    def result(self, *, gen_id: str, created: int, model: str) -> dict[str, Any]:
        """The assembled answer as the upstream's own non-stream body would hold it (before normalisation)."""
        choices = [self._choice(self._choices[i]) for i in sorted(self._choices)]
        obj: dict[str, Any] = {"id": gen_id, "object": "chat.completion" if self.chat else "text_completion",
                               "created": created, "model": model, "choices": choices}
        for k, v in self._top.items():
            obj.setdefault(k, v)
        if self.usage_raw is not None:
            obj["usage"] = self.usage_raw
        return obj

    def _choice(self, c: _Choice) -> dict[str, Any]:
        out: dict[str, Any] = {"index": c.index}
        if self.chat:
            msg: dict[str, Any] = {"role": c.role or "assistant"}
            content = c.text.get("content")
            msg["content"] = "".join(content) if content is not None else None
            for k in ("reasoning_content", "refusal"):
                if k in c.text:
                    msg[k] = "".join(c.text[k])
            if c.tools:
                msg["tool_calls"] = [_tool_json(c.tools[i]) for i in sorted(c.tools)]
            for k, v in c.delta_extra.items():
                msg.setdefault(k, v)
            out["message"] = msg
        else:
            out["text"] = "".join(c.text.get("text", ()))
        out["logprobs"] = c.logprobs
        out["finish_reason"] = c.finish_reason
        for k, v in c.extra.items():
            out.setdefault(k, v)
        return out


def _tool_json(t: _ToolCall) -> dict[str, Any]:
    return {"id": t.id or "", "type": t.type or "function",
            "function": {"name": t.name or "", "arguments": "".join(t.args)}}
