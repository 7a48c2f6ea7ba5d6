"""Anthropic- and OpenAI-routed models through the real gateway, with the official OpenAI SDK and LangChain's
``ChatOpenAI`` unchanged: tools round trip (the assistant's tool call and thinking sent back), ``json_schema``
parsed, streams with usage, image parts, fallback from an Anthropic 529, cache reads and writes metered at their
own prices. Upstreams are ``therouter fake-upstream --flavor anthropic`` / ``openai`` processes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.integration.conftest import (
    Fake,
    Gateway,
    make_key,
    start_fake,
    start_gateway,
    stop,
)
from therouter.redisproc import RedisProcess

ANTHROPIC_KEY = "sk-ant-api03-CANARY-4d2f9e"
OPENAI_KEY = "sk-proj-CANARY-8c1b7a"
CLAUDE = "anthropic/claude-opus-4.7"
GPT = "openai/gpt-5.1"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
# USD per 1M tokens -> nano-USD per token x 1M: the price table of the Claude card below
P_IN, P_READ, P_WRITE, P_OUT = 5_000, 500, 6_250, 25_000


class Weather(BaseModel):
    answer: int
    unit: Literal["C", "F"]


@dataclass
class Rig:
    gw: Gateway
    key: str
    claude: Fake  # serves anthropic/claude-opus-4.7 (structured outputs)
    backup: Fake  # the fallback deployment (JSON through the forced tool)
    flaky: Fake  # primary of test/claude-fallback
    gpt: Fake

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gw.v1, api_key=self.key, max_retries=0, timeout=30)


def card(**kw: Any) -> dict[str, Any]:
    return {"context_length": 200000, "max_output_tokens": 64000,
            "modalities": {"input": ["text", "image"], "output": ["text"]},
            "supported_parameters": ["max_tokens", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                                     "stop", "reasoning_effort", "temperature"],
            "pricing": {"input": 5, "cached_input": 0.5, "cache_write": 6.25, "output": 25}, **kw}


@pytest.fixture(scope="module")
def rig(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    claude, backup, flaky = (start_fake("anthropic", ANTHROPIC_KEY, "--models", "*") for _ in range(3))
    gpt = start_fake("openai", OPENAI_KEY, "--models", "*")
    tmp = tmp_path_factory.mktemp("hosted")
    t = {"connect": 1, "first_token": 3, "idle": 3, "total": 20}
    claude_caps = ["tools", "json_object", "json_schema", "reasoning"]
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "request_deadline": 30, "model_check_interval": 0},
        "store": {"redis_url": redis_proc.url, "key_prefix": f"ha{uuid.uuid4().hex[:8]}:"},
        "data_dir": str(tmp / "data"),
        "providers": {
            "anthropic": {"kind": "anthropic", "base_url": claude.url, "api_key_env": "TEST_ANTHROPIC_KEY",
                          "timeouts": t},
            "anthropic-backup": {"kind": "anthropic", "base_url": backup.url, "api_key_env": "TEST_ANTHROPIC_KEY",
                                 "timeouts": t},
            "anthropic-flaky": {"kind": "anthropic", "base_url": flaky.url, "api_key_env": "TEST_ANTHROPIC_KEY",
                                "timeouts": t},
            "openai": {"kind": "openai", "base_url": gpt.url + "/v1", "api_key_env": "TEST_OPENAI_KEY",
                       "timeouts": t},
            "deepseek": {"kind": "deepseek", "base_url": fakes["deepseek"].url, "api_key_env": "TEST_DEEPSEEK_KEY",
                         "timeouts": t},
        },
        "models": {
            CLAUDE: card(deployments=[{"provider": "anthropic", "model": "claude-opus-4-7",
                                       "capabilities": claude_caps}]),
            "test/claude-json-tool": card(deployments=[{"provider": "anthropic-backup", "model": "claude-sonnet-4-5",
                                                        "capabilities": ["tools", "json_object", "reasoning"],
                                                        "thinking": "budget"}]),
            "test/claude-fallback": card(deployments=[
                {"provider": "anthropic-flaky", "model": "claude-opus-4-7", "priority": 0, "capabilities": claude_caps},
                {"provider": "anthropic-backup", "model": "claude-opus-4-7", "priority": 1,
                 "capabilities": claude_caps}]),
            GPT: {**card(), "modalities": {"input": ["text", "image"], "output": ["text"]},
                  "supported_parameters": ["max_tokens", "tools", "tool_choice", "response_format", "stop",
                                           "reasoning_effort"],
                  "pricing": {"input": 1.25, "cached_input": 0.125, "output": 10},
                  "deployments": [{"provider": "openai", "model": "gpt-5.1",
                                   "capabilities": ["tools", "json_object", "json_schema", "reasoning"]}]},
            "deepseek/deepseek-v3.2": {**card(), "modalities": {"input": ["text"], "output": ["text"]},
                                       "pricing": {"input": 0.96, "output": 2.88},
                                       "deployments": [{"provider": "deepseek", "model": "deepseek-v3.2",
                                                        "capabilities": ["tools", "json_object"]}]},
        },
    }
    gw = start_gateway(config, tmp, {"TEST_ANTHROPIC_KEY": ANTHROPIC_KEY, "TEST_OPENAI_KEY": OPENAI_KEY})
    key = asyncio.run(make_key(gw, "hosted"))
    try:
        yield Rig(gw, key, claude, backup, flaky, gpt)
    finally:
        stop(gw.proc)
        for f in (claude, backup, flaky, gpt):
            stop(f.proc)


@pytest.fixture(autouse=True)
def _reset(rig: Rig) -> Iterator[None]:
    yield
    for f in (rig.claude, rig.backup, rig.flaky, rig.gpt):
        httpx.post(f.url + "/_fake/reset", json={"knobs": True}, timeout=5)


def generation(rig: Rig, gen_id: str) -> dict[str, Any]:
    r = httpx.get(rig.gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {rig.key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def cost_of(u: dict[str, Any]) -> int:
    prompt, out = u["prompt_tokens"], u["completion_tokens"]
    read = u["prompt_tokens_details"]["cached_tokens"]
    write = u["prompt_tokens_details"].get("cache_write_tokens", 0)
    return (prompt - read - write) * P_IN + read * P_READ + write * P_WRITE + out * P_OUT  # nano: exact, no rounding


# ---- plain chat, metering -------------------------------------------------------------------------------------------


def test_chat_is_metered_with_cache_reads_and_writes_at_their_own_prices(rig: Rig) -> None:
    rig.claude.configure(cached_tokens=30, cache_write_tokens=20)
    raw = rig.client.chat.completions.with_raw_response.create(
        model=CLAUDE, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 400}])
    r = raw.parse()
    assert raw.headers["x-therouter-provider"] == "anthropic"
    assert r.model == CLAUDE and r.choices[0].finish_reason == "stop" and r.choices[0].message.content
    u = r.usage
    assert u is not None and u.prompt_tokens == 100 + len("Be brief.") // 4  # all input: uncached + reads + writes
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 30
    assert u.prompt_tokens_details.cache_write_tokens == 20  # OpenAI's own name for cache writes
    expected = cost_of(u.model_dump())
    assert Decimal(str(u.model_extra["cost"])) == Decimal(expected) / 10**9  # type: ignore[index]
    rec = generation(rig, r.id)
    assert rec["cost_nano"] == expected and rec["provider"] == "anthropic" and rec["upstream_model"] == "claude-opus-4-7"
    assert rec["usage"]["prompt_tokens_details"] == {"cached_tokens": 30, "cache_write_tokens": 20}
    sent = rig.claude.last()
    assert sent["path"] == "/v1/messages" and sent["headers"]["x-api-key"] == "valid"
    assert "authorization" not in sent["headers"]  # neither our key as a bearer nor the client's
    assert sent["body"]["system"] == [{"type": "text", "text": "Be brief."}]
    assert sent["body"]["max_tokens"] == 64000  # no limit asked: the card's max output, always sent


def test_stream_with_usage(rig: Rig) -> None:
    rig.claude.configure(cached_tokens=2, cache_write_tokens=1)
    chunks = list(rig.client.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "Hi! " * 10}],
                                                     stream=True, stream_options={"include_usage": True},
                                                     max_tokens=500))
    assert len({c.id for c in chunks}) == 1 and {c.model for c in chunks} == {CLAUDE}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("tok0")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens_details.cached_tokens == 2  # type: ignore[union-attr]
    assert last.usage.prompt_tokens_details.cache_write_tokens == 1  # type: ignore[union-attr]
    assert generation(rig, last.id)["cost_nano"] == cost_of(last.usage.model_dump())
    assert rig.claude.last()["body"]["stream"] is True


# ---- tools round trip with thinking ---------------------------------------------------------------------------------


def _assemble(chunks: list[Any]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": "", "reasoning_content": "", "reasoning_details": [],
                           "tool_calls": []}
    for c in chunks:
        for ch in c.choices:
            d = ch.delta
            msg["content"] += d.content or ""
            extra = d.model_extra or {}
            msg["reasoning_content"] += extra.get("reasoning_content") or ""
            msg["reasoning_details"] += extra.get("reasoning_details") or []
            for tc in d.tool_calls or ():
                if tc.index == len(msg["tool_calls"]):
                    msg["tool_calls"].append({"id": tc.id, "type": "function",
                                              "function": {"name": tc.function.name, "arguments": ""}})
                msg["tool_calls"][tc.index]["function"]["arguments"] += tc.function.arguments or ""
    return msg


@pytest.mark.parametrize("stream", [False, True])
def test_tools_round_trip_sends_tool_call_and_thinking_back(rig: Rig, stream: bool) -> None:
    c = rig.client
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw: dict[str, Any] = {"model": CLAUDE, "tools": [WEATHER], "reasoning_effort": "high"}
    if stream:
        first = _assemble(list(c.chat.completions.create(messages=messages, stream=True, **kw)))
        call = first["tool_calls"][0]
        thinking, details = first["reasoning_content"], first["reasoning_details"]
        messages.append(first)
    else:
        r = c.chat.completions.create(messages=messages, **kw)
        assert r.choices[0].finish_reason == "tool_calls"
        msg = r.choices[0].message
        call = msg.tool_calls[0].model_dump()  # type: ignore[index]
        thinking, details = msg.model_extra["reasoning_content"], msg.model_extra["reasoning_details"]  # type: ignore[index]
        messages.append(msg)  # the SDK's own object, extra fields and all
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert thinking == "think0 think1 think2 think3"
    assert details[0]["type"] == "reasoning.text" and details[0]["signature"].startswith("sig_")
    sent = rig.claude.last()["body"]
    assert sent["thinking"] == {"type": "adaptive"} and sent["output_config"] == {"effort": "high"}
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"})
    r2 = c.chat.completions.create(messages=messages, **kw)
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content
    back = rig.claude.last()["body"]["messages"]
    assert [m["role"] for m in back] == ["user", "assistant", "user"]
    assert back[1]["content"][0] == {"type": "thinking", "thinking": thinking, "signature": details[0]["signature"]}
    assert back[1]["content"][-1] == {"type": "tool_use", "id": call["id"], "name": "get_weather",
                                      "input": {"city": "Paris"}}
    assert back[2]["content"] == [{"type": "tool_result", "tool_use_id": call["id"], "content": "18C and sunny"}]
    assert rig.claude.last()["body"]["thinking"] == {"type": "adaptive"}  # the tool loop goes on thinking


# ---- JSON -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [CLAUDE, "test/claude-json-tool"])
def test_json_schema_parsed(rig: Rig, model: str) -> None:
    """Structured outputs where the deployment has them, a forced tool elsewhere: the SDK parses either."""
    r = rig.client.chat.completions.parse(model=model, response_format=Weather,
                                          messages=[{"role": "user", "content": "Weather in Paris, as JSON"}])
    assert r.choices[0].message.parsed == Weather(answer=42, unit="C")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    sent = (rig.claude if model == CLAUDE else rig.backup).last()["body"]
    if model == CLAUDE:
        assert sent["output_config"]["format"]["type"] == "json_schema"
    else:
        assert sent["tool_choice"] == {"type": "tool", "name": "json_response"}


def test_json_object_streams_as_content(rig: Rig) -> None:
    chunks = list(rig.client.chat.completions.create(model="test/claude-json-tool", stream=True,
                                                     response_format={"type": "json_object"},
                                                     messages=[{"role": "user", "content": "weather, JSON please"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)


# ---- images ---------------------------------------------------------------------------------------------------------


def test_image_part_to_an_image_model_and_to_a_text_only_one(rig: Rig) -> None:
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    r = rig.client.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": parts}])
    assert r.choices[0].message.content
    blocks = rig.claude.last()["body"]["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    with pytest.raises(openai.BadRequestError) as ei:
        rig.client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=[{"role": "user", "content": parts}])
    err = ei.value.body
    assert isinstance(err, dict) and err["code"] == "unsupported_modality" and err["param"] == "messages"
    assert f"Models that accept image input: {CLAUDE}, {GPT}" in err["message"]


# ---- fallback and provider faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "stream"), [("529", False), ("529", True), ("in_band", True), ("401", False)])
def test_anthropic_fault_falls_back_to_the_next_deployment(rig: Rig, fault: str, stream: bool) -> None:
    rig.flaky.configure(error_rate=1, error_kind=fault)
    raw = rig.client.chat.completions.with_raw_response.create(
        model="test/claude-fallback", messages=[{"role": "user", "content": "hello"}], stream=stream)
    assert raw.headers["x-therouter-provider"] == "anthropic-backup"
    r = raw.parse()
    gen_id = next(iter(r)).id if stream else r.id  # type: ignore[call-overload]
    if stream:
        list(r)  # type: ignore[call-overload]
    rec = generation(rig, gen_id)
    first, second = rec["attempts"]
    assert first["provider"] == "anthropic-flaky" and second["provider"] == "anthropic-backup"
    assert second["outcome"] == "ok"
    assert ANTHROPIC_KEY not in json.dumps(rec) and ANTHROPIC_KEY not in rig.gw.logs()


def test_invalid_request_is_the_clients_400(rig: Rig) -> None:
    rig.claude.configure(error_rate=1, error_kind="400")
    with pytest.raises(openai.BadRequestError) as ei:
        rig.client.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hello"}])
    assert "Invalid request" in str(ei.value)


# ---- LangChain's ChatOpenAI, unchanged ------------------------------------------------------------------------------


def _langchain(rig: Rig, model: str = CLAUDE, **kw: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=rig.gw.v1, api_key=rig.key, max_retries=0, timeout=30, **kw)


def test_langchain_tools_round_trip(rig: Rig) -> None:
    """ChatOpenAI drops reasoning_details: the second turn is answered without thinking rather than refused."""
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = _langchain(rig, reasoning_effort="high").bind_tools([WEATHER])
    history: list[Any] = [HumanMessage("What is the weather in Paris?")]
    ai = llm.invoke(history)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather" and ai.tool_calls[0]["args"] == {"city": "Paris"}
    history += [ai, ToolMessage("18C", tool_call_id=ai.tool_calls[0]["id"])]
    final = llm.invoke(history)
    assert final.content and not final.tool_calls
    back = rig.claude.last()["body"]
    assert back["messages"][1]["content"] == [{"type": "tool_use", "id": ai.tool_calls[0]["id"],
                                               "name": "get_weather", "input": {"city": "Paris"}}]
    assert "thinking" not in back


def test_langchain_structured_output_stream_usage_and_image(rig: Rig) -> None:
    from langchain_core.messages import HumanMessage

    parsed = _langchain(rig).with_structured_output(Weather, method="json_schema").invoke("Weather in Paris?")
    assert parsed == Weather(answer=42, unit="C")
    chunks = list(_langchain(rig, stream_usage=True).stream("Hi there"))
    text = "".join(str(c.content) for c in chunks)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert text.startswith("tok0") and usage and usage[-1]["output_tokens"] == 8
    image = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}])
    assert _langchain(rig).invoke([image]).content
    assert rig.claude.last()["body"]["messages"][0]["content"][1]["type"] == "image"


# ---- OpenAI-routed: the same client script ------------------------------------------------------------------------


def test_openai_routed_model_tools_json_stream(rig: Rig) -> None:
    c = rig.client
    r = c.chat.completions.create(model=GPT, messages=[{"role": "developer", "content": "Be brief."},
                                                       {"role": "user", "content": "Weather in Paris?"}],
                                  tools=[WEATHER], max_tokens=300, reasoning_effort="low")
    assert r.choices[0].finish_reason == "tool_calls"
    sent = rig.gpt.last()
    assert sent["headers"]["authorization"] == "valid"
    assert sent["body"]["max_completion_tokens"] == 300 and "max_tokens" not in sent["body"]
    assert sent["body"]["messages"][0]["role"] == "developer" and sent["body"]["reasoning_effort"] == "low"
    assert r.usage is not None and r.usage.completion_tokens_details.reasoning_tokens == 4  # type: ignore[union-attr]
    parsed = c.chat.completions.parse(model=GPT, response_format=Weather,
                                      messages=[{"role": "user", "content": "Weather in Paris, JSON"}])
    assert parsed.choices[0].message.content
    chunks = list(c.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert generation(rig, chunks[-1].id)["provider"] == "openai"


def test_keys_never_leak(rig: Rig, tmp_path: Path) -> None:
    rig.claude.configure(error_rate=1, error_kind="401", echo_request=True)
    with pytest.raises(openai.APIStatusError) as ei:
        rig.client.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hello"}])
    assert ei.value.status_code != 401  # our credentials at the provider are never the client's 401
    assert ANTHROPIC_KEY not in str(ei.value.body) and ANTHROPIC_KEY not in rig.gw.logs()


# ---- one client script, three providers ----------------------------------------------------------------------------


class Answer(BaseModel):
    answer: str


@pytest.mark.parametrize("model", ["deepseek/deepseek-v3.2", CLAUDE, GPT])
def test_the_same_client_script_gives_equivalent_results(rig: Rig, model: str) -> None:
    """Tools, a JSON schema, a stream with usage and (where the model takes one) an image: the same code and the
    same answers' shapes through the DeepSeek, Anthropic and OpenAI adapters, each metered at its own prices."""
    c = rig.client
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    parsed = c.chat.completions.parse(model=model, response_format=Answer,
                                      messages=[{"role": "user", "content": "Answer in JSON"}])
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    rec = generation(rig, chunks[-1].id)
    assert rec["model"] == model and Decimal(rec["cost_usd"]) == Decimal(str(usage.model_extra["cost"]))  # type: ignore[index]
    if model != "deepseek/deepseek-v3.2":  # the two that take images
        img = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
        assert c.chat.completions.create(model=model, messages=[{"role": "user", "content": img}]).choices[0]
