"""A key's settings, checked in one place for POST / PATCH /admin/keys and `therouter keys create|update`."""

from __future__ import annotations

from typing import Any

import pytest

from therouter.errors import InvalidRequest
from therouter.keyspec import MAX_LIMIT, key_fields

NOW = 1_800_000_000.0
MODELS = ("deepseek/deepseek-v3.2", "selfhost/only-vllm")


def fields(body: Any, creating: bool = False) -> dict[str, Any]:
    return key_fields(body, MODELS, NOW, creating=creating)


def test_a_full_create_body() -> None:
    got = fields({"name": "alice", "budget_usd": "20.5", "budget_period": "month", "rpm": 60, "tpm": 100_000,
                  "models": ["deepseek/deepseek-v3.2"], "expires_at": "2030-01-31T00:00:00Z",
                  "model_limits": {"deepseek/deepseek-v3.2": {"rpm": 10, "tpm": None}},
                  "metadata": {"team": "search"}}, creating=True)
    assert got == {"name": "alice", "budget_nano": 20_500_000_000, "budget_period": "month", "rpm": 60,
                   "tpm": 100_000, "models": ("deepseek/deepseek-v3.2",), "expires_at": 1_896_048_000,
                   "model_limits": {"deepseek/deepseek-v3.2": (10, None)}, "metadata": {"team": "search"}}


def test_an_update_changes_only_what_it_names_and_null_clears() -> None:
    assert fields({"rpm": 5}) == {"rpm": 5}
    assert fields({"budget_usd": None, "rpm": None, "models": None, "model_limits": None, "expires_at": None,
                   "metadata": None}) == {"budget_nano": None, "rpm": None, "models": (), "model_limits": {},
                                          "expires_at": None, "metadata": {}}
    assert fields({"expires_at": int(NOW) + 60}) == {"expires_at": int(NOW) + 60}
    assert fields({"expires_at": "2030-01-31 00:00:00"}) == {"expires_at": 1_896_048_000}  # no offset: UTC


@pytest.mark.parametrize("body,param", [
    ({"rpm": 0}, "rpm"), ({"rpm": -1}, "rpm"), ({"tpm": 1.5}, "tpm"), ({"rpm": True}, "rpm"), ({"rpm": "10"}, "rpm"),
    ({"tpm": MAX_LIMIT + 1}, "tpm"),
    ({"budget_usd": 0}, "budget_usd"), ({"budget_usd": -1}, "budget_usd"), ({"budget_usd": "NaN"}, "budget_usd"),
    ({"budget_usd": 9_000_001}, "budget_usd"), ({"budget_usd": "0.0000000001"}, "budget_usd"),
    ({"budget_usd": True}, "budget_usd"), ({"budget_period": "week"}, "budget_period"),
    ({"budget_period": None}, "budget_period"), ({"name": ""}, "name"), ({"name": "a\nb"}, "name"),
    ({"name": None}, "name"), ({"name": "x" * 129}, "name"),
    ({"models": ["no/such"]}, "models"), ({"models": "deepseek/deepseek-v3.2"}, "models"),
    ({"model_limits": {"no/such": {"rpm": 1}}}, "model_limits"),
    ({"model_limits": {"selfhost/only-vllm": {"rpm": 0}}}, "model_limits"),
    ({"model_limits": {"selfhost/only-vllm": {}}}, "model_limits"),
    ({"model_limits": {"selfhost/only-vllm": {"rpm": 1, "rps": 2}}}, "model_limits"),
    ({"expires_at": int(NOW) - 1}, "expires_at"), ({"expires_at": int(NOW)}, "expires_at"),
    ({"expires_at": "tomorrow"}, "expires_at"), ({"expires_at": NOW + 11 * 366 * 86_400}, "expires_at"),
    ({"metadata": {"k": 1}}, "metadata"), ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"), ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"api_key": "x"}, "api_key"),
])
def test_each_bad_setting_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        fields(body)
    assert (e.value.status, e.value.param) == (400, param), e.value.message


def test_bodies_that_are_not_settings() -> None:
    for body, creating in (([], True), ("x", False), ({}, False), ({"rpm": 5}, True)):
        with pytest.raises(InvalidRequest):
            fields(body, creating)


def test_the_cli_names_its_flags() -> None:
    with pytest.raises(InvalidRequest) as e:
        key_fields({"budget_usd": "0"}, MODELS, NOW, creating=False, labels={"budget_usd": "--budget"})
    assert e.value.message.startswith("--budget must be more than 0")
