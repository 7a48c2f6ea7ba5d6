"""Cheap shape checks of upstream answers: type checks on the fields the gateway reads or forwards, nothing more.

An answer of the wrong shape (``"choices": 5``, a choice or a tool call that is not an object, ``delta`` not an
object, ``tool_calls: 5``, ``usage: "x"``) is the provider's fault: :class:`UpstreamBadResponse` (``fallback_ok``),
which falls back before the first byte reached the client and ends the stream with an error event after it. It is
never a ``TypeError`` somewhere downstream. This runs once per stream chunk, so it is plain ``isinstance`` checks,
no models.
"""

from __future__ import annotations

from typing import Any

from therouter.errors import UpstreamBadResponse

# message / delta fields that are text when present (null allowed)
_TEXT_FIELDS = ("role", "content", "reasoning_content", "reasoning", "refusal")


def bad_shape(what: str) -> UpstreamBadResponse:
    return UpstreamBadResponse("The provider sent a response of the wrong shape.", sent=True, detail=what)


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def check_chunk(obj: dict[str, Any]) -> None:
    """A stream chunk (already known to be an object)."""
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise bad_shape(f"chunk choices is {_kind(choices)}, not a list")
        _check_choices(choices, "a chunk choice", "delta")
    _check_usage(obj.get("usage"), "chunk usage")


def check_completion(obj: dict[str, Any]) -> None:
    """A non-stream answer (already known to be an object with a ``choices`` list)."""
    _check_choices(obj["choices"], "a choice", "message")
    _check_usage(obj.get("usage"), "usage")


def _check_choices(choices: list[Any], label: str, where: str) -> None:
    """Each choice an object; its ``where`` (``delta`` in a chunk, ``message`` in an answer) an object of the right
    shape when present; its ``text`` and ``finish_reason`` strings when present."""
    for ch in choices:
        if not isinstance(ch, dict):
            raise bad_shape(f"{label} is {_kind(ch)}, not an object")
        part = ch.get(where)
        if part is not None:
            if not isinstance(part, dict):
                raise bad_shape(f"{where} is {_kind(part)}, not an object")
            _check_message(part, where, function_required=where == "message")
        for k in ("text", "finish_reason"):
            v = ch.get(k)
            if v is not None and not isinstance(v, str):
                raise bad_shape(f"choice {k} is {_kind(v)}, not a string")


def _check_usage(usage: Any, label: str) -> None:
    if usage is not None and not isinstance(usage, dict):
        raise bad_shape(f"{label} is {_kind(usage)}, not an object")


def _check_message(msg: dict[str, Any], where: str, *, function_required: bool) -> None:
    for k in _TEXT_FIELDS:
        v = msg.get(k)
        if v is not None and not isinstance(v, str):
            raise bad_shape(f"{where}.{k} is {_kind(v)}, not a string")
    calls = msg.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise bad_shape(f"{where}.tool_calls is {_kind(calls)}, not a list")
    for tc in calls:
        if not isinstance(tc, dict):
            raise bad_shape(f"a tool call in {where} is {_kind(tc)}, not an object")
        fn = tc.get("function")
        if fn is None and not function_required:
            continue
        if not isinstance(fn, dict):
            raise bad_shape(f"a tool call's function in {where} is {_kind(fn)}, not an object")
        for k in ("name", "arguments"):
            v = fn.get(k)
            if v is not None and not isinstance(v, str):
                raise bad_shape(f"a tool call's function.{k} in {where} is {_kind(v)}, not a string")
