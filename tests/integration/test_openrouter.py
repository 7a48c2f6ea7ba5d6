"""OpenRouter-compatible shapes beside ours, with real processes: `/v1/key`, `/v1/generation` and `/v1/models` read
with a plain HTTP client under OpenRouter's field names, every route under `/api/v1` (OpenRouter's base path, driven
with the OpenAI SDK), and model aliases resolved before routing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Fake, Gateway, make_key, start_gateway, stop
from therouter.redisproc import RedisProcess

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "Say hello"}]
T = {"connect": 1, "first_token": 2, "idle": 2, "total": 20}
CARD: dict[str, Any] = {
    "context_length": 4096, "max_output_tokens": 1024,
    "supported_parameters": ["temperature", "max_tokens", "top_p", "tools", "tool_choice", "stop"],
    "pricing": {"input": 0.96, "cached_input": 0.24, "output": 2.88},
}


@pytest.fixture(scope="module")
def gw(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = Path(tmp_path_factory.mktemp("openrouter"))
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "request_deadline": 30, "model_check_interval": 0},
        "store": {"redis_url": redis_proc.url, "key_prefix": f"or{uuid.uuid4().hex[:8]}:"},
        "data_dir": str(tmp / "data"),
        "providers": {
            "deepseek": {"kind": "deepseek", "base_url": fakes["deepseek"].url, "api_key_env": "TEST_DEEPSEEK_KEY",
                         "timeouts": T},
            "vllm-local": {"kind": "vllm", "base_url": fakes["vllm"].url + "/v1", "timeouts": T},
        },
        "models": {
            MODEL: {**CARD, "aliases": ["deepseek-chat", "deepseek-v3.2"], "deployments": [
                {"provider": "deepseek", "model": "deepseek-v3.2", "capabilities": ["tools"]},
                {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2", "priority": 1,
                 "context_length": 2048, "capabilities": ["tools"]}]},
            "selfhost/only-vllm": {**CARD, "aliases": ["local"], "modalities": {"input": ["text", "image"]},
                                   "pricing": {"input": 0.0028, "output": 0.000000001},
                                   "deployments": [{"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2"}]},
        },
    }
    g = start_gateway(cfg, tmp)
    yield g
    stop(g.proc)


def get(gw: Gateway, key: str, path: str, base: str = "/v1", **params: str) -> dict[str, Any]:
    r = httpx.get(gw.url + base + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200, r.text
    return json.loads(r.text, parse_float=Decimal)  # type: ignore[no-any-return]  # money read exactly


def chat(gw: Gateway, key: str, **body: Any) -> httpx.Response:
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": MODEL, "messages": HELLO, **body}, timeout=30)
    r.read()
    assert r.status_code == 200, r.text
    return r


# ---- GET /v1/key ------------------------------------------------------------------------------------------------


def test_key_has_openrouters_fields_beside_ours(gw: Gateway) -> None:
    key = asyncio.run(make_key(gw, "dashboard", budget_nano=5 * 10**9, budget_period="month", rpm=100))
    before = get(gw, key, "/key")["data"]
    assert (before["label"], before["usage"], before["limit"], before["limit_remaining"]) == \
        ("dashboard", Decimal("0.00"), Decimal("5.00"), Decimal("5.00"))
    assert before["limit_reset"] == "monthly" and before["is_free_tier"] is False
    assert before["rate_limit"] == {"requests": 100, "interval": "1m"}
    chat(gw, key)
    data = get(gw, key, "/key")["data"]
    spent = Decimal(data["total_spend_nano"]) / 10**9
    assert spent > 0 and data["usage"] == spent  # USD, exact
    assert data["limit_remaining"] == Decimal(5) - Decimal(data["spend_nano"]) / 10**9
    assert data["budget_nano"] == 5 * 10**9 and data["limits"]["rpm"] == 100  # ours are all still there
    assert get(gw, key, "/auth/key")["data"]["usage"] == spent  # OpenRouter's older path


@pytest.mark.parametrize("limits,reset", [({}, None), ({"budget_nano": 10**9, "budget_period": "day"}, "daily"),
                                          ({"budget_nano": 10**9}, None)])
def test_key_limit_reset_follows_the_budget_period(gw: Gateway, limits: dict[str, Any], reset: str | None) -> None:
    key = asyncio.run(make_key(gw, "", **limits))
    data = get(gw, key, "/key")["data"]
    assert data["limit_reset"] == reset
    assert data["label"].startswith("tr-")  # a key without a name is labelled by its display form, never in full
    if not limits:
        assert (data["limit"], data["limit_remaining"]) == (None, None)
        assert data["rate_limit"] == {"requests": -1, "interval": "1m"}  # no limit


# ---- GET /v1/generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_generation_has_openrouters_fields_beside_ours(gw: Gateway, fakes: dict[str, Fake], stream: bool) -> None:
    key = asyncio.run(make_key(gw, "tracker"))
    fakes["deepseek"].configure(cached_tokens=3, reasoning=2)
    r = chat(gw, key, stream=stream, messages=[{"role": "user", "content": "Say hello to everyone in the room"}],
             **({"stream_options": {"include_usage": True}} if stream else {}))
    rec = get(gw, key, "/generation", id=r.headers["x-therouter-generation-id"])["data"]
    u = rec["usage"]  # ours, OpenAI's token shape (OpenRouter puts its cost under this name: see total_cost)
    assert rec["total_cost"] == Decimal(rec["cost_nano"]) / 10**9 > 0
    assert (rec["tokens_prompt"], rec["tokens_completion"]) == (u["prompt_tokens"], u["completion_tokens"])
    assert (rec["native_tokens_prompt"], rec["native_tokens_completion"]) == (u["prompt_tokens"],
                                                                             u["completion_tokens"])
    assert rec["native_tokens_cached"] == 3
    assert rec["native_tokens_reasoning"] == u["completion_tokens_details"]["reasoning_tokens"] == 2
    assert rec["latency"] == rec["ttft_ms"] and 0 <= rec["latency"] <= rec["generation_time"] == rec["latency_ms"]
    assert (rec["provider_name"], rec["model"], rec["finish_reason"]) == ("deepseek", MODEL, "stop")
    assert datetime.fromisoformat(rec["created_at"]).timestamp() == rec["created"]
    assert (rec["streamed"], rec["cancelled"], rec["origin"], rec["app_id"]) == (stream, False, "", None)


def test_generation_of_a_passthrough_answer_has_its_whole_time_as_latency(gw: Gateway) -> None:
    key = asyncio.run(make_key(gw, "tracker"))
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "local", "messages": HELLO}, timeout=30)
    rec = get(gw, key, "/generation", id=r.json()["id"])["data"]
    assert rec["ttft_ms"] is None and rec["latency"] == rec["generation_time"] == rec["latency_ms"]
    assert rec["provider_name"] == "vllm-local" and rec["streamed"] is False and rec["finish_reason"] == "stop"


# ---- GET /v1/models ---------------------------------------------------------------------------------------------


def test_models_carry_openrouters_per_token_prices_and_limits_beside_ours(gw: Gateway) -> None:
    key = asyncio.run(make_key(gw, "catalogue"))
    data = {m["id"]: m for m in get(gw, key, "/models")["data"]}
    m = data[MODEL]
    assert m["pricing"]["prompt"] == "0.00000096" and m["pricing"]["completion"] == "0.00000288"
    assert m["pricing"]["input_cache_read"] == "0.00000024"
    assert (m["pricing"]["input"], m["pricing"]["output"], m["pricing"]["unit"]) == ("0.96", "2.88",
                                                                                   "USD per 1M tokens")
    assert m["top_provider"] == {"context_length": 4096, "max_completion_tokens": 1024, "is_moderated": False}
    assert m["architecture"]["input_modalities"] == ["text"] and m["architecture"]["output_modalities"] == ["text"]
    assert "tools" in m["supported_parameters"] and m["context_length"] == 4096
    cheap = data["selfhost/only-vllm"]["pricing"]
    assert (cheap["prompt"], cheap["completion"]) == ("0.0000000028", "0.000000000000001")  # exact, no float
    assert data["selfhost/only-vllm"]["architecture"]["modality"] == "text+image->text"
    # each alias is an entry of its own naming its model
    assert {i: data[i]["alias_of"] for i in ("deepseek-chat", "deepseek-v3.2", "local")} == {
        "deepseek-chat": MODEL, "deepseek-v3.2": MODEL, "local": "selfhost/only-vllm"}
    assert data["deepseek-chat"]["pricing"] == m["pricing"] and "alias_of" not in m
    one = get(gw, key, "/models/deepseek-chat")
    assert (one["id"], one["alias_of"]) == ("deepseek-chat", MODEL)


def test_models_list_only_what_the_key_may_use_aliases_included(gw: Gateway) -> None:
    key = asyncio.run(make_key(gw, "narrow", models=("deepseek-chat",)))  # an alias in a key's list is its model
    assert {m["id"] for m in get(gw, key, "/models")["data"]} == {MODEL, "deepseek-chat", "deepseek-v3.2"}
    r = httpx.get(gw.v1 + "/models/local", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ---- /api/v1: OpenRouter's base path ---------------------------------------------------------------------------


def test_an_app_configured_for_openrouter_only_changes_its_base_url(gw: Gateway) -> None:
    key = asyncio.run(make_key(gw, "openrouter-app", budget_nano=10**9))
    client = openai.OpenAI(base_url=gw.url + "/api/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    r = raw.parse()
    assert r.choices[0].message.content and r.model == MODEL
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert MODEL in {m.id for m in client.models.list()}
    gen = client.get("/generation", cast_to=object, options={"params": {"id": r.id}})
    assert isinstance(gen, dict) and gen["data"]["id"] == r.id and gen["data"]["total_cost"] > 0
    info = client.get("/key", cast_to=object)
    assert isinstance(info, dict) and info["data"]["limit"] == 1 and info["data"]["usage"] > 0
    comp = client.completions.create(model=MODEL, prompt="def fib(n):")
    assert comp.choices[0].text


# ---- aliases ----------------------------------------------------------------------------------------------------


def test_an_alias_resolves_before_routing(gw: Gateway, fakes: dict[str, Fake]) -> None:
    key = asyncio.run(make_key(gw, "alias", models=(MODEL,)))
    client = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HELLO)  # type: ignore[arg-type]
    r = raw.parse()
    assert r.model == MODEL  # the answer names the canonical model, as OpenRouter does
    assert fakes["deepseek"].last()["body"]["model"] == "deepseek-v3.2"  # the deployment's upstream id
    rec = get(gw, key, "/generation", id=r.id)["data"]
    assert rec["model"] == MODEL and rec["cost_nano"] > 0
    assert get(gw, key, "/key")["data"]["requests"] == 1


def test_an_alias_counts_as_its_model_for_allowlists_and_fallbacks(gw: Gateway) -> None:
    narrow = asyncio.run(make_key(gw, "narrow", models=("selfhost/only-vllm",)))
    client = openai.OpenAI(base_url=gw.v1, api_key=narrow, max_retries=0, timeout=30)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="deepseek-chat", messages=HELLO)  # type: ignore[arg-type]
    assert "deepseek-chat" in e.value.message
    assert client.chat.completions.create(model="local", messages=HELLO).model == "selfhost/only-vllm"  # type: ignore[arg-type]
    wide = asyncio.run(make_key(gw, "wide"))
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {wide}"},
                   json={"model": "deepseek-chat", "messages": HELLO, "models": ["local"],
                         "provider": {"only": ["nowhere-else"]}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "provider"  # parsed past the alias in `models`
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {wide}"},
                   json={"model": "deepseek-chat", "messages": HELLO, "models": ["local"],
                         "provider": {"ignore": ["deepseek"]}}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == MODEL  # served by deepseek/deepseek-v3.2 on vllm-local
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {wide}"},
                   json={"model": "no-such-alias", "messages": HELLO}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
