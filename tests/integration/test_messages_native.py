"""/v1/messages served by a ``kind: anthropic`` deployment: the native relay, through the real gateway (a fake
Anthropic upstream, a fake self-hosted vLLM, redis-server) with the official ``anthropic`` SDK.

The upstream's answer reaches the client as it came -- every event in order, citations, signature deltas, redacted
thinking -- with only ``id`` and ``model`` rewritten; it is metered from the upstream's own usage (cache reads and
writes included) at the served model's price; the first-chunk gate still falls back (to a translated self-hosted
deployment, in the same client stream); a failure after the first byte is an ``error`` event the record names.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
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
from therouter.fakeupstream.anthropic import signature
from therouter.redisproc import RedisProcess

ANTHROPIC_KEY = "sk-ant-api03-NATIVE-5c1d"
METRICS_TOKEN = "metrics-native-token"
NATIVE = "claude-native-4"  # a pattern alias of anthropic/claude-native: the answer's model is this id
CANONICAL = "anthropic/claude-native"
BETA = "pdfs-2024-09-25,interleaved-thinking-2025-05-14"
# USD per 1M tokens: every count is billed at its own rate
PRICES = {"input": 3, "cached_input": 0.3, "cache_write": 3.75, "output": 15}
DOC = {"type": "document", "title": "Memo", "citations": {"enabled": True},
       "source": {"type": "text", "media_type": "text/plain", "data": "The sky over Oslo is green on Tuesdays."}}
ASK = [{"role": "user", "content": [DOC, {"type": "text", "text": "What colour is the sky in Oslo?"}]}]
HELLO = [{"role": "user", "content": "Hello there"}]


@dataclass
class Rig:
    gw: Gateway
    claude: Fake
    vllm: Fake

    def client(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.gw.url, api_key=key, max_retries=0, timeout=30)

    def key(self) -> str:
        return asyncio.run(make_key(self.gw, f"native-{uuid.uuid4().hex[:6]}"))

    def get(self, path: str, key: str, **params: str) -> dict[str, Any]:
        r = httpx.get(self.gw.v1 + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def rig(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("native")
    claude = start_fake("anthropic", ANTHROPIC_KEY, "--models", "*")
    cfg = own_config(redis_proc.url, fakes, tmp, "nv")
    cfg["server"].update(log_format="json", metrics_token=METRICS_TOKEN)
    cfg["routing"] = {"breaker": {"consecutive_failures": 100}}  # failures on purpose never eject a deployment
    cfg["providers"]["anthropic"] = anthropic_provider(claude)
    card = cfg["models"]["selfhost/only-vllm"]
    cfg["models"][CANONICAL] = {
        **card, "context_length": 200000, "max_output_tokens": 8192, "pricing": PRICES, "aliases": ["claude-native-*"],
        "supported_parameters": ["max_tokens", "tools", "tool_choice", "stop", "temperature"],
        "deployments": [  # hosted Anthropic first, then a self-hosted DeepSeek served through the translation
            {"provider": "anthropic", "model": "claude-opus-4-7", "priority": 0,
             "capabilities": ["tools", "json_object", "reasoning"]},
            {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2", "priority": 1,
             "capabilities": ["tools", "json_object"]}]}
    with running(start_gateway(cfg, tmp, {"TEST_ANTHROPIC_KEY": ANTHROPIC_KEY}), claude) as gw:
        yield Rig(gw, claude, fakes["vllm"])


@pytest.fixture(autouse=True)
def _clean_claude(rig: Rig) -> Iterator[None]:
    yield
    rig.claude.configure(error_rate=0, cached_tokens=0, cache_write_tokens=0, redacted_thinking=False, reasoning=None)


def sse(raw: str) -> list[dict[str, Any]]:
    """Anthropic's SSE frames, each checked: ``event:`` names the data's ``type``."""
    out = []
    for frame in raw.split("\n\n"):
        if not frame.strip():
            continue
        name, data = frame.strip().split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), frame
        obj = json.loads(data[6:])
        assert obj["type"] == name[7:]
        out.append(obj)
    return out


def stream_raw(url: str, body: dict[str, Any], key: str, **headers: str) -> httpx.Response:
    with httpx.stream("POST", url + "/v1/messages", json={**body, "stream": True}, timeout=30,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01", **headers}) as r:
        r.read()
        return r


def cost_nano(u: dict[str, Any]) -> int:
    """The price book's rule: cache reads at cached_input, writes at cache_write, the rest of the prompt at input."""
    nano = {k: int(v * 10**9) for k, v in PRICES.items()}
    cached, written = u["prompt_tokens_details"]["cached_tokens"], u["prompt_tokens_details"]["cache_write_tokens"]
    n = ((u["prompt_tokens"] - cached - written) * nano["input"] + cached * nano["cached_input"]
         + written * nano["cache_write"] + u["completion_tokens"] * nano["output"])
    return (n + 500_000) // 1_000_000


def test_native_stream_is_relayed_event_for_event_and_metered(rig: Rig) -> None:
    rig.claude.configure(redacted_thinking=True, cached_tokens=5, cache_write_tokens=3)
    key = rig.key()
    body = {"model": NATIVE, "max_tokens": 2048, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    r = stream_raw(rig.gw.url, body, key, **{"anthropic-beta": BETA})
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "anthropic"
    got = sse(r.text)
    # the request went up as it came, with the client's beta header (never its key: the fake checks ours)
    sent = rig.claude.last()
    assert sent["headers"]["anthropic-beta"] == BETA and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["messages"] == ASK and sent["body"]["model"] == "claude-opus-4-7"
    # what the upstream sends for that very request, asked directly: the same events, in the same order
    direct = httpx.post(rig.claude.url + "/v1/messages", json=sent["body"], timeout=30,
                        headers={"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"})
    upstream = sse(direct.text)
    gen_id = r.headers["x-therouter-generation-id"]
    assert got[0]["message"]["id"] == gen_id and got[0]["message"]["model"] == NATIVE
    assert upstream[0]["message"]["id"].startswith("msg_") and upstream[0]["message"]["model"] == "claude-opus-4-7"
    for ev in (got[0], upstream[0]):
        del ev["message"]["id"], ev["message"]["model"]
    assert got == upstream
    deltas = [e["delta"]["type"] for e in got if e["type"] == "content_block_delta"]
    assert {"thinking_delta", "signature_delta", "citations_delta", "text_delta"} <= set(deltas)
    assert [e["content_block"]["type"] for e in got if e["type"] == "content_block_start"] == \
        ["thinking", "redacted_thinking", "text"]
    # metered from message_start / message_delta usage, at the served model's price
    start, end = got[0]["message"]["usage"], next(e for e in got if e["type"] == "message_delta")["usage"]
    rec = rig.get("/generation", key, id=gen_id)
    u = rec["usage"]
    read, written = start["cache_read_input_tokens"], start["cache_creation_input_tokens"]
    assert read == 5 and written > 0
    assert (u["prompt_tokens_details"]["cached_tokens"], u["prompt_tokens_details"]["cache_write_tokens"]) == \
        (read, written)
    assert u["prompt_tokens"] == start["input_tokens"] + read + written and u["completion_tokens"] == end["output_tokens"]
    assert rec["cost_nano"] == cost_nano(u) > 0 and rec["outcome"] == "completed" and rec["stream"] is True
    assert (rec["model"], rec["provider"], rec["upstream_model"]) == (CANONICAL, "anthropic", "claude-opus-4-7")
    assert rec["finish_reason"] == "stop" and not u.get("estimated")
    info = rig.get("/key", key)
    assert info["total_spend_nano"] == rec["cost_nano"] and info["requests"] == 1
    # the SDK assembles the same stream: thinking signed, the redacted block, the text with its citation
    with rig.client(key).messages.stream(**body) as s:  # type: ignore[arg-type]
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "redacted_thinking", "text"]
    thinking, text = final.content[0], final.content[2]
    assert thinking.signature == signature(thinking.thinking)  # type: ignore[union-attr]
    cite = text.citations[0]  # type: ignore[union-attr]
    assert cite.cited_text == DOC["source"]["data"] and cite.document_title == "Memo"  # type: ignore[index, union-attr]
    assert final.model == NATIVE and final.usage.cache_creation_input_tokens == written


def test_native_json_is_the_upstreams_message_metered_from_its_usage(rig: Rig) -> None:
    rig.claude.configure(cached_tokens=1, cache_write_tokens=2)
    key = rig.key()
    raw = rig.client(key).messages.with_raw_response.create(model=NATIVE, max_tokens=256, messages=ASK,  # type: ignore[arg-type]
                                                            extra_headers={"anthropic-beta": BETA})
    msg = raw.parse()
    assert raw.headers["x-therouter-provider"] == "anthropic"
    assert msg.id == raw.headers["x-therouter-generation-id"] and msg.model == NATIVE
    text = msg.content[0]
    assert text.type == "text" and text.citations and text.citations[0].cited_text == DOC["source"]["data"]  # type: ignore[index]
    assert (msg.usage.cache_read_input_tokens, msg.usage.cache_creation_input_tokens) == (1, 2)
    assert rig.claude.last()["headers"]["anthropic-beta"] == BETA
    body = json.loads(raw.http_response.text)
    assert set(body) == {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    assert body["usage"]["service_tier"] == "standard"  # what OpenAI's shape has no field for survives too
    rec = rig.get("/generation", key, id=msg.id)
    u = rec["usage"]
    assert u["prompt_tokens"] == msg.usage.input_tokens + 1 + 2 and u["completion_tokens"] == msg.usage.output_tokens
    assert rec["cost_nano"] == cost_nano(u) > 0 and rec["stream"] is False and rec["provider"] == "anthropic"
    assert rig.get("/key", key)["total_spend_nano"] == rec["cost_nano"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_end_to_end(rig: Rig, stream: bool) -> None:
    """Anthropic's stop_sequences: relayed from a native deployment, translated from vLLM and SGLang (which name the
    stop string they matched): either way the text ends before it and the answer says stop_sequence."""
    key = rig.key()
    c = rig.client(key)
    for model, provider in ((NATIVE, "anthropic"), ("selfhost/only-vllm", "vllm-local"),
                            ("selfhost/only-sglang", "sglang-local")):
        kw: dict[str, Any] = {"model": model, "max_tokens": 64, "messages": HELLO, "stop_sequences": ["never", "tok3"]}
        if stream:
            with c.messages.stream(**kw) as s:
                msg = s.get_final_message()
        else:
            msg = c.messages.create(**kw)
        text = msg.content[0]
        assert text.type == "text" and text.text == "tok0 tok1 tok2 ", provider
        assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "tok3"), provider
    assert rig.vllm.last()["body"]["stop"] == ["never", "tok3"]
    assert rig.claude.last()["body"]["stop_sequences"] == ["never", "tok3"]


def test_documents_are_refused_where_no_native_deployment_may_serve(rig: Rig) -> None:
    c = rig.client(rig.key())
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="selfhost/only-vllm", max_tokens=16, messages=ASK)  # type: ignore[arg-type]
    err = e.value.response.json()["error"]
    assert err["type"] == "invalid_request_error" and "document blocks" in err["message"]
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="selfhost/only-vllm", max_tokens=16, messages=HELLO, tools=tools)
    assert "server tools" in e.value.response.json()["error"]["message"]
    # the native deployment takes both
    msg = c.messages.create(model=NATIVE, max_tokens=16, messages=ASK, tools=tools)  # type: ignore[arg-type]
    assert msg.model == NATIVE and rig.claude.last()["body"]["tools"] == tools


@pytest.mark.parametrize("kind", ["in_band", "529"])
def test_native_failing_before_the_first_byte_falls_back_to_a_translated_deployment(rig: Rig, kind: str) -> None:
    """An error event before any content (or an overloaded 529) fails the attempt at the gate: the self-hosted
    DeepSeek serves the same client stream, translated into Anthropic's events."""
    rig.claude.configure(error_rate=1, error_kind=kind)
    key = rig.key()
    r = stream_raw(rig.gw.url, {"model": NATIVE, "max_tokens": 32, "messages": HELLO}, key)
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "vllm-local"
    events = sse(r.text)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"] and "error" not in kinds
    assert events[0]["message"]["id"] == r.headers["x-therouter-generation-id"]
    assert events[0]["message"]["model"] == NATIVE
    assert "messages" in rig.vllm.last()["body"] and rig.vllm.last()["body"]["model"] == "deepseek-ai/DeepSeek-V3.2"
    rec = rig.get("/generation", key, id=r.headers["x-therouter-generation-id"])
    assert rec["attempts"][0]["provider"] == "anthropic" and rec["provider"] == "vllm-local"
    assert rec["outcome"] == "completed" and rec["cost_nano"] > 0
    with rig.client(key).messages.stream(model=NATIVE, max_tokens=32, messages=HELLO) as s:  # type: ignore[arg-type]
        final = s.get_final_message()
    assert final.content[0].type == "text" and final.model == NATIVE


@pytest.mark.parametrize("kind,outcome,code", [("in_band_mid", "upstream_error", "upstream_in_band_error"),
                                               ("cut", "upstream_cut", "upstream_stream_error")])
def test_native_failure_after_the_first_byte_is_an_error_event(rig: Rig, kind: str, outcome: str, code: str) -> None:
    rig.claude.configure(error_rate=1, error_kind=kind, cut_after=2, cached_tokens=2)
    key = rig.key()
    r = stream_raw(rig.gw.url, {"model": NATIVE, "max_tokens": 64, "messages": HELLO}, key)
    events = sse(r.text)
    kinds = [e["type"] for e in events]
    assert r.status_code == 200 and kinds[0] == "message_start" and "content_block_delta" in kinds
    assert kinds[-1] == "error" and "message_stop" not in kinds
    err = events[-1]["error"]
    assert err["type"] == "api_error" and err["message"].startswith("Provider `anthropic` failed mid-stream")
    assert ANTHROPIC_KEY not in r.text
    rec = rig.get("/generation", key, id=r.headers["x-therouter-generation-id"])
    assert rec["outcome"] == outcome and rec["attempts"][-1]["stream_error"]["code"] == code
    # billed: the input counts message_start reported (the upstream's own), the text relayed estimated
    u = rec["usage"]
    assert u["prompt_tokens"] == events[0]["message"]["usage"]["input_tokens"] + 2 and u["completion_tokens"] >= 1
    assert u["prompt_tokens_details"]["cached_tokens"] == 2 and u.get("estimated") is True
    assert rec["cost_nano"] > 0 and rig.get("/key", key)["total_spend_nano"] == rec["cost_nano"]
    with pytest.raises(anthropic.APIStatusError), rig.client(key).messages.stream(
            model=NATIVE, max_tokens=64, messages=HELLO) as s:  # type: ignore[arg-type]
        s.get_final_message()


def test_messages_requests_are_labelled_messages(rig: Rig) -> None:
    key = rig.key()
    rig.client(key).messages.create(model=NATIVE, max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    httpx.post(rig.gw.url + "/v1/chat/completions", json={"model": "selfhost/only-vllm", "messages": HELLO},
               headers={"Authorization": f"Bearer {key}"}, timeout=10).raise_for_status()
    httpx.post(rig.gw.url + "/v1/messages", json={"model": NATIVE, "max_tokens": 8, "messages": HELLO},
               headers={"x-api-key": "sk-not-a-key"}, timeout=10)  # refused before the gateway: labelled too
    m = httpx.get(rig.gw.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).text
    assert f'therouter_requests_total{{code="200",endpoint="messages",model="{CANONICAL}",provider="anthropic"}}' in m
    assert 'code="401",endpoint="messages"' in m
    assert 'code="200",endpoint="chat",model="selfhost/only-vllm",provider="vllm-local"' in m
    lines = [json.loads(ln) for ln in rig.gw.logs().splitlines() if ln.startswith("{")]
    requests = [ln for ln in lines if ln.get("event") == "request"]
    assert {"messages", "chat"} <= {ln.get("endpoint") for ln in requests}
    assert all(ln.get("endpoint") in ("messages", "chat") for ln in requests)
