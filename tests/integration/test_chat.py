"""The OpenAI SDK against the real gateway and real fake upstreams: JSON, streams, tools, JSON mode, identity."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.integration.conftest import Fake, Gateway

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "Say hello"}]


def test_non_stream_chat(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    r = raw.parse()
    assert r.object == "chat.completion"
    assert r.model == MODEL  # the public id, not the upstream's
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra and r.model_extra["provider"] == "deepseek"
    assert raw.headers["x-therouter-provider"] == "deepseek"
    assert raw.headers["x-therouter-attempts"] == "1"
    assert raw.headers["x-request-id"]
    assert raw.request_id == raw.headers["x-request-id"]
    # the upstream received our key, none of the client's
    seen = fakes["deepseek"].last()
    assert seen["headers"]["authorization"] == "valid"
    assert seen["body"]["model"] == "deepseek-v3.2"


def test_client_request_id_is_echoed(gateway: Gateway, api_key: str) -> None:
    r = httpx.post(gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}",
                                                              "x-request-id": "my-trace-42"},
                   json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-trace-42"


def test_stream_chat(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert chunks, "no chunks"
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    assert {c.model for c in chunks} == {MODEL}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    # no usage anywhere when the client did not ask (DeepSeek puts usage on its last chunk: we strip it)
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert last.usage.model_extra and "cost" in last.usage.model_extra


def test_raw_sse_framing_ends_with_done(gateway: Gateway, api_key: str) -> None:
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": HELLO, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert e.startswith("data: ") and "\n" not in e
        json.loads(e[6:])


def test_stream_tool_call_deltas(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=tools, stream=True))
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for ch in c.choices:
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "args": "", "id": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["args"] += tc.function.arguments
    assert calls and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert isinstance(json.loads(calls[0]["args"]), dict)
    finals = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finals == ["tool_calls"]


def test_stream_helper_accumulates_tool_calls(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                        tools=tools) as s:
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    json.loads(call.function.arguments)


def test_json_mode(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "Answer in json"}])
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_json_schema_downgraded_for_json_object_only_host(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(r.choices[0].message.content or "")
    sent = fakes["deepseek"].last()["body"]
    assert sent["response_format"] == {"type": "json_object"}
    assert '"answer"' in sent["messages"][0]["content"] and sent["messages"][0]["role"] == "system"


def test_developer_role_reaches_deepseek_as_system(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "be brief"}, *HELLO])
    sent = fakes["deepseek"].last()["body"]
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]


def test_reasoning_content_passes_through(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(reasoning=2)
    r = client.chat.completions.create(model=MODEL, messages=HELLO)
    assert r.choices[0].message.model_extra.get("reasoning_content")
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert any((c.choices and (c.choices[0].delta.model_extra or {}).get("reasoning_content")) for c in chunks)


def test_vllm_reasoning_becomes_reasoning_content(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    fakes["vllm"].configure(reasoning=2)
    r = client.chat.completions.create(model="selfhost/only-vllm", messages=HELLO)
    msg = r.choices[0].message.model_extra
    assert msg.get("reasoning_content") and "reasoning" not in msg
    chunks = list(client.chat.completions.create(model="selfhost/only-vllm", messages=HELLO, stream=True))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert any(d.get("reasoning_content") for d in deltas)
    assert not any("reasoning" in d for d in deltas)


def test_reasoning_content_history_forwarded_unchanged(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client.chat.completions.create(model=MODEL, messages=history)  # type: ignore[arg-type]
    sent = fakes["deepseek"].last()["body"]["messages"][1]
    assert sent["reasoning_content"] == "I should call the tool"


def test_sglang_route(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="selfhost/only-sglang", messages=HELLO)
    assert r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="selfhost/only-sglang", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_unknown_fields_pass_through(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"user_id": "u-1", "x_custom": [1]})
    sent = fakes["deepseek"].last()["body"]
    assert sent["user_id"] == "u-1" and sent["x_custom"] == [1]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/deepseek/deepseek-v3.2"])
def test_models(gateway: Gateway, api_key: str, path: str) -> None:
    r = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 200
    body = r.json()
    entries = body["data"] if path.endswith("models") else [body]
    if path.endswith("models"):
        assert body["object"] == "list"
    m = next(e for e in entries if e["id"] == MODEL)
    assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    assert m["context_length"] == 4096 and m["max_output_tokens"] == 1024
    assert m["pricing"]["input"] == "0.96" and m["pricing"]["output"] == "2.88"
    assert "tools" in m["supported_parameters"]
    assert m["modalities"] == {"input": ["text"], "output": ["text"]}


def test_models_with_sdk(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL


def test_stream_is_forwarded_as_it_arrives(gateway: Gateway, api_key: str, fakes: dict[str, Fake]) -> None:
    """The first event reaches the client while the upstream is still generating (no buffering)."""
    fakes["deepseek"].configure(chunks=6, chunk_delay_ms=400)
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": HELLO, "stream": True}, timeout=20) as r:
        it = r.iter_raw()
        first = next(it)
        assert first.startswith(b"data: ")
        assert fakes["deepseek"].stats()["in_flight"] == 1  # the upstream has not finished yet
        rest = b"".join(it)
    assert rest.endswith(b"data: [DONE]\n\n")
