"""Non-stream requests sent upstream as streams (`non_stream: stream`), with real processes.

One gateway for the module. Each fake upstream (DeepSeek, vLLM, SGLang flavours) is reached through two provider
names, one per mode, so the same generation can be asked for both ways: the assembled answer must be the answer the
upstream gives without streaming. Then what streaming buys a non-stream client: a hosted upstream that accepts and
hangs is left after `first_token`, a client that leaves is billed what was produced, a break after the first chunk
is an error answer billed like a broken stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Fake, Gateway, make_key, running, start_gateway, wait_for
from therouter.redisproc import RedisProcess

T = {"connect": 1, "first_token": 2, "idle": 2, "total": 20}
CARD: dict[str, Any] = {
    "context_length": 4096, "max_output_tokens": 1024,
    "supported_parameters": ["temperature", "max_tokens", "top_p", "tools", "tool_choice", "response_format", "stop",
                             "n"],
    "pricing": {"input": 0.96, "cached_input": 0.24, "output": 2.88},
}
UPSTREAM = {"deepseek": "deepseek-v3.2", "vllm": "deepseek-ai/DeepSeek-V3.2", "sglang": "deepseek-ai/DeepSeek-V3.2"}
KIND = {"deepseek": "deepseek", "vllm": "vllm", "sglang": "sglang"}
HELLO = [{"role": "user", "content": "Say hello"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
STALL_MS = 8000  # how long the hosted upstream hangs: far below `total` (20 s), far above `first_token` (2 s)


def _provider(flavor: str, fake: Fake, mode: str | None) -> dict[str, Any]:
    p: dict[str, Any] = {"kind": KIND[flavor], "base_url": fake.url if flavor == "deepseek" else fake.url + "/v1",
                         "timeouts": T}
    if flavor == "deepseek":
        p["api_key_env"] = "TEST_DEEPSEEK_KEY"
    if mode is not None:
        p["non_stream"] = mode
    return p


def _model(*deps: tuple[str, str]) -> dict[str, Any]:
    return {**CARD, "deployments": [
        {"provider": name, "model": UPSTREAM[flavor], "priority": i, "capabilities": ["tools", "json_object"]}
        for i, (name, flavor) in enumerate(deps)]}


@pytest.fixture(scope="module")
def gw(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = Path(tmp_path_factory.mktemp("assembly"))
    providers: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for flavor in ("deepseek", "vllm", "sglang"):
        # deepseek streams by default; vllm / sglang are marked (and their passthrough is the default)
        providers[f"{flavor}-stream"] = _provider(flavor, fakes[flavor], None if flavor == "deepseek" else "stream")
        providers[f"{flavor}-pass"] = _provider(flavor, fakes[flavor], "passthrough" if flavor == "deepseek" else None)
        for mode in ("stream", "pass"):
            models[f"eq/{flavor}-{mode}"] = _model((f"{flavor}-{mode}", flavor))
    models["fo/hosted-then-vllm"] = _model(("deepseek-stream", "deepseek"), ("vllm-pass", "vllm"))
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "request_deadline": 30, "model_check_interval": 0},
        "store": {"redis_url": redis_proc.url, "key_prefix": f"asm{uuid.uuid4().hex[:8]}:"},
        "data_dir": str(tmp / "data"), "providers": providers, "models": models,
    }
    with running(start_gateway(cfg, tmp)) as g:
        yield g


@pytest.fixture(scope="module")
def key(gw: Gateway) -> str:
    return asyncio.run(make_key(gw, "assembly"))


def post(gw: Gateway, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.v1 + path, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=30)


def record(gw: Gateway, key: str, **query: str) -> dict[str, Any] | None:
    r = httpx.get(gw.v1 + "/generation", params=query, headers={"Authorization": f"Bearer {key}"}, timeout=5)
    return r.json()["data"] if r.status_code == 200 else None  # type: ignore[no-any-return]


def comparable(answer: dict[str, Any], flavor: str) -> dict[str, Any]:
    """What must be equal between the two modes: all of it but our per-request identity (id, created, the model id
    asked for, the provider name) and the tool-call ids the upstream makes up per request."""
    a = json.loads(json.dumps(answer))
    for k in ("id", "created", "model", "provider"):
        a.pop(k)
    prefix = {"deepseek": "call_00_", "vllm": "chatcmpl-tool-", "sglang": "call_"}[flavor]
    for ch in a["choices"]:
        for tc in (ch.get("message") or {}).get("tool_calls") or ():
            assert tc["id"].startswith(prefix), tc
            tc["id"] = "<id>"
    return a


CASES = {
    "text": ("/chat/completions", {"messages": HELLO}),
    "reasoning": ("/chat/completions", {"messages": HELLO, "fake": {"reasoning": 3, "cached_tokens": 2}}),
    "tools": ("/chat/completions", {"messages": HELLO, "tools": TOOLS, "fake": {"parallel_tools": 2}}),
    "reasoning_tools": ("/chat/completions", {"messages": HELLO, "tools": TOOLS, "fake": {"reasoning": 2}}),
    "json": ("/chat/completions", {"messages": [{"role": "user", "content": "json please"}],
                                   "response_format": {"type": "json_object"}}),
    "length": ("/chat/completions", {"messages": HELLO, "max_tokens": 5}),
    "completion": ("/completions", {"prompt": "def fib(n):"}),
    "several_choices": ("/chat/completions", {"messages": HELLO, "n": 2, "fake": {"reasoning": 1}}),
    "several_choices_tools": ("/chat/completions", {"messages": HELLO, "n": 3, "tools": TOOLS}),
    "several_completions": ("/completions", {"prompt": "def fib(n):", "n": 2}),
}


@pytest.mark.parametrize("flavor", ["deepseek", "vllm", "sglang"])
@pytest.mark.parametrize("case", list(CASES))
def test_assembled_answer_equals_the_upstreams_own_non_stream_answer(gw: Gateway, key: str, fakes: dict[str, Fake],
                                                                     flavor: str, case: str) -> None:
    path, body = CASES[case]
    streamed = post(gw, key, path, {"model": f"eq/{flavor}-stream", **body})
    sent = fakes[flavor].last()["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}  # upstream: a stream
    passed = post(gw, key, path, {"model": f"eq/{flavor}-pass", **body})
    assert "stream" not in fakes[flavor].last()["body"]  # upstream: the JSON body
    assert streamed.status_code == passed.status_code == 200, (streamed.text, passed.text)
    a, b = streamed.json(), passed.json()
    assert a["object"] == b["object"] == ("chat.completion" if path == "/chat/completions" else "text_completion")
    assert comparable(a, flavor) == comparable(b, flavor)  # text, reasoning, tool calls, logprobs, usage and cost
    assert a["usage"]["completion_tokens"] > 0
    assert [c["index"] for c in a["choices"]] == list(range(body.get("n", 1)))
    if case.startswith("reasoning"):
        assert a["choices"][0]["message"]["reasoning_content"]
        assert a["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    rec = record(gw, key, id=a["id"])
    assert rec is not None and rec["outcome"] == "completed" and rec["stream"] is False
    assert rec["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]
    assert rec["finish_reason"] == a["choices"][0]["finish_reason"]
    assert rec["ttft_ms"] is not None  # the gate measured the first chunk


def test_the_sdk_reads_an_assembled_tool_call(gw: Gateway, key: str) -> None:
    client = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
    r = client.chat.completions.create(model="eq/deepseek-stream", messages=HELLO, tools=TOOLS,  # type: ignore[arg-type]
                                       extra_body={"fake": {"parallel_tools": 2}})
    calls = r.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "London"}]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert r.system_fingerprint == "fp_fake_deepseek"


# ---- a hosted upstream that accepts and hangs ----------------------------------------------------------------------


@pytest.mark.parametrize("knobs,code", [
    ({"error_rate": 1, "error_kind": "hang", "stall_ms": STALL_MS}, "upstream_timeout"),  # not even headers
    ({"ttft_ms": STALL_MS}, "first_token_timeout"),  # 200 and headers, then nothing
])
def test_a_hung_hosted_upstream_is_left_after_first_token(gw: Gateway, key: str, fakes: dict[str, Fake],
                                                           knobs: dict[str, Any], code: str) -> None:
    fakes["deepseek"].configure(**knobs)
    client = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(model="fo/hosted-then-vllm", messages=HELLO)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-therouter-provider"] == "vllm-pass"  # passthrough: DeepSeek's answer after the stall
    rec = record(gw, key, id=raw.headers["x-therouter-generation-id"])
    assert rec is not None and rec["provider"] == "vllm-pass"
    first = rec["attempts"][0]
    assert (first["provider"], first["outcome"], first["code"]) == ("deepseek-stream", "error", code), first
    assert first["latency_ms"] < STALL_MS  # abandoned at first_token, long before the upstream would have answered


# ---- a client that leaves ------------------------------------------------------------------------------------------


def _send_and_leave(gw: Gateway, key: str, body: dict[str, Any], rid: str, after: float) -> None:
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
              + b"\r\nx-request-id: " + rid.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    time.sleep(after)  # the upstream is streaming; the client gets nothing until the answer is whole
    s.close()


def test_a_non_stream_client_that_leaves_is_billed_what_was_produced(gw: Gateway, key: str,
                                                                     fakes: dict[str, Fake]) -> None:
    chunks = 100
    fakes["deepseek"].configure(chunks=chunks, chunk_delay_ms=100)  # a 10 s answer
    fakes["deepseek"].reset()
    rid = "leave-" + uuid.uuid4().hex[:8]
    _send_and_leave(gw, key, {"model": "eq/deepseek-stream", "messages": HELLO}, rid, after=1.0)
    rec = wait_for(lambda: record(gw, key, request_id=rid), 8)
    assert rec, "the request was never metered"
    assert rec["outcome"] == "client_cancelled" and rec["stream"] is False
    assert 0 < rec["usage"]["completion_tokens"] < chunks  # what was produced, not the whole answer, not nothing
    assert rec["usage"]["estimated"] is True and rec["cost_nano"] > 0
    last = wait_for(lambda: [e for e in fakes["deepseek"].stats()["log"] if e.get("t_end")], 8)[-1]
    assert last["closed_by"] == "client" and last["tokens_sent"] < chunks  # the upstream was closed, not finished


def test_a_passthrough_hosted_answer_still_finishes_when_its_client_leaves(gw: Gateway, key: str,
                                                                           fakes: dict[str, Fake]) -> None:
    """`on_client_disconnect: finish` (hosted default) keeps its meaning for passthrough: the answer completes
    upstream (we owe the provider for it) and the full usage is billed."""
    fakes["deepseek"].configure(latency_ms=1500)
    fakes["deepseek"].reset()
    rid = "finish-" + uuid.uuid4().hex[:8]
    _send_and_leave(gw, key, {"model": "eq/deepseek-pass", "messages": HELLO}, rid, after=0.4)
    rec = wait_for(lambda: record(gw, key, request_id=rid), 8)
    assert rec and rec["outcome"] == "completed" and rec["usage"]["completion_tokens"] == 8
    last = wait_for(lambda: [e for e in fakes["deepseek"].stats()["log"] if e.get("t_end")], 8)[-1]
    assert last["closed_by"] == "server"


# ---- a break after the first chunk ---------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs,code,outcome", [
    ({"error_rate": 1, "error_kind": "cut", "cut_after": 3}, "upstream_stream_error", "upstream_cut"),  # conn. broke
    ({"error_rate": 1, "error_kind": "stall", "stall_after": 3, "stall_ms": 30000}, "stream_idle_timeout",
     "upstream_cut"),
    ({"error_rate": 1, "error_kind": "in_band_mid", "cut_after": 3}, "upstream_in_band_error", "upstream_error"),
])
def test_a_break_after_the_first_chunk_is_an_error_answer_billed_like_a_broken_stream(
        gw: Gateway, key: str, fakes: dict[str, Fake], knobs: dict[str, Any], code: str, outcome: str) -> None:
    fakes["deepseek"].configure(**knobs)
    fakes["vllm"].reset()
    r = post(gw, key, "/chat/completions", {"model": "fo/hosted-then-vllm", "messages": HELLO})
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["type"] == "server_error"
    assert "deepseek-stream" in err["message"] and not re.search(r"127\.0\.0\.1|Traceback", r.text)
    assert fakes["vllm"].stats()["requests"] == 0  # it had started: no fallback, no second bill
    rec = record(gw, key, id=r.headers["x-therouter-generation-id"])
    assert rec is not None and rec["outcome"] == outcome and rec["provider"] == "deepseek-stream"
    assert rec["usage"]["completion_tokens"] > 0 and rec["cost_nano"] > 0  # the produced tokens are billed
    assert rec["attempts"][-1]["stream_error"]["code"] == code
