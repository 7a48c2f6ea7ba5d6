"""The parameter policy as real clients meet it: hints dropped where a deployment lacks them (named in a header and the
record, absent from the upstream body), shaping parameters never dropped, require_parameters and the config's reject
policy, downgrades made visible, and reasoning controls mapped per host. Real gateway, fake upstreams, redis-server,
the official OpenAI SDK and raw httpx."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Fake, Gateway, gateway_config, make_key, start_gateway, stop
from therouter.redisproc import RedisProcess

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hello there"}]
BASE = ["temperature", "max_tokens", "top_p", "tools", "tool_choice", "response_format", "stop"]
SELFHOST = [*BASE, "seed", "logit_bias", "n", "parallel_tool_calls", "user", "logprobs", "top_logprobs",
            "presence_penalty", "frequency_penalty"]
# hint -> a non-default value; none of these is honoured by the test config's hosted deployment
HINTS: dict[str, Any] = {"seed": 42, "presence_penalty": 0.5, "frequency_penalty": -0.3, "logit_bias": {"50256": -100},
                         "parallel_tool_calls": False, "user": "user-1", "top_logprobs": 3}
NOBODY: dict[str, Any] = {"service_tier": "flex", "metadata": {"team": "a"}, "store": True,
                          "prediction": {"type": "content", "content": "x"}}


def _config(redis_url: str, prefix: str, fakes: dict[str, Fake], data: Path, **routing: Any) -> dict[str, Any]:
    cfg = gateway_config(redis_url, prefix, fakes, data)
    deps = cfg["models"][MODEL]["deployments"]
    for d in deps[1:]:  # the self-hosted ones honour more than the hosted one
        d["parameters"] = SELFHOST
    card = cfg["models"][MODEL]
    cfg["models"]["test/thinking"] = {**card, "deployments": [
        {"provider": "deepseek", "model": "deepseek-v3.2", "capabilities": ["tools", "reasoning"]},
        {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2", "priority": 1,
         "capabilities": ["tools", "reasoning"]}]}
    cfg["models"]["test/plain-vllm"] = {**card, "deployments": [
        {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2", "capabilities": ["tools"]}]}
    if routing:
        cfg["routing"] = routing
    return cfg


@pytest.fixture(scope="module")
def gw(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("params")
    g = start_gateway(_config(redis_proc.url, f"pp{uuid.uuid4().hex[:6]}:", fakes, tmp / "data"), tmp)
    yield g
    stop(g.proc)


@pytest.fixture(scope="module")
def key(gw: Gateway) -> str:
    return asyncio.run(make_key(gw, "params"))


def post(gw: Gateway, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def record(gw: Gateway, key: str, gen_id: str) -> dict[str, Any]:
    r = httpx.get(gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted({**HINTS, **NOBODY}))
def test_a_hint_the_deployment_lacks_is_dropped_and_named(gw: Gateway, key: str, fakes: dict[str, Fake],
                                                          name: str) -> None:
    fakes["deepseek"].reset()
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                      extra_body={name: {**HINTS, **NOBODY}[name]})
    assert raw.headers["x-therouter-provider"] == "deepseek"
    assert raw.headers["x-therouter-dropped-params"].split(",") == [name]
    assert name not in fakes["deepseek"].last()["body"]  # never sent upstream
    assert record(gw, key, raw.parse().id)["dropped_params"] == [name]


def test_several_hints_and_openai_defaults_all_work(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    """What eval harnesses and agent frameworks send by default never gets a 400."""
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, seed=1, presence_penalty=0, frequency_penalty=0, n=1, logprobs=False,
        user="u", extra_body={"parallel_tool_calls": True})
    assert raw.parse().choices[0].message.content
    assert set(raw.headers["x-therouter-dropped-params"].split(",")) == {
        "seed", "presence_penalty", "frequency_penalty", "parallel_tool_calls", "user"}


def test_a_deployment_that_honours_the_hint_gets_it(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    fakes["vllm"].reset()
    r = post(gw, key, {"model": "selfhost/only-vllm", "messages": HELLO, "seed": 7})
    assert r.status_code == 200
    assert "x-therouter-dropped-params" in r.headers  # the selfhost card does not list seed either
    r = post(gw, key, {"model": MODEL, "messages": HELLO, "seed": 7, "provider": {"order": ["vllm-local"]}})
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "vllm-local"
    assert "x-therouter-dropped-params" not in r.headers
    assert fakes["vllm"].last()["body"]["seed"] == 7


@pytest.mark.parametrize("name", sorted(HINTS))
def test_require_parameters_routes_to_a_host_that_honours_it(gw: Gateway, key: str, name: str) -> None:
    r = post(gw, key, {"model": MODEL, "messages": HELLO, name: HINTS[name], "provider": {"require_parameters": True}})
    assert r.status_code == 200, r.text
    assert r.headers["x-therouter-provider"] == "vllm-local" and "x-therouter-dropped-params" not in r.headers


@pytest.mark.parametrize("name", sorted(NOBODY))
def test_require_parameters_with_no_host_is_400_naming_it(gw: Gateway, key: str, name: str) -> None:
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO,
                                  extra_body={name: NOBODY[name], "provider": {"require_parameters": True}})
    assert (e.value.code, e.value.param) == ("unsupported_parameter", name)


def test_require_parameters_ignores_default_values(gw: Gateway, key: str) -> None:
    r = post(gw, key, {"model": MODEL, "messages": HELLO, "presence_penalty": 0, "parallel_tool_calls": True,
                       "provider": {"require_parameters": True}})
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "deepseek"


def test_config_reject_policy(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path: Path) -> None:
    g = start_gateway(_config(redis_proc.url, f"rj{uuid.uuid4().hex[:6]}:", fakes, tmp_path / "d",
                              unsupported_parameters="reject"), tmp_path)
    try:
        k = asyncio.run(make_key(g, "reject"))
        r = post(g, k, {"model": MODEL, "messages": HELLO, "service_tier": "flex"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"
        assert r.json()["error"]["code"] == "unsupported_parameter"
        r = post(g, k, {"model": MODEL, "messages": HELLO, "seed": 3})
        assert r.status_code == 200 and r.headers["x-therouter-provider"] == "vllm-local"
    finally:
        stop(g.proc)


def test_shaping_parameters_are_never_dropped(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    # logprobs and n > 1 change the answer: only the self-hosted deployments honour them, so they serve
    fakes["vllm"].reset()
    r = post(gw, key, {"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "vllm-local", r.text
    assert fakes["vllm"].last()["body"]["logprobs"] is True and fakes["vllm"].last()["body"]["top_logprobs"] == 2
    assert "x-therouter-dropped-params" not in r.headers
    r = post(gw, key, {"model": MODEL, "messages": HELLO, "n": 2})
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "vllm-local"
    assert fakes["vllm"].last()["body"]["n"] == 2
    # no deployment of the model honours them: a 400 naming the parameter, never a silent drop
    for body, param in (({"logprobs": True}, "logprobs"), ({"n": 3}, "n")):
        r = post(gw, key, {"model": "test/plain-vllm", "messages": HELLO, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_json_schema_downgrade_is_visible(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, response_format=rf)  # type: ignore[arg-type]
    assert raw.headers["x-therouter-provider"] == "deepseek"
    assert raw.headers["x-therouter-downgraded"] == "json_schema"
    assert record(gw, key, raw.parse().id)["downgraded"] == ["json_schema"]
    # require_parameters: only a deployment with native json_schema
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, response_format=rf,  # type: ignore[arg-type]
                                                      extra_body={"provider": {"require_parameters": True}})
    assert raw.headers["x-therouter-provider"] == "vllm-local" and "x-therouter-downgraded" not in raw.headers
    assert record(gw, key, raw.parse().id)["downgraded"] == []


# ---- reasoning controls ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,deepseek,vllm", [
    ({"reasoning": {"effort": "medium"}}, {"reasoning_effort": "high"}, {"thinking": True}),
    ({"reasoning_effort": "xhigh"}, {"reasoning_effort": "max"}, {"thinking": True}),
    ({"reasoning": {"enabled": False}}, {"thinking": {"type": "disabled"}}, {"thinking": False}),
    ({"reasoning": {"effort": "none"}}, {"thinking": {"type": "disabled"}}, {"thinking": False}),
    ({"reasoning": {"max_tokens": 2000}}, {"thinking": {"type": "enabled"}}, {"thinking": True}),
])
def test_reasoning_controls_map_to_each_host(gw: Gateway, key: str, fakes: dict[str, Fake], body: dict[str, Any],
                                             deepseek: dict[str, Any], vllm: dict[str, Any]) -> None:
    for provider, fake, expected in (("deepseek", "deepseek", deepseek), ("vllm-local", "vllm", vllm)):
        fakes[fake].reset()
        r = post(gw, key, {"model": "test/thinking", "messages": HELLO, **body, "provider": {"order": [provider]}})
        assert r.status_code == 200 and r.headers["x-therouter-provider"] == provider, r.text
        sent = fakes[fake].last()["body"]
        assert "reasoning" not in sent  # OpenRouter's object never goes upstream
        if fake == "vllm":
            assert sent["chat_template_kwargs"] == expected
        else:
            assert {k: sent.get(k) for k in expected} == expected
        assert "x-therouter-dropped-params" not in r.headers


def test_reasoning_is_dropped_where_a_host_has_no_switch(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    fakes["vllm"].reset()
    r = post(gw, key, {"model": "test/plain-vllm", "messages": HELLO, "reasoning": {"effort": "high"}})
    assert r.status_code == 200 and r.headers["x-therouter-dropped-params"] == "reasoning"
    assert "reasoning" not in fakes["vllm"].last()["body"]


def test_reasoning_exclude_strips_it_but_bills_it(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(reasoning=True)
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    body: dict[str, Any] = {"model": "test/thinking", "messages": HELLO, "extra_body": {"reasoning": {"exclude": True}}}
    r = c.chat.completions.create(**body)
    assert r.choices[0].message.content and (r.choices[0].message.model_extra or {}).get("reasoning_content") is None
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens and r.usage.completion_tokens_details.reasoning_tokens > 0
    rec = record(gw, key, r.id)
    assert rec["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0 and rec["cost_nano"] > 0

    chunks = list(c.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert not any((ch.choices[0].delta.model_extra or {}).get("reasoning_content") for ch in chunks if ch.choices)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens_details is not None
    assert (chunks[-1].usage.completion_tokens_details.reasoning_tokens or 0) > 0
    # without exclude the same upstream shows its reasoning
    r = c.chat.completions.create(model="test/thinking", messages=HELLO)
    assert (r.choices[0].message.model_extra or {}).get("reasoning_content")


def test_models_show_what_each_deployment_honours(gw: Gateway, key: str) -> None:
    r = httpx.get(gw.v1 + "/models/" + MODEL, headers={"Authorization": f"Bearer {key}"})
    entry = r.json()
    assert set(SELFHOST) <= set(entry["supported_parameters"])  # some deployment honours each
    by = {d["provider"]: set(d["supported_parameters"]) for d in entry["deployments"]}
    assert "seed" not in by["deepseek"] and {"seed", "n", "logit_bias"} <= by["vllm-local"]
