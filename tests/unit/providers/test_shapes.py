"""Answers of the wrong shape are the provider's fault (UpstreamBadResponse, fallback_ok), never a TypeError."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from therouter.errors import UpstreamBadResponse
from therouter.streaming import ChunkRewriter

from ._helpers import make_provider

GOOD_CHUNK: dict[str, Any] = {
    "id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi", "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        "finish_reason": None, "logprobs": None}],
}


def chunk(**choice: Any) -> dict[str, Any]:
    return {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}


BAD_CHUNKS = {
    "choices_int": {"choices": 5},
    "choices_str": {"choices": "abc"},
    "choices_object": {"choices": {"0": {"delta": {}}}},
    "choice_int": {"choices": [5]},
    "choice_str": {"choices": ["x"]},
    "choice_list": {"choices": [[{"delta": {}}]]},
    "delta_int": chunk(delta=5),
    "delta_str": chunk(delta="hi"),
    "delta_list": chunk(delta=[]),
    "content_int": chunk(delta={"content": 5}),
    "content_object": chunk(delta={"content": {"text": "x"}}),
    "reasoning_int": chunk(delta={"reasoning_content": 1}),
    "tool_calls_int": chunk(delta={"tool_calls": 5}),
    "tool_calls_object": chunk(delta={"tool_calls": {"index": 0}}),
    "tool_call_int": chunk(delta={"tool_calls": [5]}),
    "tool_call_str": chunk(delta={"tool_calls": ["call"]}),
    "function_int": chunk(delta={"tool_calls": [{"index": 0, "function": 5}]}),
    "arguments_int": chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": 5}}]}),
    "name_list": chunk(delta={"tool_calls": [{"index": 0, "function": {"name": ["f"]}}]}),
    "text_int": chunk(text=5),
    "finish_reason_int": chunk(delta={}, finish_reason=1),
    "usage_int": {"choices": [], "usage": 5},
    "usage_list": {"choices": [], "usage": [1, 2]},
}


@pytest.mark.parametrize("kind", ["deepseek", "vllm", "sglang"])
@pytest.mark.parametrize("name", list(BAD_CHUNKS))
def test_wrong_shaped_chunk_is_a_provider_fault(kind: str, name: str) -> None:
    with pytest.raises(UpstreamBadResponse) as ei:
        make_provider(kind).normalize_chunk(orjson.loads(orjson.dumps(BAD_CHUNKS[name])))
    assert ei.value.code == "bad_upstream_response"
    assert ei.value.fallback_ok is True and ei.value.sent is True
    assert ei.value.detail  # what was wrong, for the log and the attempt record
    assert ei.value.message == "The provider sent a response of the wrong shape."


@pytest.mark.parametrize("name", list(BAD_CHUNKS))
def test_the_rewriter_raises_the_fault_not_a_type_error(name: str) -> None:
    rw = ChunkRewriter(make_provider("deepseek"), gen_id="g", model="m", created=1, object_="chat.completion.chunk",
                       include_usage=True)
    with pytest.raises(UpstreamBadResponse):
        rw.rewrite(orjson.loads(orjson.dumps(BAD_CHUNKS[name])))


@pytest.mark.parametrize("good", [
    GOOD_CHUNK,
    {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
    {"choices": None, "usage": None},
    chunk(delta={"content": None, "reasoning_content": "r"}, finish_reason=None),
    chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}),
    chunk(delta={"tool_calls": [{"index": 0}]}),  # a fragment without function
    chunk(delta={"tool_calls": None}),
    chunk(text="def f():", finish_reason="length"),  # /v1/completions
    chunk(delta={}, finish_reason="stop", matched_stop=None, stop_reason=None),
])
def test_good_chunks_pass(good: dict[str, Any]) -> None:
    for kind in ("deepseek", "vllm", "sglang"):
        make_provider(kind).normalize_chunk(orjson.loads(orjson.dumps(good)))


def body(**choice: Any) -> bytes:
    return orjson.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop", **choice}]})


BAD_BODIES = {
    "choice_int": orjson.dumps({"choices": [5]}),
    "choice_str": orjson.dumps({"choices": ["x"]}),
    "message_int": body(message=5),
    "message_str": body(message="hello"),
    "content_int": body(message={"role": "assistant", "content": 5}),
    "content_list": body(message={"role": "assistant", "content": ["a"]}),
    "tool_calls_int": body(message={"role": "assistant", "content": None, "tool_calls": 5}),
    "tool_call_str": body(message={"role": "assistant", "content": None, "tool_calls": ["x"]}),
    "function_missing": body(message={"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}),
    "function_str": body(message={"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": "f"}]}),
    "arguments_object": body(message={"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]}),
    "usage_int": orjson.dumps({"choices": [{"message": {"content": "x"}}], "usage": 5}),
    "usage_str": orjson.dumps({"choices": [{"message": {"content": "x"}}], "usage": "lots"}),
    "text_int": body(text=5),
    "choices_int": orjson.dumps({"choices": 5}),
    "body_list": orjson.dumps([{"choices": []}]),
    "body_int": b"5",
}


@pytest.mark.parametrize("kind", ["deepseek", "vllm", "sglang"])
@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_wrong_shaped_body_is_a_provider_fault(kind: str, name: str) -> None:
    with pytest.raises(UpstreamBadResponse) as ei:
        make_provider(kind).parse_json(BAD_BODIES[name])
    assert ei.value.fallback_ok is True and ei.value.detail


@pytest.mark.parametrize("good", [
    body(message={"role": "assistant", "content": "hi"}),
    body(message={"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
    body(message={"role": "assistant", "content": "x", "tool_calls": None, "reasoning": None}),
    body(text="completion text"),
    orjson.dumps({"choices": [{"message": {"content": "x"}}], "usage": None}),
    orjson.dumps({"choices": []}),
])
def test_good_bodies_pass(good: bytes) -> None:
    for kind in ("deepseek", "vllm", "sglang"):
        assert isinstance(make_provider(kind).parse_json(good), dict)
