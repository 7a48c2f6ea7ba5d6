"""The fake upstream's hosted flavours: ``anthropic`` (Messages API) and ``openai`` (OpenAI itself)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from therouter.fakeupstream import FakeConfig, create_app
from therouter.fakeupstream.anthropic import signature

KEY = "sk-ant-fake"
WEATHER = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def client(flavor: str, **kw: Any) -> httpx.AsyncClient:
    app = create_app(FakeConfig(flavor=flavor, **kw))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake/v1", timeout=10)


def messages(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-opus-4-7", "max_tokens": 200,
                            "messages": [{"role": "user", "content": "What is the weather in Paris today?"}]}
    body.update(kw)
    return body


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


async def post(c: httpx.AsyncClient, body: dict[str, Any], key: str = KEY, **headers: str) -> httpx.Response:
    return await c.post("/messages", json=body, headers={"x-api-key": key, **headers})


# ---- anthropic ------------------------------------------------------------------------------------------------------


async def test_anthropic_message_with_thinking_tool_use_and_cache_usage() -> None:
    async with client("anthropic", api_key=KEY, cached_tokens=3, cache_write_tokens=2) as c:
        r = await post(c, messages(tools=[WEATHER], thinking={"type": "adaptive"}))
    assert r.status_code == 200
    d = r.json()
    assert d["type"] == "message" and d["id"].startswith("msg_") and d["stop_reason"] == "tool_use"
    thinking, tool = d["content"]
    assert thinking["type"] == "thinking" and thinking["signature"] == signature(thinking["thinking"])
    assert tool["type"] == "tool_use" and tool["name"] == "get_weather" and tool["input"] == {"city": "Paris"}
    u = d["usage"]
    assert (u["cache_read_input_tokens"], u["cache_creation_input_tokens"]) == (3, 2)
    assert u["input_tokens"] + 5 == len("What is the weather in Paris today?") // 4


async def test_anthropic_stream_events() -> None:
    async with client("anthropic", api_key=KEY) as c:
        r = await post(c, messages(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert all(name == data["type"] for name, data in evs)
    kinds = [name for name, _ in evs]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"] and "[DONE]" not in r.text
    text = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta")
    assert text.startswith("tok0")
    assert evs[-2][1]["delta"]["stop_reason"] == "end_turn" and evs[-2][1]["usage"]["output_tokens"] == 8


async def test_anthropic_structured_output_follows_the_schema() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["C", "F"]}},
              "required": ["answer", "unit"], "additionalProperties": False}
    async with client("anthropic") as c:
        r = await post(c, messages(output_config={"format": {"type": "json_schema", "schema": schema}}))
        forced = await post(c, messages(tools=[{"name": "json_response", "input_schema": schema}],
                                        tool_choice={"type": "tool", "name": "json_response"}))
    assert json.loads(r.json()["content"][0]["text"]) == {"answer": 42, "unit": "C"}
    assert forced.json()["content"][0]["input"] == {"answer": 42, "unit": "C"}


@pytest.mark.parametrize(("body", "needle"), [
    (messages(max_tokens=None), "max_tokens"),
    (messages(stream_options={"include_usage": True}), "Extra inputs are not permitted"),
    (messages(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), "alternate"),
    (messages(messages=[{"role": "system", "content": "a"}]), "role"),
    (messages(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]), "non-whitespace"),
    (messages(temperature=1.5), "temperature"),
    (messages(thinking={"type": "adaptive"}, temperature=0.5), "thinking"),
    (messages(thinking={"type": "adaptive"}, tools=[WEATHER], tool_choice={"type": "any"}), "forces tool use"),
    (messages(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "18C"}]}]), "tool_use_id"),
    (messages(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/cat.png"}}]}]), "image source"),
    (messages(thinking={"type": "adaptive"}, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"}]}]),
     "Expected `thinking` or `redacted_thinking`"),
    (messages(thinking={"type": "adaptive"}, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "forged"},
                                          {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"}]}]),
     "Invalid `signature`"),
])
async def test_anthropic_refuses_what_anthropic_refuses(body: dict[str, Any], needle: str) -> None:
    body = {k: v for k, v in body.items() if v is not None}
    async with client("anthropic") as c:
        r = await post(c, body)
    assert r.status_code == 400
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]


async def test_anthropic_accepts_a_tool_round_trip_with_signed_thinking_and_answers_in_text() -> None:
    body = messages(thinking={"type": "adaptive"}, tools=[WEATHER], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": signature("hm")},
                                          {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"},
                                     {"type": "text", "text": "and?"}]}])
    async with client("anthropic") as c:
        r = await post(c, body)
    assert r.status_code == 200, r.text
    assert r.json()["stop_reason"] == "end_turn" and r.json()["content"][-1]["type"] == "text"


@pytest.mark.parametrize(("kind", "status", "etype"), [
    ("529", 529, "overloaded_error"), ("429", 429, "rate_limit_error"), ("500", 500, "api_error"),
    ("401", 401, "authentication_error"), ("403", 403, "permission_error"), ("400", 400, "invalid_request_error"),
])
async def test_anthropic_errors(kind: str, status: int, etype: str) -> None:
    async with client("anthropic", retry_after=7) as c:
        r = await post(c, messages(), **{"x-fault": f"error_kind={kind}"})
    assert r.status_code == status and r.json()["error"]["type"] == etype
    assert r.headers.get("request-id", "").startswith("req_")
    if status == 429:
        assert r.headers["retry-after"] == "7"


async def test_anthropic_in_stream_error_event_and_auth() -> None:
    async with client("anthropic", api_key=KEY) as c:
        r = await post(c, messages(stream=True), **{"x-fault": "error_kind=in_band"})
        assert events(r.text) == [("error", {"type": "error", "error": {
            "type": "api_error", "message": "upstream generation failed (injected in-band error)"}})]
        r = await post(c, messages(stream=True), **{"x-fault": "error_kind=in_band_mid;cut_after=2"})
        kinds = [n for n, _ in events(r.text)]
        assert kinds[-1] == "error" and "content_block_delta" in kinds
        bad = await c.post("/messages", json=messages(), headers={"authorization": f"Bearer {KEY}"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        models = await c.get("/models", headers={"x-api-key": KEY})
    assert [m["id"] for m in models.json()["data"]] == ["claude-opus-4-7", "claude-sonnet-4-5"]


# ---- openai ---------------------------------------------------------------------------------------------------------


async def test_openai_reasoning_model_rules() -> None:
    async with client("openai", api_key=KEY) as c:
        h = {"authorization": f"Bearer {KEY}"}
        base = {"model": "gpt-5.1", "messages": [{"role": "developer", "content": "Be brief."},
                                                 {"role": "user", "content": "hello there"}]}
        r = await c.post("/chat/completions", json={**base, "max_tokens": 10}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert r.json()["error"]["code"] == "unsupported_parameter"
        r = await c.post("/chat/completions", json={**base, "temperature": 0.2}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = await c.post("/chat/completions", json={**base, "max_completion_tokens": 50, "reasoning_effort": "high"},
                         headers=h)
        assert r.status_code == 200
        d = r.json()
        msg = d["choices"][0]["message"]
        assert "reasoning_content" not in msg and msg["refusal"] is None  # reasoning is billed, never shown
        assert d["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
        assert d["service_tier"] == "default"
        # an older chat model takes max_tokens and any temperature
        r = await c.post("/chat/completions", json={**base, "model": "gpt-4.1", "max_tokens": 10, "temperature": 0.2},
                         headers=h)
        assert r.status_code == 200


async def test_openai_stream_hides_reasoning_and_reports_usage_details() -> None:
    async with client("openai") as c:
        r = await c.post("/chat/completions", json={
            "model": "gpt-5.1", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "reasoning_effort": "medium", "stream_options": {"include_usage": True}})
    chunks = [json.loads(b[6:]) for b in r.text.strip().split("\n\n") if b != "data: [DONE]"]
    assert not any("reasoning_content" in (c["choices"] or [{}])[0].get("delta", {}) for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    assert r.text.endswith("data: [DONE]\n\n")


# ---- stop strings, citations, redacted thinking ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_stop_sequences_cut_the_text_and_are_named(stream: bool) -> None:
    async with client("anthropic", api_key=KEY) as c:
        r = await post(c, messages(stop_sequences=["nothing-like-it", "tok3"], stream=stream))
        plain = await post(c, messages(stop_sequences=["absent"], stream=stream))
    if stream:
        evs = events(r.text)
        text = "".join(d["delta"]["text"] for k, d in evs if k == "content_block_delta")
        delta = next(d for k, d in evs if k == "message_delta")["delta"]
        plain_delta = next(d for k, d in events(plain.text) if k == "message_delta")["delta"]
    else:
        text, delta, plain_delta = r.json()["content"][0]["text"], r.json(), plain.json()
    assert text == "tok0 tok1 tok2 "  # cut before the stop string, which is not sent
    assert (delta["stop_reason"], delta["stop_sequence"]) == ("stop_sequence", "tok3")
    assert (plain_delta["stop_reason"], plain_delta["stop_sequence"]) == ("end_turn", None)


@pytest.mark.parametrize("flavor,field", [("vllm", "stop_reason"), ("sglang", "matched_stop"), ("deepseek", None)])
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_flavours_honour_stop(flavor: str, field: str | None, stream: bool) -> None:
    model = "deepseek-v3.2" if flavor == "deepseek" else "deepseek-ai/DeepSeek-V3.2"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stop": ["tok2"], "stream": stream}
    async with client(flavor) as c:
        r = await c.post("/chat/completions", json=body)
        single = await c.post("/chat/completions", json={**body, "stop": "tok1"})
    if stream:
        chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
        choices = [ch for ck in chunks for ch in ck["choices"]]
        text = "".join(ch["delta"].get("content") or "" for ch in choices)
        last = next(ch for ch in choices if ch.get("finish_reason"))
        single_text = "".join(ch["delta"].get("content") or "" for ck in
                              [json.loads(ln[6:]) for ln in single.text.splitlines() if ln.startswith("data: {")]
                              for ch in ck["choices"])
    else:
        last = r.json()["choices"][0]
        text, single_text = last["message"]["content"], single.json()["choices"][0]["message"]["content"]
    assert text == "tok0 tok1 " and single_text == "tok0 " and last["finish_reason"] == "stop"
    if field is not None:
        assert last[field] == "tok2"


async def test_anthropic_citations_and_redacted_thinking() -> None:
    doc = {"type": "document", "title": "Memo", "citations": {"enabled": True},
           "source": {"type": "text", "media_type": "text/plain", "data": "The sky is green over Oslo."}}
    body = messages(messages=[{"role": "user", "content": [doc, {"type": "text", "text": "What colour?"}]}],
                    thinking={"type": "enabled", "budget_tokens": 1024})
    async with client("anthropic", api_key=KEY, redacted_thinking=True) as c:
        r = await post(c, body)
        s = await post(c, {**body, "stream": True})
    kinds = [b["type"] for b in r.json()["content"]]
    assert kinds == ["thinking", "redacted_thinking", "text"]
    cite = r.json()["content"][2]["citations"]
    assert cite == [{"type": "char_location", "cited_text": "The sky is green over Oslo.", "document_index": 0,
                     "document_title": "Memo", "start_char_index": 0, "end_char_index": 27}]
    evs = events(s.text)
    deltas = [d["delta"]["type"] for k, d in evs if k == "content_block_delta"]
    assert "signature_delta" in deltas and deltas.count("citations_delta") == 1
    assert next(d for k, d in evs if k == "content_block_delta" and d["delta"]["type"] == "citations_delta")[
        "delta"]["citation"] == cite[0]
    assert [d["content_block"]["type"] for k, d in evs if k == "content_block_start"] == \
        ["thinking", "redacted_thinking", "text"]
