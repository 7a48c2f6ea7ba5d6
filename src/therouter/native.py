"""The native relay: a deployment that speaks the client's own wire format answers it directly.

When /v1/messages is served by a ``kind: anthropic`` deployment, the client's Messages body went upstream as it came
(:meth:`Provider.native_request` marks that request ``meta["wire"]``); this module sends the answer back the same
way, so everything OpenAI's shape cannot carry reaches the client: text ``citations`` (``citations_delta``),
``redacted_thinking``, ``signature_delta``, server-tool blocks, ``cache_creation`` detail, event types added later.

- A stream (:class:`MessagesRelay`): every upstream event is re-emitted as it came, in order, except two fields of
  ``message_start``: ``message.id`` becomes our generation id and ``message.model`` the model id the client sent.
  Events before the first content block (``message_start``, ``ping``) are held: the first-chunk gate opens at the
  first ``content_block_start`` / ``content_block_delta``, so an ``error`` event or an empty stream before it fails
  the attempt and the next deployment is tried (which may be translated: the client sees one stream either way).
  Usage is read from ``message_start.message.usage`` and ``message_delta.usage`` (input, output, cache reads and
  writes; each event checked by the provider's own stream translator, so the meter sees what the translated path
  would). It is a :class:`~therouter.streaming.Relay`: the gateway's one stream owner
  (:class:`~therouter.streaming.ClientStream`) pumps, finishes and settles it like any stream; a failure after the
  first byte is one Anthropic ``error`` event, never a silent end.
- A JSON answer (:func:`read_message`, :func:`message_answer`): the upstream's message with ``id`` and ``model``
  rewritten, metered from its ``usage``.

The gateway's part is a hook in its stream and JSON paths (``native.relays(req)``); nothing here does I/O itself.
"""

from __future__ import annotations

from typing import Any

import orjson

from therouter.errors import GatewayError
from therouter.protocol.usage import Usage
from therouter.providers import Provider, UpstreamRequest
from therouter.providers.anthropic import finish_reason, openai_usage
from therouter.providers.events import parse_event
from therouter.providers.wire import NativeRequest
from therouter.routing.router import Candidate, Skip, SkipKind
from therouter.streaming import InBandError, UsageTap

# Anthropic's error types a client may be told (an in-band error keeps its type; anything else is an api_error)
ERROR_TYPES = frozenset({"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                         "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"})
_OPENS = frozenset({"content_block_start", "content_block_delta"})  # the first content block: the gate opens


def relays(req: UpstreamRequest | None) -> bool:
    """Whether this upstream request was sent in the client's wire format (its answer is relayed, not translated)."""
    return req is not None and req.meta.get("wire") is not None


def serves(provider: Provider, native: NativeRequest | None) -> bool:
    """Whether this provider takes the client's request in its own wire format."""
    return native is not None and provider.speaks == native.wire


def keep_native(native: NativeRequest | None, cands: list[Candidate], skipped: list[Skip],
                model_id: str) -> list[Candidate]:
    """The candidates that may serve a request holding what only a native deployment can take; the others are
    skipped naming it (a 400 "no deployment supports ..." when none is left anywhere in the plan)."""
    if native is None or not native.native_only:
        return cands
    what = ", ".join(native.native_only)
    kept = []
    for c in cands:
        if serves(c.provider, native):
            kept.append(c)
        else:
            skipped.append(Skip(c.name, f"missing capability: {what} (needs a {native.wire} deployment)", model_id,
                                param=what, kind=SkipKind.UNSUITED, lacking=f"'{what}'"))
    return kept


def event(kind: str, obj: Any) -> bytes:
    """One Anthropic SSE event (``event:`` names its ``type``, as Anthropic's own)."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def error_event(kind: str, message: str) -> bytes:
    return event("error", {"type": "error", "error": {"type": kind, "message": message}})


class MessagesRelay(UsageTap):
    """One native Messages stream: :meth:`rewrite` per upstream event -> the client's bytes (None while the gate
    holds them), with the usage, stop reason and produced text kept for metering (the :class:`UsageTap` interface
    the gateway settles from)."""

    def __init__(self, provider: Provider, *, gen_id: str, model: str) -> None:
        super().__init__(provider)  # its translator checks each event's shape and reads usage and the stop reason
        self.gen_id = gen_id
        self.model = model
        self.opened = False  # a content block started: the first-chunk gate is passed
        self.stopped = False  # message_stop seen: the stream finished
        self.start_usage: dict[str, Any] | None = None  # message_start's usage (the input counts)
        self.in_band_type: str | None = None  # the Anthropic type of an upstream's error event after the gate
        self._held: list[bytes] = []

    def relay_many(self, payloads: list[bytes], out: list[bytes]) -> None:
        """:meth:`relay` of each payload in order, the bytes appended to ``out`` (on an error, what came before it
        is there)."""
        for payload in payloads:
            b = self.relay(payload)
            if b:
                out.append(b)

    def relay(self, payload: bytes) -> bytes | None:
        """One upstream data event as it came -> the client's bytes (see :meth:`rewrite`); an ``error`` event raises
        :class:`InBandError`, its Anthropic type kept for the error event that ends the stream."""
        obj = parse_event(payload)
        err = self.provider.in_band_error(obj)
        if err is not None:
            self.in_band_type = _in_band_type(obj)
            raise InBandError(err)
        return self.rewrite(obj)

    def complete(self, saw_done: bool) -> bool:
        return self.stopped  # Anthropic's streams end with message_stop (there is no [DONE])

    def failure(self, error: GatewayError, provider_name: str) -> bytes:
        return self.error(error, provider_name)

    def closing(self, usage: Usage, cost: Any) -> bytes:
        return b""  # message_delta carried the usage, message_stop ended it: as the upstream sent them

    def rewrite(self, obj: dict[str, Any]) -> bytes | None:
        """One upstream event -> bytes for the client; before the first content block, held (None), then sent
        together with it."""
        out = self._relay(obj)
        if self.opened:
            if self._held:
                out, self._held = b"".join(self._held) + (out or b""), []
            return out
        if out:
            self._held.append(out)
        return None

    def _relay(self, obj: dict[str, Any]) -> bytes | None:
        chunk = self.take(obj)  # shape checked (UpstreamBadResponse); usage kept once message_delta reports it
        if chunk is not None:
            self._account(chunk)
        kind = obj.get("type")
        if not isinstance(kind, str):
            return None  # not an event a client could read
        if kind == "message_start":
            msg = obj["message"]  # an object: checked by the translator
            if isinstance(msg.get("usage"), dict):
                self.start_usage = msg["usage"]
            obj = {**obj, "message": {**msg, "id": self.gen_id, "model": self.model}}
        elif kind == "message_stop":
            self.stopped = True
        elif kind in _OPENS:
            self.opened = True
        return event(kind, obj)

    def _account(self, chunk: dict[str, Any]) -> None:
        for ch in chunk.get("choices") or ():
            d = ch.get("delta") or {}
            for k in ("content", "reasoning_content"):
                if isinstance(d.get(k), str):
                    self.chars += len(d[k])
            for tc in d.get("tool_calls") or ():
                fn = tc.get("function") or {}
                self.chars += len(fn.get("arguments") or "") + len(fn.get("name") or "")
            if ch.get("finish_reason"):
                self.finish_reason = ch["finish_reason"]

    def final_usage(self, prompt_estimate: int) -> Usage:
        """The upstream's usage once ``message_delta`` reported it; a stream that broke before that is billed the
        input counts of ``message_start`` (the upstream's own) and the produced text estimated."""
        if self.usage_raw is not None or self.start_usage is None:
            return super().final_usage(prompt_estimate)
        usage = self.provider.usage(openai_usage(self.start_usage))
        usage.completion_tokens = max(usage.completion_tokens, self.estimate(prompt_estimate).completion_tokens)
        usage.rejected.pop("completion_tokens", None)
        usage.estimated = True
        return usage

    def error(self, error: GatewayError, provider_name: str) -> bytes:
        """The ``error`` event a failure after the first byte ends the stream with: our words (the upstream's are in
        the log and the record); an upstream's in-band error keeps its Anthropic type (e.g. ``overloaded_error``)."""
        kind = self.in_band_type or "api_error"
        return error_event(kind, f"Provider `{provider_name}` failed mid-stream: {error.message}")


def _in_band_type(obj: dict[str, Any]) -> str | None:
    err = obj.get("error")
    kind = err.get("type") if isinstance(err, dict) else None
    return kind if isinstance(kind, str) and kind in ERROR_TYPES else None


# ---- JSON answers ---------------------------------------------------------------------------------------------------


def read_message(provider: Provider, raw: bytes, prompt_estimate: int) -> tuple[dict[str, Any], Usage]:
    """An upstream's non-stream Messages answer (status 200) -> (the message as it came, its usage). The provider's
    own reading checks its shape (UpstreamBadResponse) and gives the usage the translated path would meter."""
    completion = provider.parse_json(raw)  # shape checked; usage read the provider's way
    message: dict[str, Any] = orjson.loads(raw.strip())
    u = completion.get("usage")
    if isinstance(u, dict):
        return message, provider.usage(u)
    msg = (completion.get("choices") or [{}])[0].get("message") or {}
    chars = len(str(msg.get("content") or "")) + len(str(msg.get("reasoning_content") or ""))
    return message, Usage(prompt_tokens=prompt_estimate, completion_tokens=chars // 4 + 1, estimated=True)


def message_answer(message: dict[str, Any], gen_id: str, model: str) -> bytes:
    """The upstream's message for the client: our generation id, the model id the client sent, the rest as it came."""
    return orjson.dumps({**message, "id": gen_id, "model": model})


def message_finish(message: dict[str, Any]) -> str | None:
    """The record's (OpenAI) finish reason of a native answer."""
    content = message.get("content")
    tools = isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)
    return finish_reason(message.get("stop_reason"), tools)


__all__ = ["MessagesRelay", "error_event", "keep_native", "message_answer",
           "message_finish", "read_message", "relays", "serves"]
