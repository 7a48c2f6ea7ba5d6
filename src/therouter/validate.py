"""Validation at the edge: every bad input becomes a clear OpenAI-shaped 4xx, never a 500.

The body is parsed once (orjson), bounded in size and nesting depth, checked for fields that would steer the upstream,
validated against the OpenAI wire model, then against the model's card (context, max output, parameters, modalities).
The raw dict is what travels on: unknown fields pass through to the upstream untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from therouter.config import ModelConfig
from therouter.errors import ContextLengthExceeded, InvalidRequest, PayloadTooLarge
from therouter.protocol import ChatCompletionRequest, CompletionRequest

# Fields that would let a client steer where or how we call the upstream (LiteLLM-style escape hatches).
STEERING_FIELDS = frozenset({
    "api_base", "base_url", "api_key", "api_version", "extra_headers", "headers", "custom_llm_provider",
    "organization", "aws_access_key_id", "aws_secret_access_key", "vertex_credentials", "azure_ad_token",
})
# OpenAI parameters that must appear in the model's supported_parameters when sent with a non-default value.
GATED_PARAMS: dict[str, Any] = {
    "temperature": None, "top_p": None, "max_tokens": None, "tools": None, "tool_choice": None,
    "response_format": None, "stop": None, "presence_penalty": None, "frequency_penalty": None,
    "logit_bias": None, "logprobs": None, "top_logprobs": None, "seed": None, "reasoning_effort": None,
    "n": 1, "parallel_tool_calls": None,
}
ALIASES = {"max_completion_tokens": "max_tokens"}
MODALITY_OF_PART = {"image_url": "image", "input_image": "image", "input_audio": "audio", "audio_url": "audio",
                    "file": "file", "video_url": "video"}


@dataclass(slots=True)
class Checked:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int  # estimate
    max_tokens: int | None  # what the client asked for (None: up to the model's max output)


def parse_body(raw: bytes, max_bytes: int, max_depth: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"Request body is {len(raw)} bytes; the limit is {max_bytes} bytes.")
    if not raw.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request ({e.msg}).") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _check_tree(body, max_depth)
    return body


def _check_tree(root: dict[str, Any], max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise InvalidRequest(f"The JSON body is nested deeper than {max_depth} levels.")
        if isinstance(node, dict):
            for k, v in node.items():
                if k in STEERING_FIELDS:
                    raise InvalidRequest(f"The field '{k}' is not accepted by this gateway.", param=k,
                                         code="unsupported_parameter")
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
        elif isinstance(node, list):
            for v in node:
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    return model


def _pydantic(cls: type[BaseModel], body: dict[str, Any]) -> None:
    try:
        cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        param = loc[0] if loc else None
        where = ".".join(loc)
        if err["type"] == "missing":
            raise InvalidRequest(f"Missing required parameter: '{where}'.", param=param,
                                 code="missing_required_parameter") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{where}': {msg}.", param=param, code="invalid_value") from None


def check_chat(body: dict[str, Any], card: ModelConfig, model: str) -> Checked:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages",
                             code="missing_required_parameter" if "messages" not in body else "invalid_value")
    _pydantic(ChatCompletionRequest, body)
    _stream_options(body)
    _gated(body, card)
    _modalities(body["messages"], card)
    prompt = estimate_chat_tokens(body)
    return _finish(body, card, model, prompt, "messages")


def check_completion(body: dict[str, Any], card: ModelConfig, model: str) -> Checked:
    if "prompt" not in body:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    _pydantic(CompletionRequest, body)
    _stream_options(body)
    _gated(body, card)
    text = body["prompt"] if isinstance(body["prompt"], str) else orjson.dumps(body["prompt"]).decode()
    prompt = estimate_tokens(text) + estimate_tokens(body.get("suffix") or "")
    return _finish(body, card, model, prompt, "prompt")


def _stream_options(body: dict[str, Any]) -> None:
    if body.get("stream_options") is not None and not body.get("stream"):
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                             param="stream_options", code="invalid_value")


def _gated(body: dict[str, Any], card: ModelConfig) -> None:
    supported = set(card.supported_parameters)
    for name, value in body.items():
        gate = ALIASES.get(name, name)
        if gate not in GATED_PARAMS or value is None or value == GATED_PARAMS[gate]:
            continue
        if gate not in supported:
            raise InvalidRequest(f"The parameter '{name}' is not supported by this model.", param=name,
                                 code="unsupported_parameter")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > card.max_output_tokens:
        param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        raise InvalidRequest(
            f"{param} is too large: {max_tokens}. This model supports at most {card.max_output_tokens} "
            "completion tokens.", param=param, code="invalid_value")


def _modalities(messages: list[Any], card: ModelConfig) -> None:
    allowed = set(card.modalities.input)
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            modality = MODALITY_OF_PART.get(str(kind))
            if modality and modality not in allowed:
                raise InvalidRequest(
                    f"This model does not accept {modality} input (content part type '{kind}'); "
                    f"it accepts: {', '.join(sorted(allowed))}.", param="messages", code="unsupported_modality")


def _finish(body: dict[str, Any], card: ModelConfig, model: str, prompt: int, what: str) -> Checked:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = max_tokens if isinstance(max_tokens, int) else 0
    ctx = card.context_length
    if prompt > ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in {prompt} "
            f"tokens. Please reduce the length of the {what}.", param=what)
    if prompt + completion > ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {ctx} tokens. However, you requested {prompt + completion} "
            f"tokens ({prompt} in the {what}, {completion} in the completion). Please reduce the length of the "
            f"{what} or completion.", param=what)
    so = body.get("stream_options")
    return Checked(
        body=body, model=model, stream=bool(body.get("stream")),
        include_usage=bool(isinstance(so, dict) and so.get("include_usage")),
        prompt_tokens=prompt, max_tokens=max_tokens if isinstance(max_tokens, int) else None,
    )


def estimate_tokens(text: str) -> int:
    """A cheap, deliberately generous estimate: about 4 bytes of UTF-8 per token (CJK: ~1 token per character)."""
    return (len(text.encode("utf-8", "replace")) + 3) // 4


def estimate_chat_tokens(body: dict[str, Any]) -> int:
    total = 3
    for m in body.get("messages") or ():
        total += 4
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            total += estimate_tokens(c)
        elif isinstance(c, list):
            for part in c:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += estimate_tokens(part["text"])
                else:
                    total += 85  # an image or other part
        for extra in ("tool_calls", "reasoning_content"):
            if m.get(extra):
                total += estimate_tokens(orjson.dumps(m[extra]).decode())
    if body.get("tools"):
        total += estimate_tokens(orjson.dumps(body["tools"]).decode())
    return total
