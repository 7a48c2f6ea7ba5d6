"""The shipped catalogue's neighbours of the seed model, and what a request that does not fit a model is told."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from therouter import validate
from therouter.config import load_settings
from therouter.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = load_settings(ROOT / "config" / "therouter.yaml", env={})
IMAGE = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                      {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def check(model: str, **body: Any) -> validate.Checked:
    return validate.check("chat", {"model": model, **body}, SETTINGS.models[model], model, catalogue=SETTINGS.models)


def test_the_seeds_neighbours_are_in_the_catalogue() -> None:
    claude = SETTINGS.models["anthropic/claude-opus-4.7"]
    assert claude.modalities.input == ("text", "image")
    assert (claude.pricing.input, claude.pricing.cached_input, claude.pricing.cache_write, claude.pricing.output) \
        == (5_000_000_000, 500_000_000, 6_250_000_000, 25_000_000_000)
    assert [(d.provider, d.model) for d in claude.deployments] == [("anthropic", "claude-opus-4-7")]
    assert SETTINGS.providers["anthropic"].kind == "anthropic" and SETTINGS.providers["anthropic"].is_hosted
    gpt = SETTINGS.models["openai/gpt-5.1"]
    assert SETTINGS.providers[gpt.deployments[0].provider].kind == "openai"
    speciale = SETTINGS.models["deepseek/deepseek-v3.2-speciale"]
    assert {d.provider for d in speciale.deployments} == {"vllm-local", "sglang-local"}  # self-hosted only
    assert all("tools" not in d.capabilities for d in speciale.deployments)


def test_tools_to_speciale_is_a_400_naming_tools() -> None:
    with pytest.raises(InvalidRequest) as ei:
        check("deepseek/deepseek-v3.2-speciale", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    assert ei.value.param == "tools" and ei.value.status == 400
    check("deepseek/deepseek-v3.2-speciale", messages=[{"role": "user", "content": "hi"}])


def test_an_image_to_a_text_only_model_names_the_models_that_take_images() -> None:
    with pytest.raises(InvalidRequest) as ei:
        check("deepseek/deepseek-v3.2", messages=IMAGE)
    e = ei.value
    assert (e.status, e.param, e.code) == (400, "messages", "unsupported_modality")
    assert e.message.endswith("Models that accept image input: anthropic/claude-opus-4.7, openai/gpt-5.1.")
    assert check("anthropic/claude-opus-4.7", messages=IMAGE).model == "anthropic/claude-opus-4.7"


def test_without_a_catalogue_the_refusal_still_says_what_the_model_takes() -> None:
    with pytest.raises(InvalidRequest) as ei:
        validate.check("chat", {"model": "m", "messages": IMAGE}, SETTINGS.models["deepseek/deepseek-v3.2"], "m")
    assert "it accepts: text." in ei.value.message and "Models that" not in ei.value.message
