"""The Assembler: one non-stream answer from an upstream stream, equal to the upstream's own non-stream answer.

The fake upstream renders one generation plan both ways (its SSE events and its JSON body, per flavour), so the
assembled answer can be compared with the non-stream one exactly, tool-call ids included.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.unit.providers._helpers import make_provider
from therouter.assembly import Assembler
from therouter.errors import UpstreamBadResponse
from therouter.fakeupstream.config import KNOB_DEFAULTS
from therouter.fakeupstream.content import build_plan
from therouter.fakeupstream.flavors import get_flavor
from therouter.fakeupstream.render import choices_of, response_body, stream_events

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
HELLO = [{"role": "user", "content": "hello there"}]
CASES = {
    "text": ({"messages": HELLO}, {}, 0),
    "reasoning": ({"messages": HELLO}, {}, 4),
    "tools": ({"messages": HELLO, "tools": TOOLS}, {"parallel_tools": 2}, 0),
    "reasoning_tools": ({"messages": HELLO, "tools": TOOLS}, {}, 3),
    "json": ({"messages": HELLO, "response_format": {"type": "json_object"}}, {}, 0),
    "length": ({"messages": HELLO, "max_tokens": 5}, {}, 2),
    "cached_multi_token_chunks": ({"messages": HELLO}, {"cached_tokens": 2, "tokens_per_chunk": 3}, 0),
    "completion": ({"prompt": "def fib(n):"}, {}, 0),
    "n2": ({"messages": HELLO, "n": 2}, {}, 2),
    "n3_tools": ({"messages": HELLO, "tools": TOOLS, "n": 3}, {"parallel_tools": 2}, 0),
    "completion_n2": ({"prompt": "def fib(n):", "n": 2}, {}, 0),
}


def assembler(kind: str, chat: bool = True, max_bytes: int = 1 << 20) -> Assembler:
    return Assembler(make_provider(kind), chat=chat, max_bytes=max_bytes)


def both_ways(kind: str, case: str) -> tuple[Assembler, dict[str, Any], dict[str, Any]]:
    """(assembler fed the upstream's stream, the assembled answer, the upstream's own non-stream answer) for one
    generation, both normalised by the provider as the gateway does."""
    body, knobs, reasoning = CASES[case]
    chat = "messages" in body
    flavor = get_flavor(kind)
    request = {"model": "m", **body, "stream": True, "stream_options": {"include_usage": True}}
    plan = build_plan(request, {**KNOB_DEFAULTS, **knobs}, chat=chat, reasoning_chunks=reasoning, empty_json=False,
                      new_tool_id=flavor.tool_id)
    events = stream_events(flavor, plan, chat=chat, rid="up-1", created=1, model="m",
                           include_usage=flavor.include_usage(request), send_usage=True, n=choices_of(request))
    asm = assembler(kind, chat)
    for data, _, _ in events:
        asm.feed(orjson.loads(data[len(b"data: "):]))
    got = asm.provider.normalize_completion(asm.result(gen_id="gen-1", created=7, model="public"))
    raw = response_body(flavor, plan, chat=chat, rid="gen-1", created=7, model="public", send_usage=True,
                        n=choices_of(request))
    want = asm.provider.parse_json(orjson.dumps(raw))
    return asm, got, want


@pytest.mark.parametrize("kind", ["deepseek", "vllm", "sglang"])
@pytest.mark.parametrize("case", list(CASES))
def test_assembled_answer_equals_the_upstreams_non_stream_answer(kind: str, case: str) -> None:
    asm, got, want = both_ways(kind, case)
    assert got == want  # usage included: the stream's usage is the non-stream answer's, in the upstream's spelling
    assert asm.usage_raw is not None
    assert asm.provider.usage(asm.usage_raw) == asm.provider.usage(want["usage"])
    assert asm.finish_reason == want["choices"][0]["finish_reason"]
    assert [c["index"] for c in got["choices"]] == list(range(body_n(case)))


def body_n(case: str) -> int:
    return int(CASES[case][0].get("n", 1))


def test_tool_call_arguments_are_joined_per_index_in_index_order() -> None:
    _, got, _ = both_ways("vllm", "tools")
    calls = got["choices"][0]["message"]["tool_calls"]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "London"}]
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in calls)
    assert got["choices"][0]["message"]["content"] is None


def chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": list(choices), **top}


def test_several_choices_each_by_its_index() -> None:
    """n > 1: choices arrive interleaved (and out of order); each is assembled under its own index."""
    asm = assembler("vllm")
    for c in (
        chunk({"index": 1, "delta": {"role": "assistant", "content": ""}}),
        chunk({"index": 0, "delta": {"role": "assistant", "content": ""}}),
        chunk({"index": 0, "delta": {"content": "Hel"}}),
        chunk({"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                      "function": {"name": "f", "arguments": ""}}]}}),
        chunk({"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}),
        chunk({"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
               "finish_reason": "tool_calls"}),
        chunk(usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}),
    ):
        asm.feed(c)
    got = asm.provider.normalize_completion(asm.result(gen_id="g", created=1, model="m"))
    first, second = got["choices"]
    assert (first["index"], first["message"]["content"], first["finish_reason"]) == (0, "Hello", "stop")
    assert second["index"] == 1 and second["finish_reason"] == "tool_calls"
    assert second["message"]["content"] is None
    assert second["message"]["tool_calls"] == [{"id": "c1", "type": "function",
                                                "function": {"name": "f", "arguments": "{}"}}]
    assert asm.usage_raw == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_parallel_tool_call_fragments_in_any_order_are_sorted_by_index() -> None:
    asm = assembler("deepseek")
    asm.feed(chunk({"index": 0, "delta": {"role": "assistant", "content": None}}))
    asm.feed(chunk({"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{\"y\""}},
        {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\""}}]}}))
    asm.feed(chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}},
                                                          {"index": 1, "function": {"arguments": ": 2}"}}]}}))
    asm.feed(chunk({"index": 0, "delta": {"content": ""}, "finish_reason": "tool_calls"}))
    msg = asm.result(gen_id="g", created=1, model="m")["choices"][0]["message"]
    assert [(t["id"], t["function"]["name"], t["function"]["arguments"]) for t in msg["tool_calls"]] == [
        ("a", "f", "{\"x\": 1}"), ("b", "g", "{\"y\": 2}")]


def test_chat_logprobs_content_tokens_are_concatenated() -> None:
    asm = assembler("vllm")
    t = [{"token": w, "logprob": -0.5, "bytes": None, "top_logprobs": []} for w in ("He", "llo", "!")]
    asm.feed(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}))
    asm.feed(chunk({"index": 0, "delta": {"content": "He"}, "logprobs": {"content": t[:1], "refusal": None}}))
    asm.feed(chunk({"index": 0, "delta": {"content": "llo!"}, "logprobs": {"content": t[1:], "refusal": None}},
                   ))
    asm.feed(chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}))
    choice = asm.result(gen_id="g", created=1, model="m")["choices"][0]
    assert choice["logprobs"] == {"content": t, "refusal": None}
    assert choice["message"]["content"] == "Hello!"


def test_text_completion_logprobs_lists_are_concatenated() -> None:
    asm = assembler("vllm", chat=False)
    asm.feed({"id": "u", "object": "text_completion", "choices": [{"index": 0, "text": "a", "logprobs": {
        "tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1}], "text_offset": [0]}}]})
    asm.feed({"id": "u", "object": "text_completion", "choices": [{"index": 0, "text": "b", "finish_reason": "length",
                                                                  "logprobs": {"tokens": ["b"],
                                                                               "token_logprobs": [-0.2],
                                                                               "top_logprobs": [{"b": -0.2}],
                                                                               "text_offset": [1]}}]})
    got = asm.result(gen_id="cmpl-1", created=1, model="m")
    assert got["object"] == "text_completion"
    assert got["choices"] == [{"index": 0, "text": "ab", "finish_reason": "length", "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"a": -0.1}, {"b": -0.2}],
        "text_offset": [0, 1]}}]


def test_top_level_fields_keep_their_last_non_null_value() -> None:
    asm = assembler("deepseek")
    asm.feed(chunk({"index": 0, "delta": {"content": "a"}}, system_fingerprint=None, service_tier="default"))
    asm.feed(chunk({"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}, system_fingerprint="fp_1"))
    got = asm.result(gen_id="g", created=1, model="m")
    assert (got["system_fingerprint"], got["service_tier"]) == ("fp_1", "default")
    assert (got["id"], got["object"], got["model"], got["created"]) == ("g", "chat.completion", "m", 1)


def test_feed_says_whether_the_chunk_carried_generation_and_counts_what_was_produced() -> None:
    asm = assembler("deepseek")
    assert asm.feed({"id": "u", "choices": [], "usage": None}) is False  # nothing yet: the gate stays shut
    assert asm.feed(chunk({"index": 0, "delta": {"role": "assistant", "reasoning_content": "thinking"}})) is True
    asm.feed(chunk({"index": 0, "delta": {"content": "four words of text"}}))
    assert asm.chars == len("thinking") + len("four words of text")
    est = asm.final_usage(prompt_estimate=10)  # no usage reported (a client that left): the produced text counts
    assert est.estimated and est.prompt_tokens == 10 and est.completion_tokens == (asm.chars + 3) // 4


def test_an_answer_larger_than_the_body_limit_is_a_provider_fault() -> None:
    asm = assembler("deepseek", max_bytes=64)
    asm.feed(chunk({"index": 0, "delta": {"content": "x" * 60}}))
    with pytest.raises(UpstreamBadResponse) as e:
        asm.feed(chunk({"index": 0, "delta": {"content": "x" * 10}}))
    assert e.value.code == "upstream_response_too_large" and e.value.fallback_ok


@pytest.mark.parametrize("bad", [
    chunk({"index": "0", "delta": {"content": "a"}}),
    chunk({"index": -1, "delta": {"content": "a"}}),
    chunk({"index": True, "delta": {"content": "a"}}),
    chunk({"index": 0, "delta": {"tool_calls": [{"index": "x", "function": {"arguments": "{}"}}]}}),
    chunk({"index": 0, "delta": {"content": 5}}),  # the provider's own shape checks run first
])
def test_wrong_shapes_are_provider_faults(bad: dict[str, Any]) -> None:
    with pytest.raises(UpstreamBadResponse):
        assembler("deepseek").feed(bad)
