"""The money invariant under a mixed run: spend <= budget and the counters equal the sum of the records.

Two real gateways share one redis-server. One key with a budget sends, concurrently and until the budget refuses
more: requests with both output-limit fields, json_schema requests downgraded to a JSON-mode-only deployment (the
schema sent as an instruction), `models` fallbacks from a cheap dead model to a dear one, n > 1, and streams with
usage; meanwhile a stream on the other gateway is cut by SIGKILL and settled by the survivor as `gateway_lost`.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import openai

from tests.integration.conftest import Fake, make_key, start_gateway, stop
from tests.integration.test_crash import (
    _rebuild,
    checkpointed,
    crash_config,
    key_info,
    kill,
    lost_record,
    start_stream,
    wait_for,
)
from therouter.redisproc import RedisProcess

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hello there, how are you"}]
BUDGET = 30_000_000  # $0.03


def _card(pricing: dict[str, float], deployments: list[dict[str, Any]], *params: str) -> dict[str, Any]:
    return {"context_length": 131072, "max_output_tokens": 1024, "pricing": pricing, "deployments": deployments,
            "supported_parameters": ["temperature", "max_tokens", "top_p", "tools", "tool_choice", "response_format",
                                     "stop", *params]}


def _config(redis_url: str, prefix: str, fakes: dict[str, Fake], data: Path) -> dict[str, Any]:
    cfg = crash_config(redis_url, prefix, fakes, data)
    vllm = {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2", "capabilities": ["json_schema"]}
    cfg["models"].update({
        "test/n-capable": _card({"input": 0.96, "output": 2.88}, [vllm], "n"),
        "test/cheap-dead": _card({"input": 0.01, "output": 0.02}, [{"provider": "nowhere", "model": "m"}]),
        "test/dear": _card({"input": 9.6, "output": 28.8}, [vllm]),
        "test/json-object-only": _card({"input": 0.96, "output": 2.88}, [
            {"provider": "deepseek", "model": "deepseek-v3.2", "capabilities": ["json_object"]}]),
    })
    return cfg


SCHEMA = {"type": "object", "properties": {f"f{i}": {"type": "string", "description": "d" * 60} for i in range(150)}}
KINDS: dict[str, dict[str, Any]] = {
    "both_limits": {"model": MODEL, "messages": HELLO, "max_tokens": 900, "max_completion_tokens": 6},
    "downgrade": {"model": "test/json-object-only", "messages": HELLO, "max_tokens": 40,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
    "fallback": {"model": "test/cheap-dead", "messages": HELLO, "max_tokens": 20,
                 "extra_body": {"models": ["test/dear"]}},
    "n3": {"model": "test/n-capable", "messages": HELLO, "max_tokens": 30, "n": 3},
    "stream": {"model": MODEL, "messages": HELLO, "max_tokens": 50, "stream": True,
               "stream_options": {"include_usage": True}},
}


async def _mixed(url: str, key: str, rounds: int) -> tuple[dict[str, list[str]], int]:
    """Waves of one request of every kind at once; returns the generation ids served per kind and the 402 count."""
    c = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
    served: dict[str, list[str]] = {k: [] for k in KINDS}
    refused = 0

    async def one(kind: str) -> None:
        nonlocal refused
        body = dict(KINDS[kind])
        try:
            if body.get("stream"):
                gen_id = ""
                async for chunk in await c.chat.completions.create(**body):
                    gen_id = chunk.id
                served[kind].append(gen_id)
            else:
                served[kind].append((await c.chat.completions.create(**body)).id)
        except openai.APIStatusError as e:
            assert e.status_code == 402, (kind, e.status_code, e.message)
            refused += 1

    for _ in range(rounds):
        await asyncio.gather(*(one(k) for k in KINDS for _ in range(2)))
    return served, refused


def test_spend_never_passes_the_budget_and_counters_equal_records(redis_proc: RedisProcess, fakes: dict[str, Fake],
                                                                  tmp_path: Path) -> None:
    prefix = f"mi{uuid.uuid4().hex[:6]}:"
    a = start_gateway(_config(redis_proc.url, prefix, fakes, tmp_path / "a"), tmp_path)
    b = start_gateway(_config(redis_proc.url, prefix, fakes, tmp_path / "b"), tmp_path)
    stream = None
    try:
        key = asyncio.run(make_key(a, "mixed", budget_nano=BUDGET))
        fakes["deepseek"].configure(chunks=80, chunk_delay_ms=100)
        lost_id, stream = start_stream(a, key, 3)
        wait_for(lambda: checkpointed(a, lost_id), 10)
        kill(a)  # mid-stream: its reservation must not hold the budget, and it must leave a record
        fakes["deepseek"].configure(chunks=8, chunk_delay_ms=0, latency_ms=50)
        fakes["vllm"].configure(latency_ms=50)
        served, refused = asyncio.run(_mixed(b.v1, key, rounds=12))
        assert all(served[k] for k in KINDS), {k: len(v) for k, v in served.items()}  # every kind was exercised
        assert refused > 0  # the run reached the budget

        lost = lost_record(b, key, lost_id)
        assert lost["outcome"] == "gateway_lost" and lost["cost_nano"] > 0
        info = key_info(b, key)
        assert info["reserved_nano"] == 0
        assert info["spend_nano"] <= BUDGET
        report = asyncio.run(_rebuild(b, info["key_id"]))
        n_served = sum(len(v) for v in served.values())
        assert report["records"] == n_served + 1  # every served request and the lost one
        assert report["match"] is True and report["after"]["per:total"]["cost"] == info["spend_nano"]
        # each fallback was priced at the dear model that served it
        assert all(asyncio.run(_model_of(b, key, g)) == "test/dear" for g in served["fallback"])
    finally:
        if stream is not None:
            stream.response.close()
        for g in (a, b):
            stop(g.proc)


async def _model_of(gw: Any, key: str, gen_id: str) -> str:
    import httpx

    async with httpx.AsyncClient() as h:
        r = await h.get(gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {key}"})
        return str(r.json()["data"]["model"])
