"""Per-request preferences: OpenRouter's `models` and `provider` fields, validated against the config."""

from __future__ import annotations

from typing import Any

import pytest

from therouter.errors import GatewayError
from therouter.routing.preferences import NO_PREFERENCES, parse_preferences

PROVIDERS = {"deepseek", "vllm-local", "sglang-local"}
MODELS = {"a", "b", "c"}


def parse(body: dict[str, Any], key_models: tuple[str, ...] = ()) -> Any:
    return parse_preferences(body, PROVIDERS, MODELS, "a", key_models, max_models=3)


def test_absent_is_the_default() -> None:
    assert parse({}) is NO_PREFERENCES and NO_PREFERENCES.default


def test_full_provider_object() -> None:
    p = parse({"models": ["b", "a", "c"], "provider": {
        "order": ["vllm-local", "deepseek", "vllm-local"], "only": ["deepseek", "vllm-local"],
        "ignore": ["sglang-local"], "allow_fallbacks": False, "require_parameters": True, "sort": "latency",
        "data_collection": "deny"}})  # OpenRouter keys we do not implement are ignored
    assert p.models == ("b", "c")  # deduplicated, the request's own model dropped
    assert p.order == ("vllm-local", "deepseek")
    assert p.only == {"deepseek", "vllm-local"} and p.ignore == {"sglang-local"}
    assert not p.allow_fallbacks and p.require_parameters and p.sort == "latency"


def test_excluded_reasons() -> None:
    p = parse({"provider": {"only": ["deepseek", "vllm-local"], "ignore": ["vllm-local"]}})
    assert p.excluded("deepseek") is None
    assert p.excluded("vllm-local") == "ignored by request"
    assert "provider.only" in (p.excluded("sglang-local") or "")
    q = parse({"provider": {"order": ["deepseek"], "allow_fallbacks": False}})
    assert q.excluded("deepseek") is None and "allow_fallbacks" in (q.excluded("vllm-local") or "")


@pytest.mark.parametrize("provider", [
    {"order": ["nope"]}, {"only": ["deepseek", "openrouter"]}, {"ignore": ["x"]},
    {"order": "deepseek"}, {"only": [1]}, {"allow_fallbacks": "yes"}, {"require_parameters": 1},
    {"sort": "cheapest"}, "deepseek", ["deepseek"],
])
def test_bad_provider_object_is_400_on_provider(provider: Any) -> None:
    with pytest.raises(GatewayError) as e:
        parse({"provider": provider})
    assert e.value.status == 400 and e.value.type == "invalid_request_error" and e.value.param == "provider"


def test_unknown_provider_message_lists_known_ones() -> None:
    with pytest.raises(GatewayError) as e:
        parse({"provider": {"order": ["nope"]}})
    assert "'nope'" in e.value.message and "deepseek" in e.value.message


def test_models_list_checks() -> None:
    with pytest.raises(GatewayError) as e:
        parse({"models": ["b", "zzz"]})
    assert e.value.status == 404 and e.value.code == "model_not_found" and e.value.param == "models"
    with pytest.raises(GatewayError) as e:
        parse({"models": ["b", "c"]}, key_models=("a", "b"))
    assert e.value.status == 403 and e.value.param == "models"
    for bad in ("b", [1], ["a", "b", "c", "a"]):
        with pytest.raises(GatewayError) as e:
            parse({"models": bad})
        assert e.value.status == 400 and e.value.param == "models"


def test_an_alias_in_models_is_its_model() -> None:
    p = parse_preferences({"models": ["bee", "b", "a-alias"]}, PROVIDERS, MODELS, "a", (), max_models=3,
                          aliases={"bee": "b", "a-alias": "a"})
    assert p.models == ("b",)  # resolved, deduplicated, the request's own model dropped
    with pytest.raises(GatewayError) as e:
        parse_preferences({"models": ["bee"]}, PROVIDERS, MODELS, "a", ("a",), aliases={"bee": "b"})
    assert e.value.status == 403  # the key's allowlist is checked on the model the alias names
