"""What adapters make of upstream answers: JSON bodies, stream chunks, usage (wire-formats.md §2.4, §2.5, §3.3, §3.4, §4.3)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from therouter.errors import UpstreamBadResponse
from therouter.metering.bounds import bound_usage
from therouter.protocol.usage import Usage

from ._helpers import make_provider


def completion(message: dict, **kw: object) -> bytes:
    obj = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}]}
    obj.update(kw)
    return orjson.dumps(obj)


# ---- parse_json -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [b"\n", b"\n\n\n\n", b"\r\n\r\n", b"  \n \n"])
def test_parse_json_tolerates_leading_blank_lines(prefix: bytes) -> None:
    """DeepSeek sends empty lines while a non-stream request waits in its queue."""
    obj = make_provider("deepseek").parse_json(prefix + completion({"role": "assistant", "content": "Paris"}) + b"\n")
    assert obj["choices"][0]["message"]["content"] == "Paris"


@pytest.mark.parametrize("raw", [b"", b"\n\n", b"<html>502 Bad Gateway</html>", b"{\"choices\": ", b"[1, 2]",
                                 b"{\"object\": \"chat.completion\"}", b"{\"choices\": {}}"])
def test_parse_json_rejects_non_answers(raw: bytes) -> None:
    with pytest.raises(UpstreamBadResponse) as ei:
        make_provider("deepseek").parse_json(raw)
    assert ei.value.fallback_ok is True  # a broken provider answer: another deployment may do better


def test_parse_json_keeps_unknown_fields() -> None:
    raw = completion({"role": "assistant", "content": "x", "refusal": None}, system_fingerprint="fp", stop_reason=None)
    obj = make_provider("vllm").parse_json(raw)
    assert obj["system_fingerprint"] == "fp" and "stop_reason" in obj
    assert obj["choices"][0]["message"]["refusal"] is None


def test_vllm_reasoning_becomes_reasoning_content_in_message() -> None:
    obj = make_provider("vllm").parse_json(completion({"role": "assistant", "content": "4", "reasoning": "2+2"}))
    msg = obj["choices"][0]["message"]
    assert msg["reasoning_content"] == "2+2"
    assert "reasoning" not in msg
    assert msg["content"] == "4"


def test_vllm_reasoning_becomes_reasoning_content_in_delta() -> None:
    p = make_provider("vllm")
    chunk = {"choices": [{"index": 0, "delta": {"reasoning": "hmm"}, "finish_reason": None},
                         {"index": 1, "delta": {"content": "x"}, "finish_reason": None}]}
    p.normalize_chunk(chunk)
    assert chunk["choices"][0]["delta"] == {"reasoning_content": "hmm"}
    assert chunk["choices"][1]["delta"] == {"content": "x"}


def test_vllm_transitional_both_keys_keep_reasoning_content() -> None:
    p = make_provider("vllm")
    chunk = {"choices": [{"index": 0, "delta": {"reasoning": "a", "reasoning_content": "a"}}]}
    p.normalize_chunk(chunk)
    assert chunk["choices"][0]["delta"] == {"reasoning_content": "a"}


@pytest.mark.parametrize("kind", ["deepseek", "sglang"])
def test_reasoning_content_providers_are_left_alone(kind: str) -> None:
    p = make_provider(kind)
    obj = p.parse_json(completion({"role": "assistant", "content": "4", "reasoning_content": "2+2"}))
    assert obj["choices"][0]["message"]["reasoning_content"] == "2+2"
    chunk = {"choices": [{"index": 0, "delta": {"reasoning_content": "", "content": None}}]}
    p.normalize_chunk(chunk)
    assert chunk["choices"][0]["delta"] == {"reasoning_content": "", "content": None}


def test_normalize_chunk_tolerates_odd_but_valid_chunks() -> None:
    p = make_provider("vllm")
    for chunk in ({}, {"choices": None}, {"choices": []}, {"choices": [{"delta": None}]}, {"usage": None},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]}):  # a tool-call fragment without function
        p.normalize_chunk(chunk)  # must not raise


# ---- usage ----------------------------------------------------------------------------------------------------------

DEEPSEEK_USAGE = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
                  "prompt_cache_hit_tokens": 1024, "prompt_cache_miss_tokens": 176,
                  "prompt_tokens_details": {"cached_tokens": 1024},
                  "completion_tokens_details": {"reasoning_tokens": 220}}


def test_deepseek_hit_miss_usage() -> None:
    u = make_provider("deepseek").usage(DEEPSEEK_USAGE)
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens) == (1200, 300, 1024, 220)
    assert u.total_tokens == 1500
    assert u.estimated is False
    out = u.to_openai(DEEPSEEK_USAGE)
    assert out["prompt_cache_hit_tokens"] == 1024 and out["prompt_cache_miss_tokens"] == 176  # originals kept
    assert out["prompt_tokens_details"]["cached_tokens"] == 1024
    assert out["completion_tokens_details"]["reasoning_tokens"] == 220
    assert out["total_tokens"] == out["prompt_tokens"] + out["completion_tokens"] == 1500
    assert "estimated" not in out


def test_deepseek_explicit_hit_count_wins_over_details() -> None:
    u = Usage.from_openai({"prompt_tokens": 100, "completion_tokens": 1, "prompt_cache_hit_tokens": 64,
                           "prompt_cache_miss_tokens": 36, "prompt_tokens_details": {"cached_tokens": 0}})
    assert u.cached_tokens == 64
    assert u.to_openai()["prompt_tokens_details"] == {"cached_tokens": 64}


def test_deepseek_prompt_from_hit_plus_miss_when_prompt_missing() -> None:
    u = Usage.from_openai({"completion_tokens": 5, "prompt_cache_hit_tokens": 10, "prompt_cache_miss_tokens": 7})
    assert u.prompt_tokens == 17 and u.cached_tokens == 10 and u.total_tokens == 22


def test_vllm_cached_tokens() -> None:
    p = make_provider("vllm")
    u = p.usage({"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60,
                 "prompt_tokens_details": {"cached_tokens": 32}})
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens) == (50, 32, 10)
    # without --enable-prompt-tokens-details: everything is a miss
    u = p.usage({"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60, "prompt_tokens_details": None})
    assert u.cached_tokens == 0
    assert u.to_openai()["prompt_tokens_details"] == {"cached_tokens": 0}


def test_sglang_top_level_reasoning_tokens() -> None:
    raw = {"prompt_tokens": 20, "completion_tokens": 90, "total_tokens": 110, "reasoning_tokens": 70,
           "completion_tokens_details": None, "prompt_tokens_details": None}
    u = make_provider("sglang").usage(raw)
    assert u.reasoning_tokens == 70 and u.completion_tokens == 90
    out = u.to_openai(raw)
    assert out["completion_tokens_details"] == {"reasoning_tokens": 70}
    assert "reasoning_tokens" not in out  # the non-standard top-level key is not passed to clients


def test_total_is_recomputed_not_copied() -> None:
    raw = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 999}
    assert Usage.from_openai(raw).to_openai(raw)["total_tokens"] == 15


def test_garbage_counts_are_zero_and_named_and_cached_is_clamped_when_billed() -> None:
    u = Usage.from_openai({"prompt_tokens": 5, "completion_tokens": "7", "prompt_tokens_details": {"cached_tokens": 9}})
    assert u.completion_tokens == 0 and u.rejected == {"completion_tokens": "not_a_number"}
    assert bound_usage(u, None)[0].cached_tokens == 5  # the meter clamps (and counts) cached > prompt
    u = Usage.from_openai({"prompt_tokens": -3, "completion_tokens": True})
    assert u.prompt_tokens == 0 and u.completion_tokens == 0
    assert u.rejected == {"prompt_tokens": "negative", "completion_tokens": "not_a_number"}


def test_estimated_flag_reaches_the_client() -> None:
    assert Usage(1, 2, estimated=True).to_openai()["estimated"] is True


_n = st.integers(0, 10**9)


@settings(max_examples=200, deadline=None, database=None)
@given(prompt=_n, completion=_n, cached=_n, hit=st.none() | _n, reasoning=_n,
       top_reasoning=st.booleans())
def test_usage_invariants(prompt, completion, cached, hit, reasoning, top_reasoning) -> None:
    raw: dict = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "prompt_tokens_details": {"cached_tokens": cached}}
    if hit is not None:
        raw["prompt_cache_hit_tokens"] = hit
    if top_reasoning:
        raw["reasoning_tokens"] = reasoning
    else:
        raw["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    out = bound_usage(Usage.from_openai(raw), None)[0].to_openai(raw)  # what a client is shown: billed usage
    assert out["total_tokens"] == out["prompt_tokens"] + out["completion_tokens"]
    assert out["prompt_tokens"] == prompt and out["completion_tokens"] == completion
    assert 0 <= out["prompt_tokens_details"]["cached_tokens"] <= prompt
    assert out["completion_tokens_details"]["reasoning_tokens"] == min(reasoning, completion)  # part of completion
    assert all(isinstance(out[k], int) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))


# ---- one non-stream shape, whichever upstream served it and whether it was streamed ---------------------------------


@pytest.mark.parametrize("kind", ["deepseek", "vllm", "sglang"])
def test_a_message_that_only_calls_tools_has_null_content_and_no_stream_index(kind: str) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    obj = make_provider(kind).parse_json(completion({"role": "assistant", "content": "",  # DeepSeek's spelling
                                                     "tool_calls": [{"index": 0, **call}]}))
    msg = obj["choices"][0]["message"]
    assert msg["content"] is None and msg["tool_calls"] == [call]


def test_text_with_tool_calls_is_kept_and_an_empty_answer_stays_empty() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    p = make_provider("deepseek")
    assert p.parse_json(completion({"role": "assistant", "content": "Let me check.", "tool_calls": [call]})
                        )["choices"][0]["message"]["content"] == "Let me check."
    assert p.parse_json(completion({"role": "assistant", "content": ""}))["choices"][0]["message"]["content"] == ""


def test_vllm_nulls_and_empty_lists_are_absent() -> None:
    raw = completion({"role": "assistant", "content": "x", "refusal": None, "annotations": None, "audio": None,
                      "function_call": None, "tool_calls": [], "reasoning": None},
                     service_tier=None, system_fingerprint=None, prompt_logprobs=None, kv_transfer_params=None,
                     custom_field=None)
    obj = make_provider("vllm").parse_json(raw)
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "x", "refusal": None}
    assert {k for k in obj if k not in ("id", "object", "created", "model", "choices")} == {"custom_field"}
