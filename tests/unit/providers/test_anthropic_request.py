"""What the Anthropic adapter sends: URL, headers and the Messages body built from an OpenAI chat body."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from therouter.errors import InvalidRequest
from therouter.providers import UpstreamRequest
from therouter.providers.wire import NativeRequest

from ._helpers import CANARY, dep, make_provider

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def chat(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "anthropic/claude-opus-4.7", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


def build(body: dict[str, Any], *, stream: bool = False, max_output: int | None = 128000,
          **depkw: Any) -> tuple[UpstreamRequest, dict[str, Any]]:
    req = make_provider("anthropic").chat_request(body, dep("anthropic", model="claude-opus-4-7", **depkw),
                                                  stream=stream, max_output=max_output)
    return req, orjson.loads(req.body)


def test_url_headers_and_minimal_body() -> None:
    req, out = build(chat())
    assert req.url == "https://api.anthropic.com/v1/messages"
    assert req.headers["x-api-key"] == CANARY
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in {k.lower() for k in req.headers}
    assert out == {"model": "claude-opus-4-7", "max_tokens": 128000,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def test_max_tokens_is_the_requests_limit_else_the_cards() -> None:
    assert build(chat(max_tokens=300))[1]["max_tokens"] == 300
    assert build(chat(), max_output=64000)[1]["max_tokens"] == 64000


def test_system_and_developer_lifted_and_same_role_turns_merged() -> None:
    body = chat(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French.",
                                           "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "three"},
    ])
    out = build(body)[1]
    assert out["system"] == [{"type": "text", "text": "Be brief."},
                             {"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}}]
    assert [(m["role"], [b["text"] for b in m["content"]]) for m in out["messages"]] == [
        ("user", ["one", "two"]), ("assistant", ["a", "b"]), ("user", ["three"])]


def test_tools_tool_choice_and_parallel() -> None:
    out = build(chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))[1]
    assert out["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                             "input_schema": WEATHER["function"]["parameters"]}]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    for choice, mapped in (("auto", {"type": "auto"}), ("none", {"type": "none"}),
                           ({"type": "function", "function": {"name": "get_weather"}},
                            {"type": "tool", "name": "get_weather"})):
        assert build(chat(tools=[WEATHER], tool_choice=choice))[1]["tool_choice"] == mapped
    assert "tool_choice" not in build(chat(tools=[WEATHER]))[1]
    assert build(chat(tools=[WEATHER], parallel_tool_calls=False))[1]["tool_choice"] == {
        "type": "auto", "disable_parallel_tool_use": True}
    assert "tools" not in build(chat(tool_choice="auto"))[1] and "tool_choice" not in build(chat(tool_choice="auto"))[1]


def test_tool_round_trip_messages() -> None:
    """The assistant's tool calls become tool_use blocks, tool results one user turn of tool_result blocks (first,
    before a user's text), each with its tool_use_id; the thinking block comes back, signature intact."""
    body = chat(messages=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "reasoning_content": "Two cities.",
         "reasoning_details": [{"type": "reasoning.text", "text": "Two cities.", "signature": "sig-1",
                                "format": "anthropic-claude-v1", "index": 0},
                               {"type": "reasoning.encrypted", "data": "ENC", "format": "anthropic-claude-v1"},
                               {"type": "reasoning.text", "text": "other vendor", "format": "openai-v1"}],
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"id": "toolu_2", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "25C"}]},
        {"role": "user", "content": "Thanks, and?"},
    ], tools=[WEATHER])
    out = build(body)[1]
    assistant, results = out["messages"][1], out["messages"][2]
    assert assistant == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Two cities.", "signature": "sig-1"},
        {"type": "redacted_thinking", "data": "ENC"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]}
    assert results == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "25C"}]},
        {"type": "text", "text": "Thanks, and?"},
    ]}
    assert len(out["messages"]) == 3


def test_images_data_and_https() -> None:
    out = build(chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]))[1]
    assert out["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(("body", "param"), [
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]),
     "messages[0].content[0].image_url.url"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]),
     "messages[0].content[0].image_url.url"),
    (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0]"),
    (chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]},
                    {"role": "user", "content": "x"}]), "messages[0].content[0]"),
    (chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    (chat(messages=[{"role": "function", "name": "f", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "system", "content": "only a system prompt"}]), "messages"),
    (chat(n=2), "n"),
    (chat(logprobs=True), "logprobs"),
])
def test_what_anthropic_cannot_take_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as ei:
        build(body)
    assert ei.value.param == param and ei.value.status == 400


def test_stop_user_sampling_and_stream() -> None:
    out = build(chat(stop="END", user="u-42", temperature=1.7, top_p=0.9, top_k=40, stream=True,
                     seed=1, presence_penalty=0.5, x_vendor=1), stream=True)[1]
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-42"}
    assert out["temperature"] == 1.0  # Anthropic's range is 0..1
    assert "top_p" not in out  # not together with temperature
    assert out["top_k"] == 40 and out["stream"] is True
    for k in ("seed", "presence_penalty", "x_vendor", "stream_options", "user", "stop"):
        assert k not in out  # Anthropic refuses fields it does not know
    assert build(chat(stop=["a", "b"], top_p=0.5))[1]["stop_sequences"] == ["a", "b"]
    assert build(chat(top_p=0.5))[1]["top_p"] == 0.5


SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
          "additionalProperties": False}


def test_json_schema_via_structured_outputs_where_supported() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
    out = build(chat(response_format=rf), capabilities=["json_schema", "tools"])[1]
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert "tools" not in out


@pytest.mark.parametrize(("rf", "schema"), [
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}, SCHEMA),
    ({"type": "json_object"}, {"type": "object"}),
])
def test_json_via_forced_tool_elsewhere(rf: dict[str, Any], schema: dict[str, Any]) -> None:
    out = build(chat(response_format=rf), capabilities=["tools"])[1]
    assert out["tools"] == [{"name": "json_response", "description": out["tools"][0]["description"],
                             "input_schema": schema}]
    assert out["tool_choice"] == {"type": "tool", "name": "json_response"}
    # with the client's own tools: the model may call one of them or answer in JSON
    out = build(chat(response_format=rf, tools=[WEATHER]), capabilities=["tools"])[1]
    assert [t["name"] for t in out["tools"]] == ["get_weather", "json_response"]
    assert out["tool_choice"] == {"type": "any"}


def test_thinking_adaptive_and_budget() -> None:
    caps = ["tools", "reasoning"]
    out = build(chat(reasoning_effort="high", temperature=0.2), capabilities=caps)[1]
    assert out["thinking"] == {"type": "adaptive"} and out["output_config"] == {"effort": "high"}
    assert "temperature" not in out  # Anthropic refuses sampling changes with thinking
    out = build(chat(reasoning={"effort": "low"}, max_tokens=10000), capabilities=caps, thinking="budget")[1]
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    out = build(chat(reasoning={"max_tokens": 5000}, max_tokens=10000), capabilities=caps, thinking="budget")[1]
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 5000}
    out = build(chat(reasoning_effort="low", max_tokens=1000), capabilities=caps, thinking="budget")[1]
    assert "thinking" not in out  # no room for the smallest budget (1024)
    # the deployment's default, and a request turning it off
    assert build(chat(), capabilities=caps, reasoning_effort="medium")[1]["output_config"] == {"effort": "medium"}
    assert "thinking" not in build(chat(reasoning_effort="none"), capabilities=caps, reasoning_effort="medium")[1]
    assert "thinking" not in build(chat(reasoning={"enabled": False}), capabilities=caps, reasoning_effort="high")[1]
    # no reasoning capability: never sent
    assert "thinking" not in build(chat(reasoning_effort="high"), capabilities=["tools"])[1]


def test_forced_tool_turns_thinking_off() -> None:
    caps = ["tools", "reasoning"]
    out = build(chat(reasoning_effort="high", tools=[WEATHER], tool_choice="required"), capabilities=caps)[1]
    assert "thinking" not in out and out["tool_choice"] == {"type": "any"}
    out = build(chat(reasoning_effort="high", response_format={"type": "json_object"}), capabilities=caps)[1]
    assert "thinking" not in out
    out = build(chat(reasoning_effort="high", tools=[WEATHER], tool_choice="auto"), capabilities=caps)[1]
    assert out["thinking"] == {"type": "adaptive"}


def test_tool_turn_sent_back_without_its_thinking_turns_thinking_off() -> None:
    """LangChain's ChatOpenAI drops reasoning_details: the conversation goes on, without thinking (Anthropic refuses
    thinking on a tool loop whose last assistant turn lost its thinking block)."""
    turns = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "t1", "content": "18C"}]
    caps = ["tools", "reasoning"]
    out = build(chat(messages=turns, tools=[WEATHER], reasoning_effort="high"), capabilities=caps)[1]
    assert "thinking" not in out
    signed = {"type": "reasoning.text", "text": "hm", "signature": "s", "format": "anthropic-claude-v1"}
    turns[1] = {**turns[1], "reasoning_details": [signed]}
    out = build(chat(messages=turns, tools=[WEATHER], reasoning_effort="high"), capabilities=caps)[1]
    assert out["thinking"] == {"type": "adaptive"}


def test_completions_endpoint_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        make_provider("anthropic").completion_request({"model": "m", "prompt": "x"}, dep("anthropic"),
                                                      stream=False)


def test_native_request_sends_the_clients_messages_body_as_it_came() -> None:
    native = {"model": "claude-sonnet-4-5", "max_tokens": 999999, "stream": False, "top_k": 3,
              "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
              "messages": [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]},
                           {"role": "assistant", "content": [
                               {"type": "thinking", "thinking": "deepseek's", "signature": ""},
                               {"type": "thinking", "thinking": "mine", "signature": "sig"},
                               {"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]}]}
    p = make_provider("anthropic")
    client_headers = {"anthropic-beta": "pdfs-2024-09-25", "anthropic-version": "2023-06-01",
                      "x-api-key": "the-clients-own-key", "authorization": "Bearer the-clients", "x-other": "1"}
    wire = NativeRequest.of("anthropic", native, "claude-sonnet-4-5", client_headers)
    req = p.native_request(wire, {"max_tokens": 512}, dep("anthropic", model="claude-opus-4-7"), stream=True)
    assert req is not None and req.url == "https://api.anthropic.com/v1/messages"
    assert req.meta["wire"] == "anthropic"  # the answer comes back natively
    # our key, never the client's; the client's protocol headers and nothing else of its
    assert req.headers["x-api-key"] == CANARY and "authorization" not in req.headers and "x-other" not in req.headers
    assert req.headers["anthropic-beta"] == "pdfs-2024-09-25" and req.headers["anthropic-version"] == "2023-06-01"
    out = orjson.loads(req.body)
    # the gateway's decisions: the deployment's model, the checked (reserved) output limit, streaming
    assert (out["model"], out["max_tokens"], out["stream"], out["top_k"]) == ("claude-opus-4-7", 512, True, 3)
    assert out["system"] == native["system"] and out["messages"][0] == native["messages"][0]
    assert out["messages"][1]["content"] == native["messages"][1]["content"][1:]  # the unsigned block left out
    assert out["messages"][2] == native["messages"][2]
    # an OpenAI-shaped provider takes the translation instead
    assert make_provider("deepseek").native_request(wire, {}, dep("deepseek"), stream=False) is None
    # without the client's headers: the version the adapter always sends
    plain = p.native_request(NativeRequest.of("anthropic", native, "m"), {}, dep("anthropic"), stream=False)
    assert plain is not None and plain.headers["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in plain.headers and "stream" not in orjson.loads(plain.body)
