"""The Messages <-> gateway translation (pure): request mapping, answers, stream events and indices, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from therouter import anthropic_surface as surface
from therouter.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    GatewayError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NoDeploymentAvailable,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    UpstreamError,
)

WEATHER_TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def req(**kw: Any) -> surface.MessagesRequest:
    return surface.read_request({"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                                 **kw})


def test_request_maps_every_field() -> None:
    r = surface.read_request({
        "model": "claude-x", "max_tokens": 100, "stream": True, "system": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}],
        "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9, "top_k": 5, "metadata": {"user_id": "u"},
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}, "cache_control": {}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "AAA"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                              {"type": "text", "text": "calling"},
                                              {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                          "content": [{"type": "text", "text": "boom"}]}]},
        ]})
    o = r.openai
    assert r.stream and r.stop_sequences == ["END"] and r.native["model"] == "claude-x"
    assert o["stream_options"] == {"include_usage": True} and o["max_tokens"] == 100
    assert (o["stop"], o["temperature"], o["top_p"], o["top_k"], o["user"]) == (["END"], 0.2, 0.9, 5, "u")
    assert o["reasoning"] == {"enabled": True, "max_tokens": 2000}
    assert o["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                            "description": "d"}}]
    assert o["tool_choice"] == "required" and o["parallel_tool_calls"] is False
    m = o["messages"]
    assert m[0] == {"role": "system", "content": "a\n\nb"}
    assert m[1]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}
    assert m[2]["content"] == "calling" and m[2]["reasoning_content"] == "hmm"
    assert m[2]["reasoning_details"][0]["signature"] == "sig"
    assert m[2]["tool_calls"] == [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]
    assert m[3] == {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"}


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": None}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "container_upload"}]}]}, "messages[0].content[0].type"),
    ({"tools": [{"name": "no_schema"}]}, "tools[0]"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"), ({"stop_sequences": "END"}, "stop_sequences"),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"), ({"model": ""}, "model"),
])
def test_bad_requests_name_their_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        req(**body)
    assert e.value.param == param and e.value.status == 400


def test_documents_and_server_tools_need_a_native_deployment() -> None:
    """Document blocks (citations on) and server tools pass the surface, marked for an Anthropic deployment only;
    the translation keeps a document's text (or its title) for the gateway's own prompt estimate."""
    doc = {"type": "document", "title": "Memo", "citations": {"enabled": True},
           "source": {"type": "text", "media_type": "text/plain", "data": "The sky is green."}}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}
    r = req(messages=[{"role": "user", "content": [doc, {"type": "text", "text": "What colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Green.", "citations": [
                          {"type": "char_location", "cited_text": "The sky is green.", "document_index": 0,
                           "start_char_index": 0, "end_char_index": 17}]}]},
                      {"role": "user", "content": [pdf]}],
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}, WEATHER_TOOL])
    assert r.native_only == ("document blocks", "server tools")
    m = r.openai["messages"]
    assert m[0]["content"][0] == {"type": "text", "text": "Memo\nThe sky is green."}
    assert m[1]["content"] == "Green." and m[2]["content"] == "[document]"
    assert [t["function"]["name"] for t in r.openai["tools"]] == ["get_weather"]  # the server tool is Anthropic's
    assert req().native_only == ()
    inner = req(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [doc]}]}])
    assert inner.native_only == ("document blocks",) and "The sky is green." in inner.openai["messages"][2]["content"]


def test_count_tokens_needs_no_max_tokens() -> None:
    r = surface.read_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}, count_only=True)
    assert "max_tokens" not in r.openai


def test_answer_maps_blocks_stop_and_usage() -> None:
    completion = {"id": "chatcmpl-1", "choices": [{"finish_reason": "stop", "stop_reason": "END", "message": {
        "content": "hi", "reasoning_content": "think",
        "reasoning_details": [{"type": "reasoning.text", "text": "think", "signature": "s1",
                               "format": "anthropic-claude-v1"}],
        "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4,
                  "prompt_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 2}}}
    msg = surface.to_message(completion, req(stop_sequences=["END"]))
    assert msg["model"] == "claude-x" and msg["id"] == "chatcmpl-1"
    assert msg["content"] == [{"type": "thinking", "thinking": "think", "signature": "s1"},
                              {"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t", "name": "f",
                                                               "input": {"x": 2}}]
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "END")
    assert msg["usage"] == {"input_tokens": 5, "output_tokens": 4, "cache_read_input_tokens": 3,
                            "cache_creation_input_tokens": 2}


@pytest.mark.parametrize("finish,reason", [("stop", "end_turn"), ("length", "max_tokens"),
                                           ("tool_calls", "tool_use"), ("content_filter", "refusal")])
def test_stop_reasons(finish: str, reason: str) -> None:
    assert surface.stop_reason(finish, None, ["END"]) == (reason, None)


def events(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for frame in b"".join(raw).decode().split("\n\n"):
        if frame:
            kind, data = frame.split("\n")
            out.append(json.loads(data[6:]))
            assert kind == "event: " + out[-1]["type"]
    return out


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_stream_one_block_per_segment_with_indices() -> None:
    s = surface.MessageStream(req(), "gen-1", 7)
    out: list[bytes] = []
    for c in (chunk({"reasoning_content": "a"}), chunk({"reasoning_content": "b"}),
              chunk({"reasoning_details": [{"type": "reasoning.text", "signature": "sig"}]}),
              chunk({"content": "x"}),
              chunk({"tool_calls": [{"index": 0, "id": "t0", "function": {"name": "f", "arguments": ""}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "t1", "function": {"name": "g", "arguments": "{}"}}]}),
              chunk({}, "tool_calls"),
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6}}):
        out += s.chunk(c)
    out += s.done()
    ev = events(out)
    assert [e["type"] for e in ev] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "content_block_start",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert ev[0]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0} and ev[0]["message"]["id"] == "gen-1"
    starts = [e for e in ev if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["type"]) for e in starts] == [
        (0, "thinking"), (1, "text"), (2, "tool_use"), (3, "tool_use")]
    assert starts[2]["content_block"] == {"type": "tool_use", "id": "t0", "name": "f", "input": {}}
    assert ev[4]["delta"] == {"type": "signature_delta", "signature": "sig"}
    assert ev[10]["delta"] == {"type": "input_json_delta", "partial_json": '{"a"'} and ev[10]["index"] == 2
    assert ev[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert ev[-2]["usage"]["output_tokens"] == 6 and ev[-2]["usage"]["input_tokens"] == 9


def test_stream_error_after_start_and_ping() -> None:
    s = surface.MessageStream(req(), "g", 1)
    ev = events(s.ping() + s.chunk(chunk({"content": "x"})) + s.error("api_error", "broke"))
    assert [e["type"] for e in ev] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                       "error"]
    assert ev[-1]["error"] == {"type": "api_error", "message": "broke"}


@pytest.mark.parametrize("err,status,kind", [
    (InvalidRequest("x"), 400, "invalid_request_error"), (AuthenticationFailed("x"), 401, "authentication_error"),
    (BudgetExceeded("x"), 402, "billing_error"), (PermissionDenied("x"), 403, "permission_error"),
    (ModelNotFound("x"), 404, "not_found_error"), (PayloadTooLarge("x"), 413, "request_too_large"),
    (RateLimited("x"), 429, "rate_limit_error"), (NoDeploymentAvailable("x"), 529, "overloaded_error"),
    (InternalError("x"), 500, "api_error"), (UpstreamError("x"), 502, "api_error"),
])
def test_error_statuses(err: GatewayError, status: int, kind: str) -> None:
    assert surface.error_status(err) == (status, kind)
    assert surface.error_body(err) == {"type": "error", "error": {"type": kind, "message": "x"}}


def test_the_matched_stop_string_is_read_as_vllm_and_sglang_name_it() -> None:
    r = req(stop_sequences=["END"])
    done = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]}
    for extra, want in (({"stop_reason": "END"}, ("stop_sequence", "END")), ({"matched_stop": "END"},
                        ("stop_sequence", "END")), ({"matched_stop": 1}, ("end_turn", None)),  # SGLang's EOS id
                        ({"stop_reason": None, "matched_stop": None}, ("end_turn", None))):
        done["choices"][0] = {**done["choices"][0], **extra}
        for k in ("stop_reason", "matched_stop"):
            if k not in extra:
                done["choices"][0].pop(k, None)
        msg = surface.to_message(done, r)
        assert (msg["stop_reason"], msg["stop_sequence"]) == want, extra
