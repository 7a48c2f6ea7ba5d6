"""Anthropic answers -> OpenAI shapes, from raw wire bytes: SSE split at awkward places, tool input as JSON
fragments, a thinking block followed by a tool call, in-stream errors, usage with cache reads and writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from therouter.errors import GatewayError, UpstreamBadResponse, UpstreamRequestRejected
from therouter.protocol.usage import Usage
from therouter.providers._anthropic_response import AnthropicStream, to_completion
from therouter.providers.base import Provider
from therouter.sse import SSEDecoder
from therouter.streaming import ChunkRewriter

from ._helpers import make_provider

WIRE = Path(__file__).parent / "wire"
THINKING_TOOL = (WIRE / "anthropic_thinking_tool.sse").read_bytes()


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


def start(**usage: Any) -> dict[str, Any]:
    return {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                 "model": "claude-opus-4-7", "content": [], "stop_reason": None,
                                                 "usage": {"input_tokens": 10, "output_tokens": 1, **usage}}}


def text_block(i: int, *pieces: str) -> list[dict[str, Any]]:
    return [{"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
            *({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": p}}
              for p in pieces),
            {"type": "content_block_stop", "index": i}]


def end(stop_reason: str = "end_turn", output_tokens: int = 7) -> list[dict[str, Any]]:
    return [{"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
             "usage": {"output_tokens": output_tokens}}, {"type": "message_stop"}]


def pieces(raw: bytes, size: int) -> list[bytes]:
    return [raw[i:i + size] for i in range(0, len(raw), size)]


class Relay:
    """What the gateway does with an upstream stream: decode SSE, check for an in-band error, rewrite each event
    through the provider's translator (the first-chunk gate is the first non-None)."""

    def __init__(self, provider: Provider | None = None, include_usage: bool = True) -> None:
        self.p = provider or make_provider("anthropic")
        self.rw = ChunkRewriter(self.p, gen_id="chatcmpl-x", model="anthropic/claude-opus-4.7", created=1,
                                object_="chat.completion.chunk", include_usage=include_usage)
        self.chunks: list[dict[str, Any]] = []

    def feed(self, raw_pieces: list[bytes]) -> None:
        dec = SSEDecoder(1024 * 1024)
        payloads = [p for piece in raw_pieces for p in dec.feed(piece)] + list(dec.flush())
        for payload in payloads:
            obj = orjson.loads(payload)
            err = self.p.in_band_error(obj)
            if err is not None:
                raise err
            out = self.rw.rewrite(obj)
            if out is not None:
                assert out.startswith(b"data: ") and out.endswith(b"\n\n")
                self.chunks.append(orjson.loads(out[6:]))

    def message(self) -> dict[str, Any]:
        """The client's view: the deltas of every chunk assembled the way the OpenAI SDK's helpers do."""
        msg: dict[str, Any] = {"content": "", "reasoning_content": "", "reasoning_details": [], "tool_calls": {}}
        finish = None
        for c in self.chunks:
            for ch in c["choices"]:
                d = ch["delta"]
                msg["content"] += d.get("content") or ""
                msg["reasoning_content"] += d.get("reasoning_content") or ""
                msg["reasoning_details"] += d.get("reasoning_details") or []
                for tc in d.get("tool_calls") or ():
                    slot = msg["tool_calls"].setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                    slot["id"] = tc.get("id") or slot["id"]
                    fn = tc.get("function") or {}
                    slot["name"] += fn.get("name") or ""
                    slot["arguments"] += fn.get("arguments") or ""
                finish = ch["finish_reason"] or finish
        msg["finish_reason"] = finish
        return msg

    def usage(self) -> Usage:
        return self.rw.final_usage(0)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 64, 1000, len(THINKING_TOOL)])
def test_thinking_then_tool_call_split_anywhere(size: int) -> None:
    relay = Relay()
    relay.feed(pieces(THINKING_TOOL, size))
    msg = relay.message()
    assert msg["reasoning_content"] == "The user wants the weather in Paris. I should call get_weather \u2014 in celsius."
    assert msg["reasoning_details"] == [{
        "type": "reasoning.text", "text": msg["reasoning_content"], "format": "anthropic-claude-v1", "index": 0,
        "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds+B7u5t2cS9rNm3o==",
    }]
    assert msg["content"] == "Let me check the weather."
    assert msg["tool_calls"] == {0: {"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
                                     "arguments": '{"location": "Paris, France", "unit": "celsius"}'}}
    assert msg["finish_reason"] == "tool_calls"
    # OpenAI's chunk shape: our id, the public model, role on the first chunk only, one finish
    assert {c["id"] for c in relay.chunks} == {"chatcmpl-x"}
    assert {c["model"] for c in relay.chunks} == {"anthropic/claude-opus-4.7"}
    assert relay.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum("role" in c["choices"][0]["delta"] for c in relay.chunks) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in relay.chunks)
    # usage: all input (uncached + cache reads + cache writes) is the prompt; reads and writes are counted apart
    u = relay.usage()
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.completion_tokens) == (3544, 2048, 1024, 89)
    assert not u.rejected and not u.estimated


def test_first_chunk_is_real_generation() -> None:
    """message_start, ping and empty block starts carry nothing for the client: no chunk, so the gateway's
    first-chunk gate holds (and an error event there still falls back)."""
    relay = Relay()
    relay.feed([sse(start(), {"type": "ping"},
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})])
    assert relay.chunks == []
    relay.feed([sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}})])
    assert [c["choices"][0]["delta"] for c in relay.chunks] == [{"role": "assistant", "content": "Hi"}]


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("refusal", "content_filter"),
    ("pause_turn", "stop"), ("model_context_window_exceeded", "length"), ("something_new", "stop"),
])
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    relay = Relay()
    relay.feed([sse(start(), *text_block(0, "x"), *end(stop_reason))])
    assert relay.message()["finish_reason"] == finish
    obj = make_provider("anthropic").parse_json(orjson.dumps(
        {"id": "m", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "x"}],
         "stop_reason": stop_reason, "usage": {"input_tokens": 1, "output_tokens": 1}}))
    assert obj["choices"][0]["finish_reason"] == finish


def test_message_delta_usage_is_cumulative_and_wins() -> None:
    relay = Relay()
    relay.feed([sse(start(cache_read_input_tokens=5, cache_creation_input_tokens=None), *text_block(0, "a"),
                    {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                     "usage": {"input_tokens": 12, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3,
                               "output_tokens": 40}}, {"type": "message_stop"})])
    u = relay.usage()
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.completion_tokens) == (20, 5, 3, 40)


def test_usage_count_anthropic_got_wrong_reaches_the_meter_as_rejected() -> None:
    relay = Relay()
    relay.feed([sse({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": "lots"}}},
                    *text_block(0, "a"), *end())])
    u = relay.usage()
    assert u.rejected.get("prompt_tokens") == "not_a_number"
    assert u.completion_tokens == 7


def test_json_tool_streams_as_content() -> None:
    """The forced JSON tool (response_format without structured outputs) is the answer's content, finish stop."""
    relay = Relay()
    relay.feed(pieces(sse(start(), {"type": "content_block_start", "index": 0, "content_block": {
        "type": "tool_use", "id": "toolu_j", "name": "json_response", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"ans'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": 'wer": 4}'}},
        {"type": "content_block_stop", "index": 0}, *end("tool_use")), 5))
    msg = relay.message()
    assert orjson.loads(msg["content"]) == {"answer": 4}
    assert msg["tool_calls"] == {} and msg["finish_reason"] == "stop"


def test_redacted_thinking_is_kept_for_the_next_turn() -> None:
    relay = Relay()
    relay.feed([sse(start(), {"type": "content_block_start", "index": 0,
                              "content_block": {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}},
                    {"type": "content_block_stop", "index": 0}, *text_block(1, "ok"), *end())])
    msg = relay.message()
    assert msg["reasoning_details"] == [{"type": "reasoning.encrypted", "data": "EmwKAhgBEgy3va3pzix",
                                         "format": "anthropic-claude-v1", "index": 0}]


def test_unknown_events_and_blocks_are_skipped() -> None:
    relay = Relay()
    relay.feed([sse(start(), {"type": "content_block_start", "index": 0,
                              "content_block": {"type": "server_tool_use", "id": "s", "name": "web_search"}},
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
                                                                          "partial_json": "{}"}},
                    {"type": "content_block_stop", "index": 0}, {"type": "brand_new_event", "x": 1},
                    *text_block(1, "done"), *end())])
    assert relay.message()["content"] == "done"


@pytest.mark.parametrize("event", [
    {"type": "content_block_delta", "index": "0", "delta": {"type": "text_delta", "text": "x"}},
    {"type": "content_block_delta", "index": 0, "delta": "x"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
    {"type": "content_block_delta", "index": 9, "delta": {"type": "text_delta", "text": "x"}},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "name": 3, "id": "t"}},
    {"type": "message_delta", "delta": None},
    {"type": "message_start", "message": {"usage": 5}},
])
def test_wrong_shape_is_the_providers_fault(event: dict[str, Any]) -> None:
    relay = Relay()
    with pytest.raises(UpstreamBadResponse) as ei:
        relay.feed([sse(start(), *text_block(0, "a")[:1], event)])
    assert ei.value.fallback_ok


@pytest.mark.parametrize(("etype", "status", "fallback"), [
    ("overloaded_error", 529, True), ("rate_limit_error", 429, True), ("api_error", 500, True),
    ("authentication_error", 401, True), ("permission_error", 403, True), ("billing_error", 402, True),
    ("invalid_request_error", 400, False),
])
def test_error_event_mapped_like_http(etype: str, status: int, fallback: bool) -> None:
    relay = Relay()
    with pytest.raises(GatewayError) as ei:
        relay.feed([sse(start(), {"type": "error", "error": {"type": etype, "message": "Overloaded"}})])
    assert ei.value.fallback_ok is fallback
    assert relay.chunks == []  # before the first chunk: the gateway falls back (or answers the client's 400)


# ---- non-stream -----------------------------------------------------------------------------------------------------


MESSAGE = {
    "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-opus-4-7",
    "content": [
        {"type": "thinking", "thinking": "Paris, so get_weather.", "signature": "sig-abc"},
        {"type": "redacted_thinking", "data": "ENCRYPTED"},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
    ],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 100, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 25,
              "output_tokens": 30},
}


def test_parse_json_message_to_completion() -> None:
    obj = make_provider("anthropic").parse_json(orjson.dumps(MESSAGE))
    assert obj["object"] == "chat.completion"
    ch = obj["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["logprobs"] is None
    msg = ch["message"]
    assert msg["role"] == "assistant" and msg["content"] == "Checking." and msg["refusal"] is None
    assert msg["reasoning_content"] == "Paris, so get_weather."
    assert [d["type"] for d in msg["reasoning_details"]] == ["reasoning.text", "reasoning.encrypted"]
    assert msg["reasoning_details"][0]["signature"] == "sig-abc"
    assert [(t["id"], t["function"]["name"], orjson.loads(t["function"]["arguments"])) for t in msg["tool_calls"]] \
        == [("toolu_1", "get_weather", {"location": "Paris"}), ("toolu_2", "get_time", {})]
    u = Usage.from_openai(obj["usage"])
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.completion_tokens) == (175, 25, 50, 30)


def test_parse_json_forced_json_tool_is_the_content() -> None:
    body = {**MESSAGE, "content": [{"type": "text", "text": "Here:"},
                                   {"type": "tool_use", "id": "t", "name": "json_response", "input": {"a": [1]}}]}
    msg = make_provider("anthropic").parse_json(orjson.dumps(body))["choices"][0]
    assert orjson.loads(msg["message"]["content"]) == {"a": [1]}
    assert "tool_calls" not in msg["message"] and msg["finish_reason"] == "stop"


@pytest.mark.parametrize("raw", [b"", b"<html>", b"[]", b'{"type":"message"}', b'{"content": 5}',
                                 b'{"content": [5]}', b'{"content": [{"type": "text", "text": 5}]}',
                                 b'{"content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}',
                                 b'{"content": [], "usage": "x"}'])
def test_parse_json_rejects_what_is_not_a_message(raw: bytes) -> None:
    with pytest.raises(UpstreamBadResponse):
        make_provider("anthropic").parse_json(raw)


# ---- HTTP errors ----------------------------------------------------------------------------------------------------


def err_body(etype: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": etype, "message": message}, "request_id": "req_1"})


@pytest.mark.parametrize(("status", "etype", "fallback", "client_status"), [
    (529, "overloaded_error", True, 502), (429, "rate_limit_error", True, 429), (500, "api_error", True, 502),
    (401, "authentication_error", True, 502), (403, "permission_error", True, 502),
    (402, "billing_error", True, 502), (400, "invalid_request_error", False, 400),
    (413, "request_too_large", False, 413),
])
def test_http_errors(status: int, etype: str, fallback: bool, client_status: int) -> None:
    e = make_provider("anthropic").map_error(status, err_body(etype, "something"), {"retry-after": "3"})
    assert e.fallback_ok is fallback
    assert e.status == client_status  # never the client's 401 for our key
    if status == 429:
        assert e.retry_after == 3


def test_client_mistake_is_shown_sanitised_and_context_overflow_named() -> None:
    p = make_provider("anthropic")
    e = p.map_error(400, err_body("invalid_request_error", "messages.1.content: tool_use ids must be unique"), {})
    assert isinstance(e, UpstreamRequestRejected) and "tool_use ids" in e.message
    e = p.map_error(400, err_body("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"), {})
    assert e.code == "context_length_exceeded"


def test_credit_balance_is_our_account_not_the_client() -> None:
    e = make_provider("anthropic").map_error(
        400, err_body("invalid_request_error", "Your credit balance is too low to access the Anthropic API."), {})
    assert e.fallback_ok and e.status != 400


def test_the_matched_stop_sequence_is_named_as_vllm_does() -> None:
    done = to_completion({"content": [{"type": "text", "text": "a"}], "stop_reason": "stop_sequence",
                          "stop_sequence": "END"})
    assert done["choices"][0]["finish_reason"] == "stop" and done["choices"][0]["stop_reason"] == "END"
    plain = to_completion({"content": [{"type": "text", "text": "a"}], "stop_reason": "end_turn",
                           "stop_sequence": None})
    assert "stop_reason" not in plain["choices"][0]
    s = AnthropicStream()
    out = s({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}})
    assert out is not None and out["choices"][0]["stop_reason"] == "END"
