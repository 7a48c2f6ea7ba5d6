"""What each adapter sends upstream: URL, headers and the JSON body (wire-formats.md §1–4, §6, checklist 24–27, 32, 33, 41)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from therouter import __version__
from therouter.errors import InvalidRequest
from therouter.providers import UpstreamRequest
from therouter.providers.base import JSON_INSTRUCTION

from ._helpers import BASE, CANARY, dep, make_provider

KINDS = ("deepseek", "vllm", "sglang", "openai", "openai_compatible")
FIM = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
TOOL_CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


def chat(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "public-alias", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


def sent(req: UpstreamRequest) -> dict[str, Any]:
    assert req.method == "POST"
    assert req.headers["content-type"] == "application/json"
    return orjson.loads(req.body)


def send_chat(kind: str, body: dict[str, Any], *, stream: bool = False, **depkw: Any) -> tuple[UpstreamRequest, dict]:
    req = make_provider(kind).chat_request(body, dep(kind, **depkw), stream=stream)
    return req, sent(req)


# ---- common to every adapter ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_url_and_upstream_model(kind: str) -> None:
    req, out = send_chat(kind, chat(), model="deepseek-v4-flash")
    assert req.url == BASE[kind] + "/chat/completions"
    assert out["model"] == "deepseek-v4-flash"  # the deployment's upstream id, never the public alias
    assert out["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "openai"])
def test_max_completion_tokens_becomes_max_tokens(kind: str) -> None:
    _, out = send_chat(kind, chat(max_completion_tokens=321))
    assert out["max_tokens"] == 321
    assert "max_completion_tokens" not in out


@pytest.mark.parametrize("body", [chat(max_completion_tokens=321), chat(max_tokens=321)])
def test_openai_gets_max_completion_tokens_only(body: dict[str, Any]) -> None:
    """OpenAI's reasoning models refuse max_tokens; every current chat model takes max_completion_tokens."""
    _, out = send_chat("openai", body)
    assert out["max_completion_tokens"] == 321
    assert "max_tokens" not in out


def test_openai_keeps_developer_role_and_reasoning_effort() -> None:
    body = chat(messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                reasoning_effort="minimal")
    _, out = send_chat("openai", body)
    assert out["messages"][0]["role"] == "developer" and out["reasoning_effort"] == "minimal"


def test_openai_legacy_completions_keep_max_tokens() -> None:
    req = make_provider("openai").completion_request({"model": "m", "prompt": "x", "max_tokens": 5}, dep("openai"),
                                                     stream=False)
    assert orjson.loads(req.body)["max_tokens"] == 5


@pytest.mark.parametrize("kind", KINDS)
def test_stream_always_asks_for_usage(kind: str) -> None:
    _, out = send_chat(kind, chat(stream=True, stream_options={"include_usage": False}), stream=True)
    assert out["stream"] is True
    assert out["stream_options"]["include_usage"] is True
    _, out = send_chat(kind, chat(stream=True), stream=True)
    assert out["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("kind", KINDS)
def test_non_stream_drops_stream_options(kind: str) -> None:
    _, out = send_chat(kind, chat(stream=False, stream_options={"include_usage": True}), stream=False)
    assert "stream_options" not in out
    assert "stream" not in out or out["stream"] is False


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_fields_pass_through_untouched(kind: str) -> None:
    extras = {"top_k": 20, "x_vendor_flag": {"nested": [1, "two", None]}, "seed": 7, "logit_bias": {"50256": -100},
              "min_p": 0.05, "user": "end-user-1"}
    _, out = send_chat(kind, chat(**extras))
    for k, v in extras.items():
        assert out[k] == v, k


@pytest.mark.parametrize("kind", KINDS)
def test_gateway_only_fields_are_never_sent(kind: str) -> None:
    body = chat(models=["a", "b"], provider={"order": ["deepseek"], "allow_fallbacks": False}, route="fallback",
                transforms=["middle-out"])
    _, out = send_chat(kind, body)
    for k in ("models", "provider", "route", "transforms"):
        assert k not in out
    creq = make_provider(kind).completion_request(
        {"model": "m", "prompt": "x", "models": ["a"], "provider": {"order": []}}, dep(kind), stream=False)
    assert not {"models", "provider"} & set(sent(creq))


@pytest.mark.parametrize("kind", KINDS)
def test_headers_carry_only_our_credentials(kind: str) -> None:
    p = make_provider(kind)
    req = p.chat_request(chat(), dep(kind), stream=True, request_id="req-123")
    assert req.headers["authorization"] == f"Bearer {CANARY}"
    assert req.headers["user-agent"] == f"therouter/{__version__}"
    assert req.headers["x-request-id"] == "req-123"
    assert set(req.headers) <= {"content-type", "accept", "user-agent", "authorization", "x-request-id"}
    assert "text/event-stream" in req.headers["accept"]
    # a header added to one request never leaks into the next
    req.headers["authorization"] = "Bearer client-key"
    req.headers["cookie"] = "x=1"
    again = p.chat_request(chat(), dep(kind), stream=False)
    assert again.headers["authorization"] == f"Bearer {CANARY}"
    assert "cookie" not in again.headers and "x-request-id" not in again.headers


@pytest.mark.parametrize("kind", KINDS)
def test_no_authorization_without_a_key(kind: str) -> None:
    req = make_provider(kind, api_key=None).chat_request(chat(), dep(kind), stream=False)
    assert "authorization" not in {k.lower() for k in req.headers}
    assert req.headers["user-agent"].startswith("therouter/")


@pytest.mark.parametrize("kind", KINDS)
def test_the_callers_body_is_never_mutated(kind: str) -> None:
    """The same checked body is sent to the next deployment on failover: adapters must work on copies."""
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "reasoning_content": "think", "tool_calls": [TOOL_CALL]},
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
        ],
        max_completion_tokens=10, reasoning_effort="none", thinking={"type": "enabled"}, guided_json={"type": "object"},
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        stream=True, stream_options={"include_usage": False}, models=["a"], provider={"order": ["x"]},
    )
    before = copy.deepcopy(body)
    p = make_provider(kind)
    p.chat_request(body, dep(kind), stream=True)
    p.chat_request(body, dep(kind), stream=False)
    assert body == before
    comp = {"model": "m", "prompt": "def f(", "suffix": "\n    return x", "stream": True}
    cbefore = copy.deepcopy(comp)
    p.completion_request(comp, dep(kind, fim_tokens=FIM), stream=True)
    assert comp == cbefore


# ---- DeepSeek -------------------------------------------------------------------------------------------------------


def test_deepseek_developer_becomes_system() -> None:
    body = chat(messages=[{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"},
                          {"role": "system", "content": "more"}])
    _, out = send_chat("deepseek", body)
    assert [m["role"] for m in out["messages"]] == ["system", "user", "system"]
    assert out["messages"][0] == {"role": "system", "content": "rules"}
    assert b"developer" not in make_provider("deepseek").chat_request(body, dep(), stream=False).body


def test_deepseek_reasoning_effort_none_becomes_thinking_disabled() -> None:
    _, out = send_chat("deepseek", chat(reasoning_effort="none"))
    assert out["thinking"] == {"type": "disabled"}
    assert "reasoning_effort" not in out
    _, out = send_chat("deepseek", chat(reasoning_effort="high"))
    assert out["reasoning_effort"] == "high" and "thinking" not in out
    _, out = send_chat("deepseek", chat(thinking={"type": "enabled"}))
    assert out["thinking"] == {"type": "enabled"}  # DeepSeek's own toggle passes as-is


def test_deepseek_assistant_reasoning_content_is_kept_unchanged() -> None:
    assistant = {"role": "assistant", "content": None, "reasoning_content": "The user wants weather.\nCall the tool.",
                 "tool_calls": [TOOL_CALL]}
    body = chat(messages=[{"role": "user", "content": "weather in Paris?"}, assistant,
                          {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}])
    _, out = send_chat("deepseek", body)
    assert out["messages"][1] == assistant
    assert "reasoning" not in out["messages"][1]


def test_deepseek_fim_goes_to_beta_with_prompt_and_suffix_unchanged() -> None:
    body = {"model": "coder", "prompt": "def fib(a):", "suffix": "    return fib(a-1) + fib(a-2)", "max_tokens": 128}
    for base in ("https://api.deepseek.com", "https://api.deepseek.com/v1"):
        req = make_provider("deepseek", base_url=base).completion_request(body, dep(model="deepseek-v4-flash"),
                                                                           stream=False)
        assert req.url == "https://api.deepseek.com/beta/completions"
        out = sent(req)
        assert out["prompt"] == body["prompt"]
        assert out["suffix"] == body["suffix"]
        assert out["model"] == "deepseek-v4-flash"
    req = make_provider("deepseek", fim_base_url="https://fim.example/beta").completion_request(body, dep(), stream=True)
    assert req.url == "https://fim.example/beta/completions"
    assert sent(req)["stream_options"] == {"include_usage": True}


def test_deepseek_plain_completion_uses_the_normal_endpoint() -> None:
    req = make_provider("deepseek").completion_request({"model": "m", "prompt": "Once"}, dep(), stream=False)
    assert req.url == "https://api.deepseek.com/completions"
    assert "suffix" not in sent(req)


# ---- vLLM -----------------------------------------------------------------------------------------------------------


def test_vllm_assistant_reasoning_content_is_copied_to_reasoning() -> None:
    body = chat(messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "because", "tool_calls": [TOOL_CALL]},
        {"role": "assistant", "content": "b", "reasoning_content": "new", "reasoning": "explicit"},
        {"role": "assistant", "content": "c"},
    ])
    _, out = send_chat("vllm", body)
    m = out["messages"]
    assert m[1]["reasoning"] == "because" and m[1]["reasoning_content"] == "because"
    assert m[1]["tool_calls"] == [TOOL_CALL]
    assert m[2]["reasoning"] == "explicit"  # an explicit value is not overwritten
    assert "reasoning" not in m[3] and "reasoning" not in m[0]


def test_sglang_and_deepseek_do_not_add_reasoning_key() -> None:
    body = chat(messages=[{"role": "assistant", "content": "a", "reasoning_content": "r"}])
    for kind in ("deepseek", "sglang"):
        _, out = send_chat(kind, body)
        assert out["messages"][0] == {"role": "assistant", "content": "a", "reasoning_content": "r"}


def test_vllm_guided_fields_become_structured_outputs() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    _, out = send_chat("vllm", chat(guided_json=schema, guided_regex="[a-z]+", guided_choice=["x", "y"],
                                    guided_grammar="root ::= 'a'"))
    assert out["structured_outputs"] == {"json": schema, "regex": "[a-z]+", "choice": ["x", "y"],
                                         "grammar": "root ::= 'a'"}
    assert not [k for k in out if k.startswith("guided_")]
    _, out = send_chat("vllm", chat(structured_outputs={"regex": "\\d+"}, guided_json=schema))
    assert out["structured_outputs"] == {"regex": "\\d+", "json": schema}


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_self_hosted_thinking_goes_to_chat_template_kwargs(kind: str) -> None:
    _, out = send_chat(kind, chat(thinking={"type": "enabled"}, chat_template_kwargs={"other": 1}))
    assert out["chat_template_kwargs"] == {"other": 1, "thinking": True}
    assert "thinking" not in out
    _, out = send_chat(kind, chat(reasoning_effort="none"))
    assert out["chat_template_kwargs"] == {"thinking": False}
    assert "reasoning_effort" not in out


def test_vllm_fim_is_built_from_the_deployments_tokens() -> None:
    body = {"model": "coder", "prompt": "def f(x):\n", "suffix": "\n    return y\n", "max_tokens": 32}
    req = make_provider("vllm").completion_request(body, dep("vllm", model="deepseek-coder", fim_tokens=FIM),
                                                   stream=False)
    assert req.url == BASE["vllm"] + "/completions"
    out = sent(req)
    assert "suffix" not in out
    assert out["prompt"] == "<｜fim▁begin｜>def f(x):\n<｜fim▁hole｜>\n    return y\n<｜fim▁end｜>"
    assert out["max_tokens"] == 32 and out["model"] == "deepseek-coder"


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_fim_without_fim_tokens_is_a_400_on_suffix(kind: str) -> None:
    with pytest.raises(InvalidRequest) as ei:
        make_provider(kind).completion_request({"model": "m", "prompt": "a", "suffix": "b"}, dep(kind), stream=False)
    assert ei.value.status == 400
    assert ei.value.param == "suffix"
    assert ei.value.fallback_ok is False


# ---- response_format -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_json_schema_without_capability_becomes_json_object_plus_instruction(kind: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    rf = {"type": "json_schema", "json_schema": {"name": "ans", "schema": schema, "strict": True}}
    _, out = send_chat(kind, chat(response_format=rf), capabilities=("json_object",))
    assert out["response_format"] == {"type": "json_object"}
    first = out["messages"][0]
    assert first["role"] == "system"
    assert first["content"].startswith(JSON_INSTRUCTION)
    assert orjson.loads(first["content"][len(JSON_INSTRUCTION):]) == schema
    assert out["messages"][1:] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kind", ["vllm", "sglang", "openai"])
def test_json_schema_with_capability_is_sent_as_is(kind: str) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "ans", "schema": {"type": "object"}}}
    _, out = send_chat(kind, chat(response_format=rf), capabilities=("json_object", "json_schema"))
    assert out["response_format"] == rf
    assert out["messages"] == [{"role": "user", "content": "hi"}]


def test_json_object_is_untouched() -> None:
    _, out = send_chat("deepseek", chat(response_format={"type": "json_object"}))
    assert out["response_format"] == {"type": "json_object"}
    assert len(out["messages"]) == 1
