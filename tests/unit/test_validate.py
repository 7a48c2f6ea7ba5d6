"""validate: one reading of a request (pure: no server)."""

from __future__ import annotations

from typing import Any

import pytest

from therouter import validate
from therouter.config import parse_settings
from therouter.errors import InvalidRequest

CARD = parse_settings({
    "store": {"redis_url": "redis://127.0.0.1:1/0"},
    "providers": {"p": {"kind": "vllm", "base_url": "http://127.0.0.1:9/v1"}},
    "models": {"m": {"context_length": 4096, "max_output_tokens": 1024, "pricing": {"input": 1, "output": 2},
                     "supported_parameters": ["max_tokens", "n", "best_of", "temperature"],
                     "deployments": [{"provider": "p", "model": "x"}]}},
}, "t", {}).models["m"]
HELLO = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> validate.Checked:
    return validate.check("chat", {"model": "m", "messages": HELLO, **kw}, CARD, "m")


def test_one_output_limit_resolved_and_written_once() -> None:
    c = chat(max_tokens=900, max_completion_tokens=5)
    assert c.max_tokens == 5 and c.body["max_tokens"] == 5 and "max_completion_tokens" not in c.body
    c = chat(max_completion_tokens=7)
    assert c.max_tokens == 7 and c.body["max_tokens"] == 7 and "max_completion_tokens" not in c.body
    assert chat().max_tokens is None and "max_tokens" not in chat().body


@pytest.mark.parametrize("endpoint,field,value", [
    ("chat", "max_tokens", "5"), ("chat", "stream", "false"), ("chat", "n", 4.0), ("chat", "temperature", "1"),
    ("completions", "max_completion_tokens", []), ("completions", "max_tokens", True), ("completions", "best_of", "2"),
])
def test_wrong_types_are_invalid_type(endpoint: str, field: str, value: Any) -> None:
    body = {"model": "m", "messages": HELLO, "prompt": "p", field: value}
    with pytest.raises(InvalidRequest) as e:
        validate.check(endpoint, body, CARD, "m")  # type: ignore[arg-type]
    assert (e.value.code, e.value.param) == ("invalid_type", field)


def test_sequences_cover_n_best_of_and_batches() -> None:
    assert chat(n=3).sequences == 3
    comp = {"model": "m", "prompt": ["a", "b"], "n": 2, "best_of": 3}
    assert validate.check("completions", comp, CARD, "m").sequences == 6


@pytest.mark.parametrize("body", [{"apiBase": "x"}, {"API_KEY": "x"}, {"Default-Headers": {}},
                                  {"extra_body": {"ExtraQuery": {}}}, {"litellm_params": {"organization": "o"}}])
def test_steering_fields_refused_in_any_spelling(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as e:
        validate.check_steering(body)
    assert e.value.code == "unsupported_parameter"


@pytest.mark.parametrize("body", [{"metadata": {"api_key": "x"}},
                                  {"tools": [{"function": {"parameters": {"properties": {"headers": {}}}}}]},
                                  {"response_format": {"json_schema": {"schema": {"organization": {}}}}}])
def test_steering_names_deeper_are_ordinary(body: dict[str, Any]) -> None:
    validate.check_steering(body)


def _nested(depth: int) -> bytes:
    """A body whose deepest value is ``depth`` levels down (the body itself is level 1)."""
    return b'{"model": "m", "x": ' + b'{"a": ' * (depth - 2) + b'{}' + b'}' * (depth - 2) + b'}'


def test_depth_limit_is_exact_and_brackets_in_strings_do_not_count() -> None:
    validate.parse_body(_nested(8), 1 << 20, 8)
    with pytest.raises(InvalidRequest, match="nested deeper than 8"):
        validate.parse_body(_nested(9), 1 << 20, 8)
    text = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"{[" * 500 + b'"}]}'
    assert validate.parse_body(text, 1 << 20, 8)["messages"][0]["content"] == "{[" * 500


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r\n\t "])
def test_an_empty_body_is_refused_as_empty(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="body is empty"):
        validate.parse_body(raw, 1 << 20, 8)
