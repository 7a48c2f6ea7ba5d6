"""Every bad input gets OpenAI's error shape and the status whose SDK exception class matches; never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import Gateway

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hi"}]


def _shape(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and err["type"]
    return err  # type: ignore[no-any-return]


def post(gw: Gateway, key: str | None, body: Any = None, content: bytes | None = None,
         path: str = "/chat/completions", **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers)
    if content is not None:
        return httpx.post(gw.v1 + path, headers={**h, "content-type": "application/json"}, content=content)
    return httpx.post(gw.v1 + path, headers=h, json=body)


def test_missing_key_401(client: openai.OpenAI, gateway: Gateway) -> None:
    bad = openai.OpenAI(base_url=gateway.v1, api_key="tr-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert e.value.code == "invalid_api_key"
    r = post(gateway, None, {"model": MODEL, "messages": HELLO})
    assert r.status_code == 401 and _shape(r.json())["code"] == "invalid_api_key"
    assert r.headers["x-request-id"]
    r = httpx.post(gateway.v1 + "/chat/completions", headers={"Authorization": "Basic abc"},
                   json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401


def test_revoked_key_401(gateway: Gateway) -> None:
    import asyncio

    from therouter.config import StoreConfig
    from therouter.store import Store

    async def mk() -> tuple[str, str]:
        s = Store(StoreConfig(redis_url=gateway.redis_url, key_prefix=gateway.prefix))
        key, rec = await s.create_key("to-revoke")
        await s.revoke_key(rec.id)
        await s.aclose()
        return key, rec.id

    key, _ = asyncio.run(mk())
    r = post(gateway, key, {"model": MODEL, "messages": HELLO}, **{"x-request-id": "req-same"})
    assert r.status_code == 401 and _shape(r.json())["code"] == "invalid_api_key"
    # exactly what a made-up key gets: a caller cannot tell that the key once existed
    unknown = post(gateway, "tr-" + "q" * 43, {"model": MODEL, "messages": HELLO}, **{"x-request-id": "req-same"})
    assert (unknown.status_code, unknown.content) == (r.status_code, r.content)
    assert {k: v for k, v in unknown.headers.items() if k != "date"} == \
        {k: v for k, v in r.headers.items() if k != "date"}


def test_request_headers_over_the_bound_get_431(gateway: Gateway, api_key: str) -> None:
    big = {"x-padding": "a" * (65 * 1024)}  # default server.max_header_bytes: 64 KiB, all headers together
    r = post(gateway, api_key, {"model": MODEL, "messages": HELLO}, **big)
    assert r.status_code == 431
    assert _shape(r.json())["code"] == "request_headers_too_large"
    r = httpx.get(gateway.url + "/health", headers={f"x-p{i}": "b" * 8000 for i in range(9)})  # 72 KB in 9 headers
    assert r.status_code == 431 and _shape(r.json())["type"] == "invalid_request_error"
    ok = post(gateway, api_key, {"model": MODEL, "messages": HELLO}, **{"x-padding": "a" * (60 * 1024)})
    assert ok.status_code == 200, ok.text


def test_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope/nothing", messages=HELLO)  # type: ignore[arg-type]
    assert e.value.code == "model_not_found"


def test_malformed_json_400(gateway: Gateway, api_key: str) -> None:
    r = post(gateway, api_key, content=b'{"model": "x", "messages": [')
    assert r.status_code == 400
    assert _shape(r.json())["type"] == "invalid_request_error"
    r = post(gateway, api_key, content=b"[1, 2]")
    assert r.status_code == 400


def test_missing_messages_and_model_400(client: openai.OpenAI, gateway: Gateway, api_key: str) -> None:
    r = post(gateway, api_key, {"model": MODEL})
    assert r.status_code == 400 and _shape(r.json())["param"] == "messages"
    r = post(gateway, api_key, {"messages": HELLO})
    assert r.status_code == 400 and _shape(r.json())["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


@pytest.mark.parametrize("params,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
])
def test_bad_params_400_naming_param(client: openai.OpenAI, params: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO, **params}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.param == param, e.value.body


def test_image_part_to_text_model_400(client: openai.OpenAI) -> None:
    msg = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msg)  # type: ignore[arg-type]
    assert "image" in e.value.message and e.value.code == "unsupported_modality"


def test_context_length_exceeded_uses_openai_wording(client: openai.OpenAI) -> None:
    big = "word " * 20000  # ~25k tokens against a 4096-token test card
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": big}])
    assert e.value.code == "context_length_exceeded"
    assert "This model's maximum context length is 4096 tokens. However, your messages resulted in" in e.value.message


def test_body_too_large_413(gateway: Gateway, api_key: str, tmp_path: Any) -> None:
    huge = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * (11 * 1024 * 1024) + b'"}]}'
    r = post(gateway, api_key, content=huge)
    assert r.status_code == 413 and _shape(r.json())["code"] == "request_too_large"


@pytest.mark.parametrize("field", [{"api_base": "http://evil"}, {"base_url": "http://evil"},
                                   {"api_key": "x"}, {"extra_headers": {"a": "b"}}, {"apiBase": "http://evil"},
                                   {"API-KEY": "x"}, {"Organization": "org"}, {"default_headers": {"a": "b"}},
                                   {"extra_query": {"a": "b"}}, {"litellm_params": {"api_base": "http://evil"}},
                                   {"extra_body": {"baseURL": "http://evil"}},
                                   {"extra_body": {"litellm_params": {"headers": {"a": "b"}}}}])
def test_steering_fields_refused(gateway: Gateway, api_key: str, field: dict[str, Any]) -> None:
    r = post(gateway, api_key, {"model": MODEL, "messages": HELLO, **field})
    assert r.status_code == 400
    assert _shape(r.json())["code"] == "unsupported_parameter"


def test_deep_nesting_refused(gateway: Gateway, api_key: str) -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = {"a": deep}
    r = post(gateway, api_key, {"model": MODEL, "messages": HELLO, "x": deep})
    assert r.status_code == 400


def test_stream_options_without_stream_400(gateway: Gateway, api_key: str) -> None:
    r = post(gateway, api_key, {"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and _shape(r.json())["param"] == "stream_options"


@pytest.mark.parametrize("content", [b"", b"null", b'"str"', b"{}", b'{"model": 5, "messages": 3}',
                                     b'{"model": "deepseek/deepseek-v3.2", "messages": [1, 2]}',
                                     (b'{"model": "deepseek/deepseek-v3.2", "messages": [{"role": "user"}], '
                                      b'"tools": "x"}'),
                                     b"\xff\xfe garbage"])
def test_garbage_never_500(gateway: Gateway, api_key: str, content: bytes) -> None:
    r = post(gateway, api_key, content=content)
    assert 400 <= r.status_code < 500, r.text
    _shape(r.json())


def test_unknown_route_is_openai_shaped(gateway: Gateway, api_key: str) -> None:
    r = httpx.get(gateway.v1 + "/nothing-here", headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 404
    _shape(r.json())


def test_client_headers_never_reach_upstream(gateway: Gateway, api_key: str, fakes: Any) -> None:
    r = httpx.post(gateway.v1 + "/chat/completions",
                   headers={"Authorization": f"Bearer {api_key}", "Cookie": "session=secret",
                            "x-api-key": "client-secret", "Connection": "keep-alive", "x-forwarded-for": "1.2.3.4"},
                   json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 200
    seen = fakes["deepseek"].last()["headers"]
    assert seen["authorization"] == "valid"  # ours, not the client's
    for h in ("cookie", "x-api-key", "x-forwarded-for"):
        assert h not in seen


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) |
                    st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
                          "stream", "stream_options", "tools", "tool_choice", "response_format", "stop", "n",
                          "provider", "models", "suffix", "prompt", "logprobs", "seed", "user"])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]),
                                 "content": st.one_of(st.text(max_size=30), JSON)})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          database=None)
@given(extra=st.dictionaries(FIELDS, JSON, max_size=4), messages=st.lists(MESSAGE, max_size=3),
       path=st.sampled_from(["/chat/completions", "/completions"]))
def test_fuzzed_bodies_never_500(gateway: Gateway, api_key: str, extra: dict[str, Any], messages: list[Any],
                                 path: str) -> None:
    body = {"model": MODEL, "messages": messages, "prompt": "p", **extra}
    r = post(gateway, api_key, body, path=path)
    assert r.status_code < 500 or r.status_code in (502, 503, 504), (r.status_code, r.text)
    if r.status_code >= 400:
        _shape(r.json())
