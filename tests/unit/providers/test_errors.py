"""Upstream error bodies and statuses -> GatewayError (wire-formats.md §0.4, §1.6, §2.9, §3.5, §4.3; checklist 36, 37)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import orjson
import pytest

from therouter.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRequestRejected,
)
from therouter.providers._http import error_from_upstream, redact, retry_after_seconds

from ._helpers import CANARY, make_provider

NOHDR = httpx.Headers()


def openai_body(message: str, code: object = "invalid_request_error", param: object = None,
                type_: str = "invalid_request_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def assert_openai_shape(err: GatewayError) -> None:
    body = err.body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# ---- body shapes ----------------------------------------------------------------------------------------------------


def test_openai_deepseek_shape_string_code() -> None:
    err = make_provider("deepseek").map_error(400, openai_body("Invalid value for stop", param="stop"), NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.message == "Invalid value for stop"
    assert err.code == "invalid_request_error"
    assert err.param == "stop"
    assert err.status == 400
    assert err.fallback_ok is False and err.retryable is False
    assert_openai_shape(err)


def test_vllm_int_code_is_never_passed_on() -> None:
    body = openai_body("temperature must be non-negative", code=400, param="temperature", type_="BadRequestError")
    err = make_provider("vllm").map_error(400, body, NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.message == "temperature must be non-negative"
    assert err.code == "invalid_request_error"
    assert err.param == "temperature"
    assert_openai_shape(err)


def test_sglang_flat_error() -> None:
    body = orjson.dumps({"object": "error", "message": "Invalid stop value", "type": "BadRequestError",
                         "param": None, "code": 400})
    err = make_provider("sglang").map_error(400, body, NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.message == "Invalid stop value"
    assert "object" not in err.body()
    assert_openai_shape(err)


def test_fastapi_detail_422_becomes_400() -> None:
    body = orjson.dumps({"detail": [{"loc": ["body", "messages"], "msg": "field required", "type": "missing"}]})
    err = make_provider("vllm").map_error(422, body, NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.status == 400
    assert "field required" in err.message
    err = make_provider("sglang").map_error(400, orjson.dumps({"detail": "Bad things"}), NOHDR)
    assert err.message == "Bad things"


def test_error_as_a_plain_string() -> None:
    body = orjson.dumps({"error": "This model's maximum context length is 4096 tokens"})
    err = make_provider("vllm").map_error(400, body, NOHDR)
    assert err.code == "context_length_exceeded"
    assert "maximum context length" in err.message


@pytest.mark.parametrize("status", [500, 502, 503])
def test_non_json_body(status: int) -> None:
    err = make_provider("vllm").map_error(status, b"<html><body>502 Bad Gateway</body></html>", NOHDR)
    assert type(err) is UpstreamError
    assert err.retryable is True and err.fallback_ok is True
    assert "502 Bad Gateway" not in err.message and "<html>" not in err.message  # our words for the client
    assert err.message == f"The provider failed (HTTP {status})."
    assert err.detail is not None and "502 Bad Gateway" in err.detail  # the full text for the log and the record


def test_non_json_4xx_keeps_the_text() -> None:
    err = make_provider("vllm").map_error(400, b"suffix is not currently supported", NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.message == "suffix is not currently supported"


def test_empty_body() -> None:
    err = make_provider("deepseek").map_error(400, b"", NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.message  # never an empty message to the client
    err = make_provider("deepseek").map_error(503, b"  \n", NOHDR)
    assert isinstance(err, UpstreamError) and err.retryable


# ---- statuses -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["deepseek", "vllm", "sglang", "openai"])
@pytest.mark.parametrize("status", [401, 402, 403])
def test_our_credentials_or_balance_are_a_provider_fault(kind: str, status: int) -> None:
    body = openai_body(f"Authentication Fails, Your api key: {CANARY} is invalid", code="invalid_api_key")
    err = make_provider(kind).map_error(status, body, NOHDR)
    assert isinstance(err, UpstreamAuthError)
    assert err.fallback_ok is True
    assert err.retryable is False
    assert err.status not in (401, 402, 403)
    assert err.status >= 500
    assert CANARY not in err.message


@pytest.mark.parametrize("headers,expect", [
    ({"Retry-After": "7"}, 7.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "200"}, 0.2),
    ({"Retry-After-Ms": "250", "Retry-After": "30"}, 0.25),  # ms wins
    ({}, None),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "-5"}, 0.0),
    ({"retry-after": "inf"}, None),
    ({"retry-after-ms": "nan", "retry-after": "3"}, 3.0),
])
def test_429_retry_after(headers: dict[str, str], expect: float | None) -> None:
    err = make_provider("deepseek").map_error(429, openai_body("Rate limit reached", code="rate_limit_exceeded"),
                                              httpx.Headers(headers))
    assert isinstance(err, UpstreamRateLimited)
    assert err.fallback_ok is True
    if expect is None:
        assert err.retry_after is None
    else:
        assert err.retry_after == pytest.approx(expect)
        assert math.isfinite(err.retry_after)


def test_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    ra = retry_after_seconds(httpx.Headers({"Retry-After": format_datetime(when, usegmt=True)}))
    assert ra is not None and 25 <= ra <= 31
    past = datetime.now(UTC) - timedelta(seconds=30)
    assert retry_after_seconds(httpx.Headers({"Retry-After": format_datetime(past, usegmt=True)})) == 0.0


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504, 529])
def test_5xx_and_408_are_retryable(status: int) -> None:
    err = make_provider("vllm").map_error(status, openai_body("boom", code=status, type_="InternalServerError"),
                                          httpx.Headers({"retry-after": "2"}))
    assert type(err) is UpstreamError
    assert err.retryable is True and err.fallback_ok is True
    assert err.status == 502
    assert err.retry_after == 2.0


@pytest.mark.parametrize("message,code", [
    ("This model's maximum context length is 8192 tokens. However, you requested 9000 tokens.", 400),
    ("Input is too long: exceeds context length", 400),
    ("too many tokens", "context_length_exceeded"),
])
def test_400_context_length(message: str, code: object) -> None:
    err = make_provider("vllm").map_error(400, openai_body(message, code=code), NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.code == "context_length_exceeded"
    assert err.status == 400
    assert err.param == "messages"
    assert err.fallback_ok is False


def test_400_other_is_the_clients_fault() -> None:
    err = make_provider("deepseek").map_error(
        400, openai_body("The `reasoning_content` in the thinking mode must be passed back to the API."), NOHDR)
    assert isinstance(err, UpstreamRequestRejected)
    assert err.fallback_ok is False and err.retryable is False
    assert "reasoning_content" in err.message


def test_413_keeps_its_status() -> None:
    err = make_provider("vllm").map_error(413, b"Request Entity Too Large", NOHDR)
    assert isinstance(err, UpstreamRequestRejected) and err.status == 413


@pytest.mark.parametrize("status,body", [
    (400, openai_body("Model Not Exist")),
    (404, openai_body("The model `gpt-x` does not exist", code="model_not_found")),
    (404, openai_body("The model `m` does not exist.", code=404, type_="NotFoundError")),
])
def test_unknown_upstream_model_is_a_provider_fault(status: int, body: bytes) -> None:
    err = make_provider("deepseek").map_error(status, body, NOHDR)
    assert isinstance(err, UpstreamError)
    assert not isinstance(err, UpstreamRequestRejected)
    assert err.fallback_ok is True
    assert err.retryable is False  # the same deployment will keep failing
    assert err.status not in (400, 404)


def test_redirect_status_is_a_bad_response() -> None:
    err = error_from_upstream(302, "", None, None, NOHDR)
    assert isinstance(err, UpstreamError) and err.fallback_ok is True


# ---- in-band errors -------------------------------------------------------------------------------------------------


def test_in_band_openai_shape() -> None:
    p = make_provider("deepseek")
    err = p.in_band_error({"error": {"message": "upstream disconnected", "type": "server_error", "param": None,
                                     "code": "upstream_error"}})
    assert isinstance(err, UpstreamError)
    assert "upstream disconnected" not in err.message
    assert err.detail is not None and "upstream disconnected" in err.detail
    assert err.retryable and err.fallback_ok


def test_in_band_vllm_int_code() -> None:
    err = make_provider("vllm").in_band_error(
        {"error": {"message": "decoding failed", "type": "BadRequestError", "param": None, "code": 400}})
    assert isinstance(err, UpstreamRequestRejected)
    assert err.message == "decoding failed"
    assert_openai_shape(err)


def test_in_band_sglang_flat() -> None:
    err = make_provider("sglang").in_band_error(
        {"object": "error", "message": "Internal server error", "type": "InternalServerError", "param": None,
         "code": 500})
    assert isinstance(err, UpstreamError) and err.retryable
    assert "Internal server error" not in err.message
    assert err.detail is not None and "Internal server error" in err.detail
    assert "object" not in err.body()


def test_in_band_string_error() -> None:
    err = make_provider("vllm").in_band_error({"error": "engine died"})
    assert isinstance(err, UpstreamError) and "engine died" not in err.message
    assert err.detail is not None and "engine died" in err.detail


@pytest.mark.parametrize("obj", [
    {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
    {"error": None, "choices": []},
    {"choices": [], "usage": {"prompt_tokens": 1}},
])
def test_normal_chunks_are_not_errors(obj: dict) -> None:
    for kind in ("deepseek", "vllm", "sglang"):
        assert make_provider(kind).in_band_error(obj) is None


def test_in_band_error_without_message_still_says_something() -> None:
    err = make_provider("sglang").in_band_error({"object": "error", "code": 503})
    assert err is not None and err.message


# ---- redaction ------------------------------------------------------------------------------------------------------


def test_redact_removes_the_provider_key() -> None:
    assert CANARY not in redact(f"bad key {CANARY}!", (CANARY,))
    assert "[redacted]" in redact(f"bad key {CANARY}!", (CANARY,))
    assert CANARY not in redact(f"Authorization: Bearer {CANARY}")  # pattern alone, without knowing the key
    odd = "local-vllm-secret-123"  # a self-hosted key that looks like nothing in particular
    assert odd not in redact(f"key {odd} refused", (odd,))
    assert redact("plain message", ("",)) == "plain message"
    assert len(redact("x" * 10_000)) <= 2000


@pytest.mark.parametrize("status", [400, 401, 429, 500])
def test_map_error_never_echoes_the_key(status: int) -> None:
    p = make_provider("deepseek")
    for body in (openai_body(f"Incorrect API key provided: {CANARY}"),
                 f"upstream says key={CANARY} is wrong".encode(),
                 orjson.dumps({"detail": f"bad token {CANARY}"})):
        err = p.map_error(status, body, NOHDR)
        assert CANARY not in err.message
        assert CANARY not in orjson.dumps(err.body()).decode()
        assert err.detail and CANARY not in err.detail  # nor in what goes to the log and the attempt record


def test_map_error_redacts_a_non_sk_key() -> None:
    key = "vllm-local-7f3a9c1e"
    p = make_provider("vllm", api_key=key)
    err = p.map_error(500, openai_body(f"key {key} not accepted"), NOHDR)
    assert key not in err.message
    assert err.detail and key not in err.detail and "not accepted" in err.detail


def test_in_band_error_never_echoes_the_key() -> None:
    p = make_provider("deepseek")
    err = p.in_band_error({"error": {"message": f"auth {CANARY}", "code": "x"}})
    assert err is not None and CANARY not in err.message and CANARY not in (err.detail or "")
    err = p.in_band_error({"object": "error", "message": f"auth {CANARY}", "code": 500})
    assert err is not None and CANARY not in err.message and CANARY not in (err.detail or "")


# ---- OpenAI's own codes -----------------------------------------------------------------------------------------------


def test_openai_insufficient_quota_is_our_account_not_a_rate_limit() -> None:
    """OpenAI says 429 for an exhausted balance: falling back is right, retrying or cooling down is not."""
    body = openai_body("You exceeded your current quota, please check your plan and billing details.",
                       code="insufficient_quota")
    err = make_provider("openai").map_error(429, body, {"retry-after": "20"})
    assert isinstance(err, UpstreamAuthError) and err.fallback_ok and not err.retryable
    plain = make_provider("openai").map_error(429, openai_body("Rate limit reached", code="rate_limit_exceeded"),
                                             {"retry-after": "20"})
    assert isinstance(plain, UpstreamRateLimited) and plain.retry_after == 20


@pytest.mark.parametrize(("code", "param"), [("unsupported_parameter", "max_tokens"),
                                             ("unsupported_value", "temperature"),
                                             ("invalid_value", "reasoning_effort")])
def test_openai_parameter_refusals_are_the_clients_and_name_the_param(code: str, param: str) -> None:
    err = make_provider("openai").map_error(400, openai_body(f"Unsupported parameter: '{param}'.", code=code,
                                                             param=param), NOHDR)
    assert isinstance(err, UpstreamRequestRejected) and (err.code, err.param) == (code, param)
