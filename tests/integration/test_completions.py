"""Legacy /v1/completions and fill-in-the-middle through the real gateway."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.integration.conftest import FIM, Fake, Gateway

MODEL = "deepseek/deepseek-v3.2"


def test_completion_non_stream(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16)
    assert r.object == "text_completion"
    assert r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text
    assert r.usage and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_shape(gateway: Gateway, api_key: str) -> None:
    with httpx.stream("POST", gateway.v1 + "/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "prompt": "abc", "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        body = r.read().decode()
    events = [e[6:] for e in body.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        assert c["object"] == "text_completion"
        for ch in c["choices"]:
            assert "text" in ch and "delta" not in ch
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1


def test_fim_goes_to_deepseek_beta(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    r = client.completions.create(model=MODEL, prompt="def fib(a):", suffix="    return fib(a-1) + fib(a-2)",
                                  max_tokens=32)
    assert r.choices[0].text
    last = fakes["deepseek"].last()
    assert last["path"].endswith("/beta/completions")
    assert last["body"]["prompt"] == "def fib(a):"
    assert last["body"]["suffix"] == "    return fib(a-1) + fib(a-2)"


def test_fim_on_vllm_builds_prompt_and_never_sends_suffix(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    r = client.completions.create(model="selfhost/only-vllm", prompt="def f(x):", suffix="return y", max_tokens=8)
    assert r.choices[0].text
    sent = fakes["vllm"].last()["body"]
    assert "suffix" not in sent
    assert sent["prompt"] == f"{FIM[0]}def f(x):{FIM[1]}return y{FIM[2]}"


def test_fim_fallback_from_deepseek_to_vllm(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="503")
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="a", suffix="b", max_tokens=8)
    assert raw.headers["x-therouter-provider"] == "vllm-local"
    assert "suffix" not in fakes["vllm"].last()["body"]


def test_fim_on_model_without_fim_deployment_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="selfhost/only-sglang", prompt="a", suffix="b")
    assert e.value.param == "suffix"


def test_completion_missing_prompt_400(client: openai.OpenAI, gateway: Gateway, api_key: str) -> None:
    r = httpx.post(gateway.v1 + "/completions", headers={"Authorization": f"Bearer {api_key}"},
                   json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
