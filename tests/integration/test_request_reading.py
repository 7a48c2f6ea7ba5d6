"""One reading of every request (issue: money and safety): the output limit, OpenAI's strict types, n > 1, prompt
estimates taken from what is sent upstream, `models` fallbacks priced at the model that served, and the steering
guard where it belongs. Real gateway, fake upstreams and redis-server; the official OpenAI SDK or raw httpx."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Fake, Gateway, gateway_config, make_key, start_gateway, stop
from therouter.config import StoreConfig, parse_settings
from therouter.metering.meter import Meter
from therouter.redisproc import RedisProcess
from therouter.store import Store

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hello there, how are you"}]
CHEAP = {"input": 0.01, "cached_input": 0.01, "output": 0.02}
DEAR = {"input": 9.6, "cached_input": 9.6, "output": 28.8}


def _card(pricing: dict[str, float], deployments: list[dict[str, Any]], params: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"context_length": 4096, "max_output_tokens": 1024, "pricing": pricing, "deployments": deployments,
            "supported_parameters": ["temperature", "max_tokens", "top_p", "tools", "tool_choice", "response_format",
                                     "stop", *params]}


@pytest.fixture(scope="module")
def gw(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("reading")
    cfg = gateway_config(redis_proc.url, f"rr{uuid.uuid4().hex[:6]}:", fakes, tmp / "data")
    vllm = {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2", "capabilities": ["json_schema"]}
    cfg["models"].update({
        "test/n-capable": _card({"input": 0.96, "output": 2.88}, [vllm], ("n",)),
        "test/cheap-dead": _card(CHEAP, [{"provider": "nowhere", "model": "m"}]),
        "test/dear": _card(DEAR, [vllm]),
        "test/json-object-only": {**_card({"input": 0.96, "output": 2.88},
                                          [{"provider": "deepseek", "model": "deepseek-v3.2",
                                            "capabilities": ["json_object"]}]), "context_length": 131072},
    })
    g = start_gateway(cfg, tmp)
    yield g
    stop(g.proc)


def key_for(gw: Gateway, **limits: Any) -> str:
    return asyncio.run(make_key(gw, "reading", **limits))


def post(gw: Gateway, key: str, body: dict[str, Any], path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(gw.v1 + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def key_info(gw: Gateway, key: str) -> dict[str, Any]:
    r = httpx.get(gw.v1 + "/key", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def generation(gw: Gateway, key: str, gen_id: str) -> dict[str, Any]:
    r = httpx.get(gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def in_flight_reservation(gw: Gateway, fake: Fake, body: dict[str, Any], path: str = "/chat/completions") -> int:
    """What the gateway reserves for ``body``, seen from outside while the (slowed) upstream holds it."""
    key = key_for(gw, budget_nano=10**13)
    fake.configure(latency_ms=800)
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(post, gw, key, body, path)
            reserved = 0
            while not reserved and not fut.done():
                reserved = key_info(gw, key)["reserved_nano"]
            assert fut.result().status_code == 200, fut.result().text
    finally:
        fake.configure(latency_ms=0)
    assert reserved > 0, "the request was not seen in flight"
    return int(reserved)


# ---- the output limit ---------------------------------------------------------------------------------------------


def test_both_output_limits_send_and_reserve_only_the_smaller(gw: Gateway, fakes: dict[str, Fake]) -> None:
    """Today validation read max_completion_tokens and the adapter sent max_tokens: 1 token reserved, 1000 made."""
    key = key_for(gw)
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    fakes["deepseek"].configure(chunks=40)
    r = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1000, max_completion_tokens=1)
    sent = fakes["deepseek"].last()["body"]
    assert sent.get("max_tokens") == 1 and "max_completion_tokens" not in sent
    assert r.usage is not None and r.usage.completion_tokens <= 1
    r = c.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=7)
    sent = fakes["deepseek"].last()["body"]
    assert sent.get("max_tokens") == 7 and "max_completion_tokens" not in sent


@pytest.mark.parametrize("fields,param", [({"max_tokens": 100000}, "max_tokens"),
                                          ({"max_completion_tokens": 100000}, "max_completion_tokens"),
                                          ({"max_tokens": 5000, "max_completion_tokens": 2000}, "max_completion_tokens")])
def test_output_limit_over_the_card_is_400(gw: Gateway, fields: dict[str, int], param: str) -> None:
    c = openai.OpenAI(base_url=gw.v1, api_key=key_for(gw), max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO, **fields)  # type: ignore[call-overload]
    assert e.value.param == param and e.value.code == "invalid_value"


def test_reservation_follows_the_limit_that_is_sent(gw: Gateway, fakes: dict[str, Fake]) -> None:
    small = in_flight_reservation(gw, fakes["deepseek"], {"model": MODEL, "messages": HELLO,
                                                           "max_tokens": 1000, "max_completion_tokens": 10})
    big = in_flight_reservation(gw, fakes["deepseek"], {"model": MODEL, "messages": HELLO, "max_tokens": 1000})
    # 990 more output tokens at $2.88 per 1M (and the two more digits of the body, at most, at $0.96 per 1M)
    assert 0 <= (big - small) - 990 * 2_880 <= 4 * 960


# ---- OpenAI's types, strictly ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,param", [
    ({"stream": "yes"}, "stream"), ({"stream": "false"}, "stream"), ({"stream": 1}, "stream"),
    ({"max_tokens": "5000"}, "max_tokens"), ({"max_tokens": 50.0}, "max_tokens"),
    ({"max_completion_tokens": "10"}, "max_completion_tokens"), ({"n": "4"}, "n"), ({"temperature": "0.5"}, "temperature"),
    ({"stream": True, "stream_options": {"include_usage": "false"}}, "stream_options.include_usage"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_wrong_types_are_400_invalid_type(gw: Gateway, fakes: dict[str, Fake], fields: dict[str, Any],
                                          param: str) -> None:
    fakes["deepseek"].reset()
    r = post(gw, key_for(gw), {"model": MODEL, "messages": HELLO, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == ("invalid_type", param, "invalid_request_error")
    assert f"'{param}'" in err["message"] and "instead" in err["message"]
    assert fakes["deepseek"].stats()["log"] == []  # nothing reached the upstream


# ---- n > 1 ---------------------------------------------------------------------------------------------------------


def test_n_reserves_every_choice(gw: Gateway, fakes: dict[str, Fake]) -> None:
    body = {"model": "test/n-capable", "messages": HELLO, "max_tokens": 500}
    one = in_flight_reservation(gw, fakes["vllm"], body)
    four = in_flight_reservation(gw, fakes["vllm"], {**body, "n": 4})
    assert 0 <= (four - one) - 3 * 500 * 2_880 <= 16 * 960
    assert fakes["vllm"].last()["body"]["n"] == 4


# ---- prompt estimates from what is sent ---------------------------------------------------------------------------


def _big_schema(kb: int) -> dict[str, Any]:
    props = {f"field_{i:05d}": {"type": "string", "description": "x" * 80} for i in range(kb * 1024 // 110)}
    return {"type": "object", "properties": props}


def test_schema_sent_as_an_instruction_is_reserved_for(gw: Gateway, fakes: dict[str, Fake]) -> None:
    """json_schema to a json_object-only deployment: the schema goes upstream as a system message. Its cost must be
    reserved: 20 parallel requests with a 200 KB schema once spent 96x the key's budget."""
    schema = _big_schema(80)
    rf = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    body = {"model": "test/json-object-only", "messages": HELLO, "max_tokens": 50, "response_format": rf}
    fakes["deepseek"].reset()
    reserved = in_flight_reservation(gw, fakes["deepseek"], body)
    sent = fakes["deepseek"].last()["body"]
    assert sent["response_format"] == {"type": "json_object"}
    instruction = sent["messages"][0]["content"]
    assert len(instruction) > 80_000
    # at least every byte of what was sent at the input price (a token is never less than a byte)
    compact = json.dumps(sent, separators=(",", ":"), ensure_ascii=False).encode()
    assert reserved >= len(compact) * 960 + 50 * 2_880

    key = key_for(gw, budget_nano=reserved * 2)

    async def burst() -> list[Any]:
        c = openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)

        async def one() -> Any:
            try:
                return await c.chat.completions.create(**body)
            except openai.APIStatusError as e:
                return e
        return await asyncio.gather(*(one() for _ in range(20)))

    fakes["deepseek"].configure(latency_ms=300)
    try:
        results = asyncio.run(burst())
    finally:
        fakes["deepseek"].configure(latency_ms=0)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert 1 <= len(ok) <= 2 and all(r.status_code == 402 for r in results if isinstance(r, Exception))
    info = key_info(gw, key)
    assert info["spend_nano"] == sum(generation(gw, key, r.id)["cost_nano"] for r in ok) <= info["budget_nano"]
    assert info["reserved_nano"] == 0


def test_token_id_prompts_are_counted_exactly(gw: Gateway, fakes: dict[str, Fake]) -> None:
    """Token ids count one each: 3000 long ids fit a 4096 window; 5000 short ids do not."""
    key = key_for(gw)
    r = post(gw, key, {"model": MODEL, "prompt": [123456] * 3000, "max_tokens": 10}, "/completions")
    assert r.status_code == 200, r.text
    r = post(gw, key, {"model": MODEL, "prompt": [1] * 5000, "max_tokens": 10}, "/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # a batch of prompts: each is one sequence (reserved), the window bounds the longest
    r = post(gw, key, {"model": MODEL, "prompt": [[1] * 3000, [2] * 3000], "max_tokens": 10}, "/completions")
    assert r.status_code == 200, r.text


def test_token_id_reservation(gw: Gateway, fakes: dict[str, Fake]) -> None:
    ids = in_flight_reservation(gw, fakes["deepseek"], {"model": MODEL, "prompt": [99999] * 1000, "max_tokens": 10},
                                "/completions")
    # 1000 ids + a fixed template allowance at $0.96 per 1M, 10 output tokens at $2.88: not the digits of the JSON
    assert 1000 * 960 + 10 * 2_880 <= ids <= 1200 * 960 + 10 * 2_880


# ---- priced at what served ----------------------------------------------------------------------------------------


def test_models_fallback_is_priced_at_the_model_that_served(gw: Gateway, fakes: dict[str, Fake],
                                                             tmp_path: Path) -> None:
    key = key_for(gw, budget_nano=10**10)
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    r = c.chat.completions.create(model="test/cheap-dead", messages=HELLO, max_tokens=20,
                                  extra_body={"models": ["test/dear"]})
    assert r.model == "test/dear"
    rec = generation(gw, key, r.id)
    assert rec["model"] == "test/dear"
    u = rec["usage"]
    dear_cost = (u["prompt_tokens"] * 9_600_000_000 + u["completion_tokens"] * 28_800_000_000 + 500_000) // 10**6
    assert rec["cost_nano"] == dear_cost > 0
    assert key_info(gw, key)["spend_nano"] == dear_cost

    # `therouter usage` and counters rebuilt from the records name the model that served
    env = {**gw.env, "REDIS_URL": gw.redis_url}
    out = subprocess.run([sys.executable, "-m", "therouter", "usage", "--config", str(gw.config_path)], check=False,
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [ln for ln in out.stdout.splitlines() if key_info(gw, key)["key_id"] in ln]
    assert rows and all("test/dear" in ln and "test/cheap-dead" not in ln for ln in rows), out.stdout

    async def rebuild() -> dict[str, Any]:
        settings = parse_settings(__import__("yaml").safe_load(gw.config_path.read_text()), "cfg", gw.env)
        store = Store(StoreConfig(redis_url=gw.redis_url, key_prefix=gw.prefix))
        try:
            return await Meter(store, settings, tmp_path).rebuild_totals(key_info(gw, key)["key_id"])
        finally:
            await store.aclose()

    report = asyncio.run(rebuild())
    assert report["match"] is True, report


def test_fallback_to_a_dearer_model_is_reserved_at_its_price(gw: Gateway, fakes: dict[str, Fake]) -> None:
    body = {"model": "test/cheap-dead", "messages": HELLO, "max_tokens": 100}
    # a key whose budget covers the cheap model's worst case but not the dear one's is refused up front
    key = key_for(gw, budget_nano=100 * 2_000 * 10)
    r = post(gw, key, {**body, "models": ["test/dear"]})
    assert r.status_code == 402, r.text
    assert key_info(gw, key)["spend_nano"] == 0
    r = post(gw, key, body)  # the cheap model alone fits (and then fails upstream: its only deployment is dead)
    assert r.status_code >= 500, r.text


# ---- the steering guard where it belongs ---------------------------------------------------------------------------


def test_ordinary_fields_named_like_steering_fields_work(gw: Gateway, fakes: dict[str, Fake]) -> None:
    key = key_for(gw)
    tool = {"type": "function", "function": {"name": "http_request", "parameters": {
        "type": "object", "properties": {"url": {"type": "string"}, "headers": {"type": "object"},
                                         "api_key": {"type": "string"}}}}}
    schema = {"type": "object", "properties": {"organization": {"type": "string"}, "base_url": {"type": "string"}}}
    for extra in ({"tools": [tool]},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "org", "schema": schema}}},
                  {"metadata": {"headers": "x", "nested": {"api_base": "http://example"}}},
                  {"messages": [{"role": "user", "content": "what are headers?", "name": "organization"}]}):
        body = {"model": "selfhost/only-vllm", "messages": HELLO, **extra}
        r = post(gw, key, body)
        assert r.status_code == 200, (extra, r.text)
