"""Tests for the fake upstream simulator (therouter.fakeupstream)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from therouter.fakeupstream import ERROR_KINDS, FakeConfig, KnobError, create_app
from therouter.fakeupstream.cli import build_parser, config_from_args
from therouter.fakeupstream.config import merge_knobs, parse_fault_header
from therouter.fakeupstream.flavors import FIM_BEGIN, FIM_END, FIM_HOLE

MODEL = {"deepseek": "deepseek-v4-flash", "vllm": "deepseek-ai/DeepSeek-V3.2", "sglang": "deepseek-ai/DeepSeek-V3.2"}
FLAVORS = ("deepseek", "vllm", "sglang")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def client(flavor: str = "deepseek", **kw: Any) -> httpx.AsyncClient:
    app = create_app(FakeConfig(flavor=flavor, **kw))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake/v1", timeout=10)


def chat_body(flavor: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL[flavor], "messages": [{"role": "user", "content": "hello world, json!"}]}
    body.update(extra)
    return body


def sse_events(text: str) -> list[str]:
    """Return the raw `data:` payloads (comments dropped) of an SSE body."""
    out = []
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if block.startswith("data: "):
            out.append(block[len("data: "):])
    return out


def sse_json(text: str) -> tuple[list[dict[str, Any]], bool]:
    events = sse_events(text)
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


async def post(c: httpx.AsyncClient, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return await c.post(path, json=body, headers=headers or {})


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_n_choices_each_under_its_index_and_usage_counts_them_all(flavor: str) -> None:
    async with client(flavor) as c:
        one = (await post(c, "/chat/completions", chat_body(flavor))).json()
        two = (await post(c, "/chat/completions", chat_body(flavor, n=2))).json()
        assert [ch["index"] for ch in two["choices"]] == [0, 1]
        assert two["choices"][0]["message"] == two["choices"][1]["message"] == one["choices"][0]["message"]
        assert two["usage"]["completion_tokens"] == 2 * one["usage"]["completion_tokens"]
        assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
        r = await post(c, "/chat/completions", chat_body(flavor, n=2, stream=True,
                                                         stream_options={"include_usage": True}))
        chunks, done = sse_json(r.text)
        assert done
        indexes = [ch["index"] for k in chunks for ch in k.get("choices") or ()]
        assert indexes[:4] == [0, 1, 0, 1]  # interleaved, as vLLM streams several choices
        text = {i: "".join(ch["delta"].get("content") or "" for k in chunks for ch in k.get("choices") or ()
                           if ch["index"] == i) for i in (0, 1)}
        assert text[0] == text[1] == one["choices"][0]["message"]["content"]
        finishes = [ch["finish_reason"] for k in chunks for ch in k.get("choices") or () if ch["finish_reason"]]
        assert finishes == ["stop", "stop"]
        usage = [k["usage"] for k in chunks if k.get("usage")]
        assert len(usage) == 1 and usage[0]["completion_tokens"] == two["usage"]["completion_tokens"]


async def test_deepseek_non_stream_shape_and_usage() -> None:
    async with client("deepseek", cached_tokens=2) as c:
        r = await post(c, "/chat/completions", chat_body("deepseek"))
    assert r.status_code == 200
    d = r.json()
    uuid.UUID(d["id"])  # DeepSeek ids are UUIDs
    assert d["object"] == "chat.completion" and d["model"] == "deepseek-v4-flash"
    choice = d["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"}
    assert choice["logprobs"] is None and choice["finish_reason"] == "stop"
    u = d["usage"]
    assert u["prompt_tokens"] == len("hello world, json!") // 4
    assert u["completion_tokens"] == 8 and u["total_tokens"] == u["prompt_tokens"] + 8
    assert u["prompt_cache_hit_tokens"] == 2
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert u["prompt_tokens_details"] == {"cached_tokens": 2}
    assert u["completion_tokens_details"] == {"reasoning_tokens": 0}


@pytest.mark.parametrize("include_usage", [None, True])
async def test_deepseek_stream_usage_rides_on_finish_chunk(include_usage: bool | None) -> None:
    extra: dict[str, Any] = {"stream": True}
    if include_usage:
        extra["stream_options"] = {"include_usage": True}
    async with client("deepseek") as c:
        r = await post(c, "/chat/completions", chat_body("deepseek", **extra))
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks, done = sse_json(r.text)
    assert done
    assert len({ch["id"] for ch in chunks}) == 1
    uuid.UUID(chunks[0]["id"])
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    last = chunks[-1]
    assert len(last["choices"]) == 1 and last["choices"][0]["finish_reason"] == "stop"
    assert last["choices"][0]["delta"] == {"content": ""}
    assert last["usage"]["completion_tokens"] == 8
    for ch in chunks[:-1]:
        if include_usage:
            assert ch["usage"] is None
        else:
            assert "usage" not in ch
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"


async def test_vllm_stream_usage_defaults_true_with_stream_options_and_reasoning_field() -> None:
    async with client("vllm") as c:
        plain = await post(c, "/chat/completions", chat_body("vllm", stream=True))
        with_opts = await post(
            c, "/chat/completions",
            chat_body("vllm", stream=True, stream_options={}, chat_template_kwargs={"thinking": True}),
        )
    chunks, done = sse_json(plain.text)
    assert done and all("usage" not in ch for ch in chunks)
    assert chunks[0]["id"].startswith("chatcmpl-")
    # vLLM attaches finish_reason to the last generated chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["delta"] == {"content": " tok7"}

    chunks, done = sse_json(with_opts.text)
    assert done
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 8 + 4 and usage["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert "prompt_tokens_details" not in usage
    reasoning = "".join(ch["choices"][0]["delta"].get("reasoning", "") for ch in chunks[:-1])
    assert reasoning == "think0 think1 think2 think3"
    assert not any("reasoning_content" in ch["choices"][0]["delta"] for ch in chunks[:-1])


async def test_vllm_non_stream_shape_and_cached_tokens() -> None:
    async with client("vllm") as c:
        r1 = await post(c, "/chat/completions", chat_body("vllm"))
        r2 = await post(c, "/chat/completions", chat_body("vllm", fake={"cached_tokens": 3, "reasoning": 2}))
    d1, d2 = r1.json(), r2.json()
    assert d1["object"] == "chat.completion" and d1["id"].startswith("chatcmpl-")
    assert "prompt_tokens_details" not in d1["usage"]
    assert d1["choices"][0]["message"]["reasoning"] is None
    assert d2["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert d2["choices"][0]["message"]["reasoning"] == "think0 think1"
    assert d2["usage"]["completion_tokens"] == 10


async def test_sglang_usage_default_false_reasoning_content_and_top_level_reasoning_tokens() -> None:
    async with client("sglang") as c:
        no_usage = await post(c, "/chat/completions", chat_body("sglang", stream=True, stream_options={}))
        with_usage = await post(
            c, "/chat/completions",
            chat_body("sglang", stream=True, stream_options={"include_usage": True}, fake={"reasoning": True}),
        )
        non_stream = await post(c, "/chat/completions", chat_body("sglang", fake={"reasoning": 1}))
    chunks, done = sse_json(no_usage.text)
    assert done and all(ch.get("usage") is None for ch in chunks)
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"

    chunks, done = sse_json(with_usage.text)
    assert done and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["reasoning_tokens"] == 4
    assert any(ch["choices"] and "reasoning_content" in ch["choices"][0]["delta"] for ch in chunks)

    d = non_stream.json()
    assert d["choices"][0]["message"]["reasoning_content"] == "think0"
    assert d["usage"]["reasoning_tokens"] == 1 and d["usage"]["completion_tokens"] == 9


async def test_sglang_requires_json_content_type() -> None:
    async with client("sglang") as c:
        r = await c.post("/chat/completions", content=json.dumps(chat_body("sglang")),
                         headers={"content-type": "text/plain"})
    assert r.status_code == 400
    assert r.json()["object"] == "error" and r.json()["code"] == 400


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_legacy_completions_stream_and_json(flavor: str) -> None:
    body = {"model": MODEL[flavor], "prompt": "def fib(a):", "stream": True, "stream_options": {"include_usage": True}}
    async with client(flavor) as c:
        r = await post(c, "/completions", body)
        r2 = await post(c, "/completions", {**body, "stream": False})
    chunks, done = sse_json(r.text)
    assert done
    assert all(ch["object"] == "text_completion" for ch in chunks)
    assert all("delta" not in choice for ch in chunks for choice in ch["choices"])
    text = "".join(choice["text"] for ch in chunks for choice in ch["choices"])
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    usage = [ch["usage"] for ch in chunks if ch.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 8
    d = r2.json()
    assert d["object"] == "text_completion" and d["choices"][0]["text"] == text


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_models_endpoint(flavor: str) -> None:
    async with client(flavor) as c:
        r = await c.get("/models")
        r_root = await c.get("http://fake/models")
    assert r.status_code == r_root.status_code == 200
    d = r.json()
    assert d["object"] == "list"
    entry = d["data"][0]
    if flavor == "deepseek":
        assert [m["id"] for m in d["data"]] == ["deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro"]
        assert "created" not in entry
    else:
        assert entry["id"] == "deepseek-ai/DeepSeek-V3.2" and entry["owned_by"] == flavor
        assert isinstance(entry["created"], int) and entry["max_model_len"] == 131072 and entry["root"] == entry["id"]


async def test_health_endpoints_are_unauthenticated() -> None:
    async with client("vllm", api_key="k") as c:
        r = await c.get("http://fake/health")
        assert r.status_code == 200 and r.content == b""
        assert (await c.post("/_fake/config", json={"health_status": 503})).status_code == 200
        assert (await c.get("http://fake/health")).status_code == 503
        assert (await c.get("/models")).status_code == 401
        m = await c.get("http://fake/metrics")
        assert 'vllm:num_requests_waiting{engine="0",model_name="deepseek-ai/DeepSeek-V3.2"} 0.0' in m.text
    async with client("sglang") as c:
        assert (await c.get("http://fake/health_generate")).status_code == 200


async def test_json_mode_and_max_tokens() -> None:
    async with client("vllm") as c:
        r = await post(c, "/chat/completions",
                       chat_body("vllm", stream=True, response_format={"type": "json_object"}, fake={"chunks": 3}))
        capped = await post(c, "/chat/completions", chat_body("vllm", max_completion_tokens=5))
    chunks, _ = sse_json(r.text)
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert json.loads(text) == {"answer": "tok0 tok1 tok2"}
    d = capped.json()
    assert d["choices"][0]["finish_reason"] == "length"
    assert d["usage"]["completion_tokens"] == 5
    assert d["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4"


# --------------------------------------------------------------------------- tools


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_streamed_tool_call_deltas_reassemble(flavor: str) -> None:
    async with client(flavor) as c:
        r = await post(c, "/chat/completions", chat_body(flavor, stream=True, tools=TOOLS, fake={"parallel_tools": 2}))
    chunks, done = sse_json(r.text)
    assert done
    calls: dict[int, dict[str, Any]] = {}
    fragments: dict[int, int] = {}
    finish = []
    for ch in chunks:
        for choice in ch["choices"]:
            if choice["finish_reason"]:
                finish.append(choice["finish_reason"])
            for tc in choice["delta"].get("tool_calls") or ():
                i = tc["index"]
                if i not in calls:
                    assert tc["id"] and tc["type"] == "function" and tc["function"]["name"] == "get_weather"
                    assert tc["function"]["arguments"] == ""
                    calls[i] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                    fragments[i] = fragments.get(i, 0) + 1
                calls[i]["arguments"] += tc["function"]["arguments"]
    assert finish == ["tool_calls"]
    assert sorted(calls) == [0, 1]
    assert all(n >= 2 for n in fragments.values())
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert json.loads(calls[1]["arguments"]) == {"city": "London"}


async def test_non_stream_tool_call_and_tool_choice_none() -> None:
    async with client("deepseek") as c:
        r = await post(c, "/chat/completions", chat_body("deepseek", tools=TOOLS))
        r_none = await post(c, "/chat/completions", chat_body("deepseek", tools=TOOLS, tool_choice="none"))
    d = r.json()
    assert d["choices"][0]["finish_reason"] == "tool_calls"
    tc = d["choices"][0]["message"]["tool_calls"][0]
    assert tc["function"]["name"] == "get_weather" and json.loads(tc["function"]["arguments"]) == {"city": "Paris"}
    assert r_none.json()["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in r_none.json()["choices"][0]["message"]


async def test_openai_sdk_parses_streams_and_tool_calls() -> None:
    app = create_app(FakeConfig(flavor="vllm", api_key="sk-test"))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    sdk = openai.AsyncOpenAI(base_url="http://fake/v1", api_key="sk-test", http_client=http, max_retries=0)
    async with sdk:
        out = await sdk.chat.completions.create(model=MODEL["vllm"], messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content.startswith("tok0")
        async with sdk.chat.completions.stream(
            model=MODEL["vllm"], messages=[{"role": "user", "content": "hi"}], tools=TOOLS,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        ) as stream:
            final = await stream.get_final_completion()
        call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert final.usage is not None and final.usage.completion_tokens == 3
        with pytest.raises(openai.APIError, match="in-band"):
            s = await sdk.chat.completions.create(
                model=MODEL["vllm"], messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_headers={"x-fault": "error_kind=in_band"},
            )
            async for _ in s:
                pass


# --------------------------------------------------------------------------- FIM


async def test_deepseek_fim_only_on_beta() -> None:
    body = {"model": "deepseek-v4-flash", "prompt": "def fib(a):", "suffix": "    return fib(a-1) + fib(a-2)"}
    async with client("deepseek") as c:
        beta = await c.post("http://fake/beta/completions", json=body)
        plain = await post(c, "/completions", body)
    assert beta.status_code == 200
    d = beta.json()
    assert d["object"] == "text_completion" and d["choices"][0]["text"].startswith("tok0")
    assert d["usage"]["prompt_tokens"] == (len(body["prompt"]) + len(body["suffix"])) // 4
    assert d["usage"]["prompt_cache_miss_tokens"] == d["usage"]["prompt_tokens"]
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "suffix"


async def test_vllm_rejects_suffix_and_records_fim_prompt() -> None:
    fim_prompt = f"{FIM_BEGIN}def fib(a):{FIM_HOLE}    return 1{FIM_END}"
    async with client("vllm") as c:
        bad = await post(c, "/completions", {"model": MODEL["vllm"], "prompt": "a", "suffix": "b"})
        ok = await post(c, "/completions", {"model": MODEL["vllm"], "prompt": fim_prompt})
        stats = (await c.get("http://fake/_fake/stats")).json()
    assert bad.status_code == 400
    assert bad.json() == {"error": {"message": "suffix is not currently supported", "type": "BadRequestError",
                                    "param": "suffix", "code": 400}}
    assert ok.status_code == 200
    assert stats["log"][-1]["body"]["prompt"] == fim_prompt
    assert "\uff5cfim\u2581begin\uff5c" in stats["log"][-1]["body"]["prompt"]


async def test_deepseek_beta_chat_prefix() -> None:
    msgs = [{"role": "user", "content": "write code"}, {"role": "assistant", "content": "```python\n", "prefix": True}]
    async with client("deepseek") as c:
        r = await c.post("http://fake/beta/chat/completions", json={"model": "deepseek-v4-pro", "messages": msgs})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("tok0")


# --------------------------------------------------------------------------- errors

HTTP_KINDS = {"400": 400, "401": 401, "402": 402, "408": 408, "429": 429, "500": 500, "503": 503,
              "context_length": 400}


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("kind", sorted(HTTP_KINDS))
async def test_http_error_kinds(flavor: str, kind: str) -> None:
    async with client(flavor) as c:
        r = await post(c, "/chat/completions", chat_body(flavor, max_tokens=10),
                       headers={"x-fault": f"error_kind={kind}; retry_after=7"})
    assert r.status_code == HTTP_KINDS[kind]
    body = r.json()
    if flavor == "sglang":
        assert body["object"] == "error" and body["code"] == HTTP_KINDS[kind]
        err = body
    else:
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["code"], str if flavor == "deepseek" else int)
    if kind == "402" and flavor == "deepseek":
        assert err["message"] == "Insufficient Balance"
    if kind == "context_length":
        assert err["message"].startswith("This model's maximum context length is 131072 tokens.")
        assert "10 in the completion" in err["message"]
    if kind == "429":
        assert r.headers["retry-after"] == "7"
    else:
        assert "retry-after" not in r.headers
    if flavor == "deepseek":
        assert r.headers["x-ds-trace-id"]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_in_band_error_first_event(flavor: str) -> None:
    async with client(flavor, error_rate=1.0, error_kind="in_band") as c:
        r = await post(c, "/chat/completions", chat_body(flavor, stream=True))
        r_json = await post(c, "/chat/completions", chat_body(flavor))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and len(events) == 2
    first = json.loads(events[0])
    assert set(first) == {"error"}
    assert isinstance(first["error"]["code"], str if flavor == "deepseek" else int)
    assert r_json.status_code == 500


async def test_cut_stall_bad_json_no_done_no_usage() -> None:
    async with client("deepseek") as c:
        # in-process the cut surfaces as the exception httpx raises for a truncated response
        with pytest.raises(httpx.RemoteProtocolError):
            await post(c, "/chat/completions", chat_body("deepseek", stream=True),
                       {"x-fault": "error_kind=cut;cut_after=3"})
        with pytest.raises(httpx.RemoteProtocolError):
            await post(c, "/chat/completions", chat_body("deepseek"), {"x-fault": "error_kind=cut"})
        t0 = time.perf_counter()
        stall = await post(c, "/chat/completions", chat_body("deepseek", stream=True),
                           {"x-fault": "error_kind=stall;stall_after=1;stall_ms=150"})
        stall_elapsed = time.perf_counter() - t0
        bad = await post(c, "/chat/completions", chat_body("deepseek", stream=True),
                         {"x-fault": "error_kind=bad_json;bad_json_at=2"})
        no_done = await post(c, "/chat/completions", chat_body("deepseek", stream=True),
                             {"x-fault": "error_kind=no_done"})
        no_usage = await post(c, "/chat/completions", chat_body("deepseek", stream=True),
                              {"x-fault": "error_kind=no_usage"})
        no_usage_json = await post(c, "/chat/completions", chat_body("deepseek"), {"x-fault": "error_kind=no_usage"})
        stats = (await c.get("http://fake/_fake/stats")).json()

    assert stats["log"][0]["tokens_sent"] == 3 and stats["log"][0]["fault"] == "cut"
    assert stats["log"][0]["closed_by"] == "server" and stats["log"][1]["tokens_sent"] == 0

    chunks, done = sse_json(stall.text)
    assert done and stall_elapsed >= 0.15 and chunks[-1]["choices"][0]["finish_reason"] == "stop"

    events = sse_events(bad.text)
    assert events[2] == "{not json" and events[-1] == "[DONE]"
    json.loads(events[1])

    chunks, done = sse_json(no_done.text)
    assert not done and chunks[-1]["usage"]["total_tokens"] > 0

    chunks, done = sse_json(no_usage.text)
    assert done and all("usage" not in ch for ch in chunks)
    assert "usage" not in no_usage_json.json()


async def test_hang_redirect_and_empty_json() -> None:
    async with client("deepseek") as c:
        t0 = time.perf_counter()
        hang = await post(c, "/chat/completions", chat_body("deepseek"), {"x-fault": "error_kind=hang;stall_ms=120"})
        assert time.perf_counter() - t0 >= 0.12 and hang.status_code == 200
        redirect = await post(c, "/chat/completions", chat_body("deepseek"), {"x-fault": "error_kind=redirect"})
        empty = await post(c, "/chat/completions", chat_body("deepseek", response_format={"type": "json_object"}),
                           {"x-fault": "error_kind=empty_json"})
    assert redirect.status_code == 302 and redirect.headers["location"] == "http://127.0.0.1:1/"
    msg = empty.json()["choices"][0]
    assert msg["finish_reason"] == "stop" and msg["message"]["content"].strip() == ""
    assert len(msg["message"]["content"]) > 0


async def test_error_rate_is_probabilistic_and_seeded() -> None:
    async with client("vllm", error_rate=0.5, error_kind="503", seed=7) as c:
        codes = [(await post(c, "/chat/completions", chat_body("vllm"))).status_code for _ in range(40)]
    assert set(codes) == {200, 503}
    assert 5 < codes.count(503) < 35


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("flavor", "status", "check"),
    [
        ("deepseek", 400, lambda b: b["error"]["message"] == "Model Not Exist"),
        ("vllm", 404, lambda b: b["error"]["type"] == "NotFoundError" and b["error"]["code"] == 404),
        ("sglang", 404, lambda b: b["object"] == "error" and b["type"] == "NotFoundError"),
    ],
)
async def test_unknown_model(flavor: str, status: int, check: Any) -> None:
    async with client(flavor) as c:
        r = await post(c, "/chat/completions", chat_body(flavor, model="nope"))
    assert r.status_code == status and check(r.json())
    async with client(flavor, models=["*"]) as c:
        assert (await post(c, "/chat/completions", chat_body(flavor, model="anything"))).status_code == 200


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_auth(flavor: str) -> None:
    async with client(flavor, api_key="sk-good") as c:
        missing = await post(c, "/chat/completions", chat_body(flavor))
        wrong = await post(c, "/chat/completions", chat_body(flavor), {"authorization": "Bearer nope"})
        good = await post(c, "/chat/completions", chat_body(flavor), {"authorization": "Bearer sk-good"})
        log = (await c.get("http://fake/_fake/stats")).json()["log"]
    assert missing.status_code == wrong.status_code == 401 and good.status_code == 200
    if flavor == "sglang":
        assert wrong.json()["code"] == 401
    else:
        assert wrong.json()["error"]["message"]
    assert "authorization" not in log[0]["headers"]
    assert log[1]["headers"]["authorization"] == "present"
    assert log[2]["headers"]["authorization"] == "valid"


async def test_deepseek_rejects_what_real_deepseek_rejects() -> None:
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    async with client("deepseek") as c:
        dev = await post(c, "/chat/completions",
                         chat_body("deepseek", messages=[{"role": "developer", "content": "x"}]))
        schema = await post(c, "/chat/completions", chat_body(
            "deepseek", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}))
        passback = await post(c, "/chat/completions", chat_body(
            "deepseek", messages=history, thinking={"type": "enabled"}))
        passback_ok = await post(c, "/chat/completions", chat_body(
            "deepseek", messages=[history[0], {**history[1], "reasoning_content": "r"}, history[2]],
            thinking={"type": "enabled"}))
        no_thinking = await post(c, "/chat/completions", chat_body("deepseek", messages=history))
        effort_none = await post(c, "/chat/completions", chat_body("deepseek", reasoning_effort="none"))
    assert dev.status_code == 400 and "developer" in dev.json()["error"]["message"]
    assert schema.status_code == 400
    assert schema.json()["error"]["message"] == "This response_format type is unavailable now"
    assert passback.status_code == 400
    assert passback.json()["error"]["message"] == (
        "The `reasoning_content` in the thinking mode must be passed back to the API.")
    assert passback_ok.status_code == 200
    assert passback_ok.json()["choices"][0]["message"]["reasoning_content"].startswith("think0")
    assert no_thinking.status_code == 200
    assert effort_none.status_code == 400


async def test_vllm_accepts_developer_and_json_schema() -> None:
    async with client("vllm") as c:
        r = await post(c, "/chat/completions", chat_body(
            "vllm", messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}))
    assert r.status_code == 200
    assert json.loads(r.json()["choices"][0]["message"]["content"])["answer"].startswith("tok0")


# --------------------------------------------------------------------------- knobs / admin


def test_fault_header_parsing_and_merge() -> None:
    assert parse_fault_header("error_kind=429; retry-after=2 ;chunks=3") == {
        "error_kind": "429", "retry_after": "2", "chunks": "3"}
    base = FakeConfig().knobs()
    merged = merge_knobs(base, parse_fault_header("error_kind=429;retry_after=2;chunks=3;reasoning=true"))
    assert merged["error_kind"] == "429" and merged["error_rate"] == 1.0  # kind implies rate=1
    assert merged["retry_after"] == 2.0 and merged["chunks"] == 3 and merged["reasoning"] == 4
    assert merge_knobs(base, {"error_kind": "503", "error_rate": "0.25"})["error_rate"] == 0.25
    assert merge_knobs(base, {"tool_call": False})["tool_call"] == "never"
    for bad in ({"nope": 1}, {"error_kind": "teapot"}, {"error_rate": 2}, {"chunks": "x"}):
        with pytest.raises(KnobError):
            merge_knobs(base, bad)
    with pytest.raises(KnobError):
        parse_fault_header("chunks")
    assert "in_band" in ERROR_KINDS


async def test_header_overrides_body_fake_and_bad_knob_is_400() -> None:
    async with client("deepseek") as c:
        r = await post(c, "/chat/completions", chat_body("deepseek", fake={"chunks": 2, "tokens_per_chunk": 2}),
                       {"x-fault": "chunks=3"})
        bad = await post(c, "/chat/completions", chat_body("deepseek"), {"x-fault": "chunkz=3"})
    assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 tok5"
    assert bad.status_code == 400 and "chunkz" in bad.json()["error"]["message"]


async def test_keepalive_comments() -> None:
    async with client("deepseek", keepalive_comments=3, keepalive_ms=0) as c:
        s = await post(c, "/chat/completions", chat_body("deepseek", stream=True))
        j = await post(c, "/chat/completions", chat_body("deepseek"))
    assert s.text.startswith(": keep-alive\n\n" * 3 + "data: {")
    assert j.content.startswith(b"\n\n\n{") and json.loads(j.content)["object"] == "chat.completion"
    async with client("vllm", keepalive_comments=2, keepalive_ms=0) as c:
        s = await post(c, "/chat/completions", chat_body("vllm", stream=True))
        j = await post(c, "/chat/completions", chat_body("vllm"))
    assert s.text.startswith(": keep-alive\n\n: keep-alive\n\ndata: {")
    assert j.content.startswith(b"{")  # only DeepSeek pads non-stream bodies


async def test_stats_reset_and_runtime_config() -> None:
    async with client("vllm") as c:
        await post(c, "/chat/completions", chat_body("vllm", stream=True), {"x-custom": "1"})
        await c.get("http://fake/v1/models")
        stats = (await c.get("http://fake/_fake/stats")).json()
        assert stats["requests"] == 1 and stats["in_flight"] == 0
        assert stats["by_path"] == {"/v1/chat/completions": 1, "/v1/models": 1}
        e = stats["log"][0]
        assert e["path"] == "/v1/chat/completions" and e["model"] == MODEL["vllm"] and e["stream"] is True
        assert e["status"] == 200 and e["closed_by"] == "server" and e["tokens_sent"] == 8
        assert e["t_start"] <= e["t_first_byte"] <= e["t_end"]
        assert e["headers"]["x-custom"] == "1" and e["body"]["messages"][0]["role"] == "user"

        cfg = await c.post("http://fake/_fake/config", json={"error_kind": "503", "chunks": 2})
        assert cfg.status_code == 200
        assert cfg.json()["error_rate"] == 1.0 and cfg.json()["chunks"] == 2
        assert (await post(c, "/chat/completions", chat_body("vllm"))).status_code == 503
        assert (await c.post("http://fake/_fake/config", json={"bogus": 1})).status_code == 400
        assert (await c.post("http://fake/_fake/config", json={"error_rate": 0})).json()["error_rate"] == 0
        ok = await post(c, "/chat/completions", chat_body("vllm"))
        assert ok.json()["choices"][0]["message"]["content"] == "tok0 tok1"

        assert (await c.post("http://fake/_fake/reset")).status_code == 200
        stats = (await c.get("http://fake/_fake/stats")).json()
        assert stats["requests"] == 0 and stats["log"] == [] and stats["by_path"] == {}
        await c.post("http://fake/_fake/reset", json={"knobs": True})
        assert (await c.get("http://fake/_fake/config")).json()["chunks"] == 8


def test_cli_args_to_config() -> None:
    args = build_parser().parse_args(
        ["--flavor", "sglang", "--models", "a,b", "--error-kind", "429", "--chunks", "3", "--api-key", "k"])
    cfg = config_from_args(args)
    assert cfg.flavor == "sglang" and cfg.models == ["a", "b"] and cfg.api_key == "k"
    assert cfg.knobs()["error_rate"] == 1.0 and cfg.knobs()["chunks"] == 3 and cfg.knobs()["error_kind"] == "429"
    assert FakeConfig(flavor="vllm").models == ["deepseek-ai/DeepSeek-V3.2"]
    with pytest.raises(ValueError):
        FakeConfig(flavor="mistral")


# --------------------------------------------------------------------------- real server


def _start_server(*extra: str) -> tuple[subprocess.Popen[str], str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "therouter.fakeupstream", "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("fake-upstream listening on http://127.0.0.1:"), (line, proc.poll())
    return proc, line.split(" on ", 1)[1].strip()


async def test_real_subprocess_server() -> None:
    proc, base = _start_server("--flavor", "vllm", "--api-key", "sk-x", "--chunk-delay-ms", "60")
    try:
        assert int(base.rsplit(":", 1)[1]) > 0
        auth = {"authorization": "Bearer sk-x"}
        async with httpx.AsyncClient(base_url=base + "/v1", headers=auth, timeout=10) as c:
            # events are flushed one by one: the first arrives long before the last
            t0 = time.perf_counter()
            arrivals = []
            async with c.stream("POST", "/chat/completions", json=chat_body("vllm", stream=True)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        arrivals.append((time.perf_counter() - t0, line))
            assert arrivals[-1][1] == "data: [DONE]"
            assert arrivals[-1][0] - arrivals[0][0] >= 0.3  # 7 gaps of 60 ms

            # cut: the server drops the TCP connection after the role chunk + 1 content chunk
            received: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError):
                async with c.stream("POST", "/chat/completions", json=chat_body("vllm", stream=True),
                                    headers={"x-fault": "error_kind=cut;cut_after=1"}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            received.append(line[6:])
            assert len(received) == 2 and "[DONE]" not in received
            assert json.loads(received[1])["choices"][0]["delta"] == {"content": "tok0"}

            # client disconnect is detected and recorded
            async with c.stream("POST", "/chat/completions", json=chat_body("vllm", stream=True),
                                headers={"x-fault": "chunk_delay_ms=500"}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            for _ in range(50):
                stats = (await c.get(base + "/_fake/stats")).json()
                if stats["in_flight"] == 0:
                    break
                await asyncio.sleep(0.02)
            last = stats["log"][-1]
            assert last["closed_by"] == "client" and last["status"] == 200
            assert 1 <= last["tokens_sent"] < 8
            assert stats["in_flight"] == 0 and stats["requests"] == 3
            assert [e["headers"]["authorization"] for e in stats["log"]] == ["valid"] * 3

            sdk = openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-x", max_retries=0)
            async with sdk:
                out = await sdk.completions.create(model=MODEL["vllm"], prompt="x")
                assert out.choices[0].text.startswith("tok0")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


# --------------------------------------------------------------------------- misbehaving upstreams (issue 7)


@pytest.mark.parametrize("kind", ["400", "503", "context_length"])
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_echo_request_dumps_headers_and_internals_into_error_bodies(flavor: str, kind: str) -> None:
    key = "sk-fake-echo-0123456789"
    async with client(flavor, api_key=key) as c:
        r = await post(c, "/chat/completions", chat_body(flavor, messages=[{"role": "user", "content": "my key tr-x"}]),
                       headers={"authorization": f"Bearer {key}", "x-fault": f"error_kind={kind};echo_request=1"})
    body = r.json()
    msg = body["message"] if flavor == "sglang" else body["error"]["message"]
    assert key in msg  # the careless part: our key comes back
    assert base64.b64encode(key.encode()).decode() in msg
    for part in ("http://10.20.30.40:8000/", "10.20.30.40:8000", "/srv/fake-upstream/config/server.yaml",
                 "Traceback (most recent call last):", '"host":"fake"', "my key tr-x"):  # ..., headers, prompt
        assert part in msg, part


async def test_echo_request_in_band_errors() -> None:
    async with client("vllm", api_key="sk-fake-echo-0123456789") as c:
        r = await post(c, "/chat/completions", chat_body("vllm", stream=True),
                       headers={"authorization": "Bearer sk-fake-echo-0123456789",
                                "x-fault": "error_kind=in_band_mid;cut_after=2;echo_request=true"})
    chunks, done = sse_json(r.text)
    assert done and "error" in chunks[-1] and "sk-fake-echo-0123456789" in chunks[-1]["error"]["message"]
    content = [ch for ch in chunks[:-1] if ch["choices"] and ch["choices"][0]["delta"].get("content")]
    assert len(content) == 2  # real content first, then the error


@pytest.mark.parametrize("shape,check", [
    ("choices_int", lambda e: e["choices"] == 5),
    ("choice_not_object", lambda e: e["choices"] == [5]),
    ("delta_not_object", lambda e: e["choices"][0]["delta"] == 5),
    ("content_int", lambda e: e["choices"][0]["delta"]["content"] == 5),
    ("tool_calls_int", lambda e: e["choices"][0]["delta"]["tool_calls"] == 5),
    ("tool_call_not_object", lambda e: e["choices"][0]["delta"]["tool_calls"] == [5]),
    ("chunk_int", lambda e: e == 5),
    ("chunk_str", lambda e: e == "x"),
    ("chunk_list", lambda e: e == []),
    ("usage_int", lambda e: e["usage"] == 5),
])
@pytest.mark.parametrize("at", [0, 2])
async def test_bad_shape_stream_event(shape: str, check: Any, at: int) -> None:
    async with client("deepseek") as c:
        r = await post(c, "/chat/completions", chat_body("deepseek", stream=True),
                       headers={"x-fault": f"error_kind=bad_shape;shape={shape};fault_at={at}"})
    events = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    assert check(events[at])
    assert all(isinstance(e, dict) and isinstance(e.get("choices"), list) for i, e in enumerate(events) if i != at)


@pytest.mark.parametrize("shape,check", [
    ("choices_int", lambda b: b["choices"] == 5),
    ("delta_not_object", lambda b: b["choices"][0]["message"] == 5),
    ("content_int", lambda b: b["choices"][0]["message"]["content"] == 5),
    ("tool_calls_int", lambda b: b["choices"][0]["message"]["tool_calls"] == 5),
    ("chunk_list", lambda b: b == []),
    ("usage_int", lambda b: b["usage"] == 5),
])
async def test_bad_shape_body(shape: str, check: Any) -> None:
    async with client("vllm") as c:
        r = await post(c, "/chat/completions", chat_body("vllm"),
                       headers={"x-fault": f"error_kind=bad_shape;shape={shape}"})
    assert r.status_code == 200 and check(r.json())


async def test_huge_line_and_huge_body() -> None:
    async with client("deepseek", huge_bytes=300_000) as c:
        r = await post(c, "/chat/completions", chat_body("deepseek", stream=True),
                       headers={"x-fault": "error_kind=huge"})
        j = await post(c, "/chat/completions", chat_body("deepseek"), headers={"x-fault": "error_kind=huge"})
    first = r.text.split("\n\n", 1)[0]
    assert len(first) >= 299_000 and "\n" not in first
    assert json.loads(first[len("data: "):])["choices"][0]["delta"]["content"].startswith("AAAA")
    assert len(j.content) >= 299_000 and j.json()["choices"][0]["message"]["content"].startswith("AAAA")


@pytest.mark.parametrize("stream", [True, False])
async def test_gzip_bomb(stream: bool) -> None:
    async with client("deepseek", bomb_bytes=50 * 1024 * 1024) as c, \
            c.stream("POST", "/chat/completions", json=chat_body("deepseek", stream=stream),
                     headers={"x-fault": "error_kind=gzip_bomb"}) as r:
        raw = b"".join([b async for b in r.aiter_raw()])
    assert r.headers["content-encoding"] == "gzip"
    assert len(raw) < 200_000  # small on the wire...
    inflated = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, 1024)
    assert inflated.startswith(b"data: 000" if stream else b'{"id":"bomb"')
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    while raw:
        total += len(z.decompress(raw, 1 << 20))
        raw = z.unconsumed_tail
    assert total >= 50 * 1024 * 1024  # ...huge once inflated


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_encoding_knob_compresses_every_answer(encoding: str) -> None:
    async with client("deepseek", encoding=encoding) as c:
        j = await post(c, "/chat/completions", chat_body("deepseek"))
        s = await post(c, "/chat/completions", chat_body("deepseek", stream=True))
        e = await post(c, "/chat/completions", chat_body("deepseek"), headers={"x-fault": "error_kind=503"})
    assert j.headers["content-encoding"] == encoding and j.json()["choices"][0]["message"]["content"]
    chunks, done = sse_json(s.text)  # httpx decoded it
    assert s.headers["content-encoding"] == encoding and done and chunks
    assert e.status_code == 503 and e.headers["content-encoding"] == encoding and e.json()["error"]


async def test_encoding_br_is_a_label_only() -> None:
    async with client("deepseek", encoding="br") as c, \
            c.stream("POST", "/chat/completions", json=chat_body("deepseek")) as r:
        raw = b"".join([b async for b in r.aiter_raw()])
    assert r.headers["content-encoding"] == "br" and json.loads(raw)["choices"]


def test_new_knobs_parse_and_reject_bad_values() -> None:
    k = merge_knobs({}, {"echo_request": "yes", "shape": "TOOL_CALLS_INT", "encoding": "gzip", "fault_at": "3"})
    assert k == {"echo_request": True, "shape": "tool_calls_int", "encoding": "gzip", "fault_at": 3}
    for bad in ({"echo_request": "maybe"}, {"shape": "nope"}, {"encoding": "zstd"}, {"bomb_bytes": 0}):
        with pytest.raises(KnobError):
            merge_knobs({}, bad)
