"""/v1/messages through the real gateway with the official ``anthropic`` SDK: Anthropic model ids resolved by a
pattern alias to deepseek/deepseek-v3.2 (fake DeepSeek, then self-hosted fallbacks), routed, metered and recorded like
/v1/chat/completions; answers, streams and errors in Anthropic's shapes and statuses."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.integration.conftest import (
    Fake,
    Gateway,
    anthropic_provider,
    make_key,
    own_config,
    running,
    start_fake,
    start_gateway,
)
from therouter.redisproc import RedisProcess

CLAUDE_MODEL = "claude-sonnet-4-6"
ANTHROPIC_KEY = "sk-ant-api03-CANARY-77e1a0"
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HELLO = [{"role": "user", "content": "Hello there"}]


@dataclass
class Rig:
    gw: Gateway
    key: str
    fakes: dict[str, Fake]
    claude: Fake

    def client(self, key: str | None = None, **kw: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.gw.url, api_key=key or self.key, max_retries=kw.pop("max_retries", 0),
                                   timeout=30, **kw)


@pytest.fixture(scope="module")
def rig(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("messages")
    claude = start_fake("anthropic", ANTHROPIC_KEY, "--models", "*")
    cfg = own_config(redis_proc.url, fakes, tmp, "am")
    cfg["models"]["deepseek/deepseek-v3.2"]["aliases"] = ["claude-*", "claude-haiku-exact"]
    cfg["models"]["selfhost/only-sglang"]["aliases"] = ["claude-haiku-*"]  # longer pattern: wins for haiku ids
    cfg["providers"]["anthropic"] = anthropic_provider(claude)
    card = dict(cfg["models"]["selfhost/only-vllm"])
    cfg["models"]["anthropic/claude-test"] = {
        **card, "context_length": 200000, "max_output_tokens": 8192, "supported_parameters": ["max_tokens", "tools", "tool_choice", "stop", "temperature"],
        "deployments": [{"provider": "anthropic", "model": "claude-opus-4-7",
                         "capabilities": ["tools", "json_object", "reasoning"]}]}
    with running(start_gateway(cfg, tmp, {"TEST_ANTHROPIC_KEY": ANTHROPIC_KEY}), claude) as gw:
        yield Rig(gw, asyncio.run(make_key(gw, "messages")), fakes, claude)


def generation(rig: Rig, gen_id: str, key: str | None = None) -> dict[str, Any]:
    r = httpx.get(rig.gw.v1 + "/generation", params={"id": gen_id},
                  headers={"Authorization": f"Bearer {key or rig.key}"}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]  # type: ignore[no-any-return]


def sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.split("\n\n"):
        lines = frame.strip().split("\n")
        if len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "):
            data = json.loads(lines[1][6:])
            assert data["type"] == lines[0][7:]
            out.append((lines[0][7:], data))
        else:
            assert frame.strip() == "", frame
    return out


def stream_raw(rig: Rig, body: dict[str, Any], path: str = "/v1/messages") -> tuple[httpx.Response, str]:
    with httpx.stream("POST", rig.gw.url + path, json={**body, "stream": True}, timeout=30,
                      headers={"x-api-key": rig.key, "anthropic-version": "2023-06-01"}) as r:
        return r, r.read().decode()


# ---- answers ---------------------------------------------------------------------------------------------------------


def test_plain_message_is_routed_metered_and_recorded(rig: Rig) -> None:
    raw = rig.client().messages.with_raw_response.create(
        model=CLAUDE_MODEL, max_tokens=64, system=[{"type": "text", "text": "Be brief.",
                                                    "cache_control": {"type": "ephemeral"}}],
        messages=HELLO, metadata={"user_id": "u-42"}, extra_body={"temperature": 0.5})
    msg = raw.parse()
    assert raw.headers["x-therouter-provider"] == "deepseek"
    assert msg.type == "message" and msg.role == "assistant" and msg.model == CLAUDE_MODEL
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    assert msg.usage.cache_read_input_tokens == 0 and msg.usage.cache_creation_input_tokens == 0
    sent = rig.fakes["deepseek"].last()["body"]  # the upstream got an OpenAI chat request, cache_control dropped
    assert sent["model"] == "deepseek-v3.2" and sent["max_tokens"] == 64 and sent["temperature"] == 0.5
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1] == {"role": "user", "content": "Hello there"}
    rec = generation(rig, msg.id)
    assert rec["model"] == "deepseek/deepseek-v3.2" and rec["provider"] == "deepseek"
    assert rec["upstream_model"] == "deepseek-v3.2" and rec["outcome"] == "completed" and rec["stream"] is False
    assert rec["usage"]["completion_tokens"] == msg.usage.output_tokens and rec["cost_nano"] > 0


def test_anthropic_prefix_and_bearer_auth_and_alias_precedence(rig: Rig) -> None:
    c = anthropic.Anthropic(base_url=rig.gw.url + "/anthropic", auth_token=rig.key, max_retries=0)  # Bearer
    for model, provider in (("claude-opus-4-7-20260101", "deepseek"), ("claude-haiku-4-5-20251001", "sglang-local"),
                            ("claude-haiku-exact", "deepseek"), ("deepseek/deepseek-v3.2", "deepseek")):
        raw = c.messages.with_raw_response.create(model=model, max_tokens=16, messages=HELLO)
        assert raw.headers["x-therouter-provider"] == provider, model
        assert raw.parse().model == model


def test_stream_every_event_in_order_with_thinking(rig: Rig) -> None:
    rig.fakes["deepseek"].configure(reasoning=True)
    r, text = stream_raw(rig, {"model": CLAUDE_MODEL, "max_tokens": 64, "messages": HELLO})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(text)
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["model"] == CLAUDE_MODEL and start["role"] == "assistant" and start["content"] == []
    assert start["usage"]["input_tokens"] > 0 and start["id"] == r.headers["x-therouter-generation-id"]
    body = kinds[1:-2]
    # block 0 thinking, block 1 text: start, deltas, stop each, in order
    assert body[0] == "content_block_start" and events[1][1]["content_block"]["type"] == "thinking"
    stops = [i for i, k in enumerate(body) if k == "content_block_stop"]
    assert len(stops) == 2 and body[stops[0] + 1] == "content_block_start" and body[-1] == "content_block_stop"
    blocks: dict[int, list[dict[str, Any]]] = {}
    for k, d in events:
        if k == "content_block_delta":
            blocks.setdefault(d["index"], []).append(d["delta"])
    assert {x["type"] for x in blocks[0]} == {"thinking_delta"} and {x["type"] for x in blocks[1]} == {"text_delta"}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0
    # the SDK assembles the same stream
    with rig.client().messages.stream(model=CLAUDE_MODEL, max_tokens=64, messages=HELLO) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and final.usage.output_tokens > 0
    assert final.content[1].text == "".join(x["text"] for x in blocks[1])  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip_with_thinking_sent_back(rig: Rig, stream: bool) -> None:
    rig.fakes["deepseek"].configure(reasoning=True)
    c = rig.client()
    first_turn: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    kw: dict[str, Any] = {"model": CLAUDE_MODEL, "max_tokens": 256, "tools": [WEATHER],
                          "tool_choice": {"type": "auto"}}
    if stream:
        with c.messages.stream(messages=first_turn, **kw) as s:  # type: ignore[arg-type]
            msg = s.get_final_message()
    else:
        msg = c.messages.create(messages=first_turn, **kw)  # type: ignore[arg-type]
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    use = msg.content[1]
    assert use.name == "get_weather" and isinstance(use.input, dict) and "city" in use.input  # type: ignore[union-attr]
    sent_up = rig.fakes["deepseek"].last()["body"]
    assert sent_up["tools"][0]["function"]["parameters"] == WEATHER["input_schema"] and sent_up["tool_choice"] == "auto"
    # next turn: the assistant's blocks (thinking included) as they came, then the tool's result
    second = [*first_turn, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"},
                                           {"type": "text", "text": "Thanks!"}]}]
    msg2 = c.messages.create(messages=second, **kw)  # type: ignore[arg-type]
    assert msg2.stop_reason in ("end_turn", "tool_use")
    body = rig.fakes["deepseek"].last()["body"]
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "tool", "user"]
    asst = body["messages"][1]
    assert asst["tool_calls"][0]["id"] == use.id and json.loads(asst["tool_calls"][0]["function"]["arguments"]) == \
        use.input  # type: ignore[union-attr]
    assert asst["reasoning_content"] == msg.content[0].thinking  # type: ignore[union-attr]
    assert body["messages"][2] == {"role": "tool", "tool_call_id": use.id, "content": "18 C"}
    assert body["messages"][3] == {"role": "user", "content": "Thanks!"}


def test_stop_sequences_and_tool_choice_go_upstream(rig: Rig) -> None:
    msg = rig.client().messages.create(model=CLAUDE_MODEL, max_tokens=32, messages=HELLO, stop_sequences=["w3", "END"],
                                       extra_body={"top_p": 0.9}, tools=[WEATHER],  # type: ignore[list-item]
                                       tool_choice={"type": "tool", "name": "get_weather",
                                                    "disable_parallel_tool_use": True})
    assert msg.stop_reason == "tool_use"
    body = rig.fakes["deepseek"].last()["body"]
    assert body["stop"] == ["w3", "END"] and body["top_p"] == 0.9
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_max_tokens_stop_reason(rig: Rig) -> None:
    msg = rig.client().messages.create(model=CLAUDE_MODEL, max_tokens=3, messages=HELLO)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens <= 3


def test_count_tokens(rig: Rig) -> None:
    c = rig.client()
    short = c.messages.count_tokens(model=CLAUDE_MODEL, messages=HELLO)
    long = c.messages.count_tokens(model=CLAUDE_MODEL, system="You are a careful assistant. " * 50, messages=HELLO,
                                   tools=[WEATHER])  # type: ignore[list-item]
    assert 0 < short.input_tokens < long.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        c.messages.count_tokens(model="gpt-nothing", messages=HELLO)
    # the same estimate the gateway reserves for: a message's input_tokens before usage arrives (stream start)
    _, text = stream_raw(rig, {"model": CLAUDE_MODEL, "max_tokens": 8, "messages": HELLO})
    assert sse(text)[0][1]["message"]["usage"]["input_tokens"] == short.input_tokens


# ---- routing ---------------------------------------------------------------------------------------------------------


def test_fallback_from_failing_hosted_to_self_hosted(rig: Rig) -> None:
    rig.fakes["deepseek"].configure(error_rate=1, error_kind="500")
    raw = rig.client().messages.with_raw_response.create(model=CLAUDE_MODEL, max_tokens=32, messages=HELLO)
    msg = raw.parse()
    assert raw.headers["x-therouter-provider"] == "vllm-local" and msg.content[0].type == "text"
    rec = generation(rig, msg.id)
    assert [a["provider"] for a in rec["attempts"]][:2] == ["deepseek", "vllm-local"]
    assert rec["provider"] == "vllm-local" and rec["cost_nano"] > 0


def test_anthropic_deployment_gets_the_request_natively(rig: Rig) -> None:
    """An Anthropic deployment behind /v1/messages gets the client's own Messages body: cache_control and the
    thinking signature sent back survive (the fake's request log), the output limit is the checked one; thinking comes
    back signed and cache reads / writes are reported in Anthropic's usage fields."""
    c = rig.client()
    rig.claude.configure(cached_tokens=5, cache_write_tokens=3)
    try:
        kw: dict[str, Any] = {
            "model": "anthropic/claude-test", "max_tokens": 4096, "tools": [WEATHER],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "system": [{"type": "text", "text": "You are terse. " * 20, "cache_control": {"type": "ephemeral"}}]}
        turn = [{"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?",
                                              "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]
        raw = c.messages.with_raw_response.create(messages=turn, **kw)  # type: ignore[arg-type]
        msg = raw.parse()
    finally:
        rig.claude.configure(cached_tokens=0, cache_write_tokens=0)
    assert raw.headers["x-therouter-provider"] == "anthropic" and msg.model == "anthropic/claude-test"
    assert msg.usage.cache_read_input_tokens == 5 and msg.usage.cache_creation_input_tokens == 3
    assert msg.usage.input_tokens > 0
    up = rig.claude.last()["body"]
    assert up["model"] == "claude-opus-4-7" and up["max_tokens"] == 4096
    assert up["system"] == kw["system"] and up["messages"] == turn and up["tools"] == [WEATHER]
    assert up["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    kinds = [b.type for b in msg.content]
    assert kinds[0] == "thinking" and "tool_use" in kinds
    signature = msg.content[0].signature  # type: ignore[union-attr]
    assert signature
    use = next(b for b in msg.content if b.type == "tool_use")
    sent_back = [b.model_dump(exclude_none=True) for b in msg.content]
    second = [*turn, {"role": "assistant", "content": sent_back},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "2 C"}]}]
    with c.messages.stream(messages=second, **kw) as s:  # type: ignore[arg-type]
        s.get_final_message()
    up = rig.claude.last()["body"]
    assert up["stream"] is True and up["messages"][1]["content"] == sent_back
    assert up["messages"][1]["content"][0]["signature"] == signature
    assert generation(rig, msg.id)["usage"]["prompt_tokens_details"]["cached_tokens"] == 5


# ---- errors ----------------------------------------------------------------------------------------------------------


def _error(e: anthropic.APIStatusError) -> dict[str, Any]:
    body = e.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]  # type: ignore[no-any-return]


def test_errors_raise_the_sdks_exceptions(rig: Rig) -> None:
    c = rig.client()
    with pytest.raises(anthropic.BadRequestError) as bad:
        c.messages.create(model=CLAUDE_MODEL, max_tokens=0, messages=HELLO)
    assert _error(bad.value)["type"] == "invalid_request_error" and "max_tokens" in _error(bad.value)["message"]
    r = httpx.post(rig.gw.url + "/v1/messages", json={"model": CLAUDE_MODEL, "messages": HELLO},
                   headers={"x-api-key": rig.key})  # max_tokens is required, as Anthropic requires it
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(rig.gw.url + "/v1/messages", content=b"{not json", headers={"x-api-key": rig.key})
    assert r.status_code == 400 and r.json()["type"] == "error"
    with pytest.raises(anthropic.BadRequestError):
        c.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=[{"role": "system", "content": "x"}])  # type: ignore[list-item, misc]
    with pytest.raises(anthropic.AuthenticationError) as unauth:
        rig.client(key="sk-wrong").messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=HELLO)
    assert _error(unauth.value)["type"] == "authentication_error"
    limited = asyncio.run(make_key(rig.gw, "limited", models=("selfhost/only-vllm",)))
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        rig.client(key=limited).messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=HELLO)
    assert _error(denied.value)["type"] == "permission_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        c.messages.create(model="gpt-nothing", max_tokens=8, messages=HELLO)
    assert _error(missing.value)["type"] == "not_found_error"
    with pytest.raises(anthropic.ContentTooLargeError) as big:
        c.messages.create(model=CLAUDE_MODEL, max_tokens=8,
                          messages=[{"role": "user", "content": "x" * (11 * 1024 * 1024)}])
    assert _error(big.value)["type"] == "request_too_large"


def test_every_deployment_overloaded_is_529(rig: Rig) -> None:
    rig.fakes["sglang"].configure(error_rate=1, error_kind="429", retry_after=1)
    with pytest.raises(anthropic.OverloadedError) as e:
        rig.client().messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HELLO)  # -> only-sglang
    assert e.value.status_code == 529 and _error(e.value)["type"] == "overloaded_error"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_every_deployment_failing_is_an_api_error(rig: Rig) -> None:
    rig.fakes["vllm"].configure(error_rate=1, error_kind="500")
    with pytest.raises(anthropic.InternalServerError) as e:
        rig.client().messages.create(model="selfhost/only-vllm", max_tokens=8, messages=HELLO)
    assert e.value.status_code >= 500 and _error(e.value)["type"] == "api_error"


def test_rate_limit_through_messages(rig: Rig) -> None:
    key = asyncio.run(make_key(rig.gw, "rpm", rpm=1))
    c = rig.client(key=key)
    c.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=HELLO)
    assert _error(e.value)["type"] == "rate_limit_error" and int(e.value.response.headers["retry-after"]) >= 1


def test_budget_exhausted_is_402_billing_error_and_not_retried(rig: Rig) -> None:
    key = asyncio.run(make_key(rig.gw, "poor", budget_nano=10))
    before = len(rig.fakes["deepseek"].stats()["log"])
    c = rig.client(key=key, max_retries=2)  # the SDK's default retries: a 402 is not retried
    with pytest.raises(anthropic.PaymentRequiredError) as e:
        c.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=HELLO)
    assert e.value.status_code == 402 and _error(e.value)["type"] == "billing_error"
    assert "budget" in _error(e.value)["message"].lower()
    assert e.value.response.headers["x-should-retry"] == "false"
    assert len(rig.fakes["deepseek"].stats()["log"]) == before


def test_failure_after_the_first_event_is_an_error_event(rig: Rig) -> None:
    rig.fakes["deepseek"].configure(error_rate=1, error_kind="cut", cut_after=3)
    r, text = stream_raw(rig, {"model": CLAUDE_MODEL, "max_tokens": 64, "messages": HELLO})
    events = sse(text)
    assert r.status_code == 200 and events[0][0] == "message_start"
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [k for k, _ in events]
    rec = generation(rig, r.headers["x-therouter-generation-id"])
    assert rec["outcome"] == "upstream_cut" and rec["stream"] is True
    with pytest.raises(anthropic.APIStatusError), rig.client().messages.stream(
            model=CLAUDE_MODEL, max_tokens=64, messages=HELLO) as s:
        s.get_final_message()


def test_a_client_leaving_is_a_499_not_a_server_error(rig: Rig) -> None:
    """Agents cancel often: a client that leaves while the first-chunk gate holds the answer cancels the upstream and
    is logged as an ordinary client_cancelled request, never as an exception with a traceback."""
    rig.fakes["deepseek"].configure(ttft_ms=1500)
    seen = len(rig.gw.logs())  # the gateway (and its log) is shared with the module's other tests
    raw = json.dumps({"model": CLAUDE_MODEL, "max_tokens": 16, "messages": HELLO, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", int(rig.gw.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + rig.key.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(raw)).encode()
                  + b"\r\n\r\n" + raw)
        time.sleep(0.3)  # the answer is held at the gate (the upstream thinks for 1.5 s); then the client leaves
    deadline = time.monotonic() + 5
    while "outcome=client_cancelled" not in rig.gw.logs()[seen:] and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = rig.gw.logs()[seen:]
    assert "outcome=client_cancelled" in logs
    assert "Exception in ASGI application" not in logs and "Traceback" not in logs


def test_keys_never_leak(rig: Rig, tmp_path: Path) -> None:
    rig.client().messages.create(model="anthropic/claude-test", max_tokens=16, messages=HELLO)
    assert ANTHROPIC_KEY not in rig.gw.logs()
