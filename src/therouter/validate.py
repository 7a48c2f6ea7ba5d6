"""Validation at the edge: every bad input becomes a clear OpenAI-shaped 4xx, never a 500.

The body is parsed once (orjson), bounded in size and nesting depth, checked for fields that would steer the upstream,
validated against the OpenAI wire models **strictly** (OpenAI's own types: ``"stream": "false"`` or
``"max_tokens": "5000"`` are a 400 ``invalid_type``, never coerced), then against the model's card (context, max
output, parameters, modalities).

Every fact the rest of the request needs is decided here, once, and carried on :class:`Checked`: the one output
limit (``max_tokens`` / ``max_completion_tokens`` resolved), how many sequences the upstream will generate, whether
it streams, and the prompt estimate. ``Checked.body`` is the client's body with that one output limit written as
``max_tokens`` (and ``max_completion_tokens`` removed), so the adapters send upstream exactly what was validated and
reserved. Unknown fields pass through to the upstream untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from therouter import params
from therouter.config import ModelConfig
from therouter.errors import ContextLengthExceeded, InvalidRequest, PayloadTooLarge
from therouter.protocol import ChatCompletionRequest, CompletionRequest

Endpoint = Literal["chat", "completions"]

# Fields that would let a client steer where or how we call the upstream (LiteLLM-style escape hatches), compared
# after folding case and dropping "_" / "-" (so `apiBase`, `API-KEY` and `api_key` are one name). They are refused at
# the top level of the body and inside the client-side containers below, never deeper: a tool with a `headers`
# parameter, a JSON schema with an `organization` property or `metadata` that mentions a base URL are ordinary requests.
STEERING_FIELDS = frozenset({
    "apibase", "baseurl", "apikey", "apiversion", "apiurl", "extraheaders", "headers", "defaultheaders",
    "extraquery", "defaultquery", "organization", "organisation", "customllmprovider", "awsaccesskeyid",
    "awssecretaccesskey", "awssessiontoken", "vertexcredentials", "azureadtoken",
})
STEERING_CONTAINERS = frozenset({"litellmparams", "extrabody"})
MODALITY_OF_PART = {"image_url": "image", "input_image": "image", "input_audio": "audio", "audio_url": "audio",
                    "file": "file", "video_url": "video"}


@dataclass(slots=True)
class Checked:
    """One client request, read once. Validation, reservation, routing and every adapter read this."""

    body: dict[str, Any]  # the client's body; the resolved output limit (if any) is its only `max_tokens`
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int  # estimate (context check, TPM, and the fallback when an upstream reports no usage)
    max_tokens: int | None  # the one output limit per sequence (None: up to the model's max output)
    endpoint: Endpoint = "chat"
    sequences: int = 1  # sequences the upstream generates and bills: n (x best_of, x batched prompts)
    window_tokens: int = 0  # what one sequence needs of a context window: the longest prompt + the output limit


def parse_body(raw: bytes, max_bytes: int, max_depth: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"Request body is {len(raw)} bytes; the limit is {max_bytes} bytes.")
    if not raw or raw.isspace():  # (no copy of the body, as strip() made)
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request ({e.msg}).") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if raw.count(b"{") + raw.count(b"[") > max_depth:  # (fewer brackets than that, in strings or not: not as deep)
        _check_depth(body, max_depth)
    check_steering(body)
    return body


_FOLDED: dict[str, str] = {}  # the few field names clients send, folded once (bounded: unusual names are not kept)


def _fold(name: str) -> str:
    folded = _FOLDED.get(name)
    if folded is None:
        folded = name.lower().replace("_", "").replace("-", "")
        if len(_FOLDED) < 1024:
            _FOLDED[name] = folded
    return folded


def check_steering(body: dict[str, Any]) -> None:
    """Refuse upstream-steering fields at the top level and inside `litellm_params` / `extra_body` (any spelling)."""
    stack = [body]
    while stack:
        node = stack.pop()
        for k, v in node.items():
            folded = _fold(k) if isinstance(k, str) else ""
            if folded in STEERING_FIELDS:
                raise InvalidRequest(f"The field '{k[:64]}' is not accepted by this gateway.", param=k[:64],
                                     code="unsupported_parameter")
            if folded in STEERING_CONTAINERS and isinstance(v, dict):
                stack.append(v)


def _check_depth(root: dict[str, Any], max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise InvalidRequest(f"The JSON body is nested deeper than {max_depth} levels.")
        children = node.values() if isinstance(node, dict) else node
        for v in children:
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise InvalidRequest(f"Invalid type for 'model': expected a string, but got {_kind(model)} instead.",
                             param="model", code="invalid_type")
    if not model:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    return model


# ---- OpenAI's types, strictly -----------------------------------------------------------------------------------

_EXPECTED = {"int_type": "an integer", "bool_type": "a boolean", "float_type": "a number",
             "string_type": "a string", "list_type": "an array", "dict_type": "an object", "model_type": "an object",
             "model_attributes_type": "an object", "literal_error": None, "int_from_float": "an integer"}


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a decimal"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return "a value"


def _path(loc: tuple[Any, ...]) -> str:
    """OpenAI's spelling of a location: `messages[0].content`; pydantic's union-member tags are dropped."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "dict", "list")):
            continue  # a union member's tag (e.g. 'list[dict[str,any]]'), not a field
        else:
            out += ("." if out else "") + p
    return out


def _pydantic(cls: type[BaseModel], body: dict[str, Any]) -> None:
    try:
        cls.model_validate(body, strict=True)
    except ValidationError as e:
        errs = e.errors()
        err = errs[0]
        where = _path(tuple(err["loc"]))
        param = where or None
        if err["type"] == "missing":
            raise InvalidRequest(f"Missing required parameter: '{where}'.", param=param,
                                 code="missing_required_parameter") from None
        expected = [text for x in errs
                    if _path(tuple(x["loc"])) == where and (text := _EXPECTED.get(x["type"])) is not None]
        if expected and all(x["type"] in _EXPECTED for x in errs if _path(tuple(x["loc"])) == where):
            want = " or ".join(dict.fromkeys(expected))
            want = f"one of {want}" if len(set(expected)) > 1 else want
            raise InvalidRequest(f"Invalid type for '{where}': expected {want}, but got {_kind(err['input'])} "
                                 "instead.", param=param, code="invalid_type") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{where}': {msg}.", param=param, code="invalid_value") from None


# ---- per endpoint -------------------------------------------------------------------------------------------------


def check(endpoint: Endpoint, body: dict[str, Any], card: ModelConfig, model: str,
          catalogue: Mapping[str, ModelConfig] | None = None) -> Checked:
    """``catalogue``: the models a refusal may point to instead (e.g. those that accept images)."""
    if endpoint == "chat":
        return check_chat(body, card, model, catalogue)
    return check_completion(body, card, model)


def check_chat(body: dict[str, Any], card: ModelConfig, model: str,
               catalogue: Mapping[str, ModelConfig] | None = None) -> Checked:
    if "messages" not in body:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages",
                             code="missing_required_parameter")
    if body["messages"] == []:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages", code="invalid_value")
    _pydantic(ChatCompletionRequest, body)
    _stream_options(body)
    _gated(body, card)
    _modalities(body["messages"], card, catalogue or {})
    limit = _output_limit(body, card)
    prompt = estimate_chat_tokens(body)
    _context(card, prompt, limit, "messages")
    return Checked(body=_with_limit(body, limit), model=model, endpoint="chat", stream=body.get("stream") is True,
                   include_usage=_include_usage(body), prompt_tokens=prompt, max_tokens=limit,
                   sequences=body.get("n") or 1, window_tokens=prompt + (limit or 0))


def check_completion(body: dict[str, Any], card: ModelConfig, model: str) -> Checked:
    if "prompt" not in body:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    _pydantic(CompletionRequest, body)
    _stream_options(body)
    _gated(body, card)
    limit = _output_limit(body, card)
    prompts = completion_prompt_tokens(body["prompt"])
    suffix = estimate_tokens(body.get("suffix") or "")
    # each prompt of a batch is its own sequence: the window bounds the longest, TPM and budgets count them all
    longest = max(prompts, default=0) + suffix
    _context(card, longest, limit, "prompt")
    best_of = body.get("best_of") or 1
    per_prompt = max(body.get("n") or 1, best_of)  # best_of sequences are generated (and billed) server-side
    return Checked(body=_with_limit(body, limit), model=model, endpoint="completions",
                   stream=body.get("stream") is True, include_usage=_include_usage(body),
                   prompt_tokens=sum(prompts) + suffix * max(len(prompts), 1), max_tokens=limit,
                   sequences=per_prompt * max(len(prompts), 1), window_tokens=longest + (limit or 0))


def _output_limit(body: dict[str, Any], card: ModelConfig) -> int | None:
    """The one output limit per sequence. Both fields given: the smaller one holds (it is the only one sent)."""
    given = [(body[p], p) for p in ("max_tokens", "max_completion_tokens") if body.get(p) is not None]
    if not given:
        return None
    limit, param = min(given)
    if limit > card.max_output_tokens:
        raise InvalidRequest(
            f"{param} is too large: {limit}. This model supports at most {card.max_output_tokens} completion "
            "tokens.", param=param, code="invalid_value")
    return int(limit)


def _with_limit(body: dict[str, Any], limit: int | None) -> dict[str, Any]:
    if "max_completion_tokens" not in body and body.get("max_tokens") == limit:
        return body
    out = dict(body)
    out.pop("max_completion_tokens", None)
    out.pop("max_tokens", None)
    if limit is not None:
        out["max_tokens"] = limit
    return out


def _include_usage(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    return isinstance(so, dict) and so.get("include_usage") is True


def _stream_options(body: dict[str, Any]) -> None:
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                             param="stream_options", code="invalid_value")


def _gated(body: dict[str, Any], card: ModelConfig) -> None:
    """Parameters that change what the answer is and that no deployment of the model honours: a 400 naming them.
    Hints and sampling controls never fail here: routing drops them where a deployment lacks them (params.py)."""
    offered = params.offered(card)
    for name in ("tools", "tool_choice", "response_format", *sorted(params.asked_shaping(body))):
        if body.get(name) is not None and name not in offered:
            raise InvalidRequest(f"The parameter '{name}' is not supported by this model.", param=name,
                                 code="unsupported_parameter")


def _modalities(messages: list[Any], card: ModelConfig, catalogue: Mapping[str, ModelConfig]) -> None:
    allowed = set(card.modalities.input)
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            modality = MODALITY_OF_PART.get(str(kind))
            if modality and modality not in allowed:
                able = sorted(m for m, c in catalogue.items() if modality in c.modalities.input)
                where = f" Models that accept {modality} input: {', '.join(able)}." if able else ""
                raise InvalidRequest(
                    f"This model does not accept {modality} input (content part type '{kind}'); "
                    f"it accepts: {', '.join(sorted(allowed))}.{where}", param="messages",
                    code="unsupported_modality")


def _context(card: ModelConfig, prompt: int, limit: int | None, what: str) -> None:
    completion = limit or 0
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


# ---- estimates ----------------------------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """A cheap estimate: about 4 bytes of UTF-8 per token. For context checks and TPM only: budgets reserve from
    :func:`prompt_bound`, which is an upper bound."""
    return (len(text.encode("utf-8", "replace")) + 3) // 4


def completion_prompt_tokens(prompt: Any) -> list[int]:
    """Per prompt of a (possibly batched) legacy-completions prompt: token ids are counted exactly."""
    if isinstance(prompt, str):
        return [estimate_tokens(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return [len(prompt)]
    if isinstance(prompt, list):
        return [len(p) if isinstance(p, list) else estimate_tokens(p) if isinstance(p, str) else 0 for p in prompt]
    return [0]


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
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("json_schema"):  # sent as-is, or as an instruction where only JSON mode exists
        total += estimate_tokens(orjson.dumps(rf["json_schema"]).decode())
    return total


# Chat templates wrap each message in a few special tokens and tool definitions in an instruction block; an
# allowance for them keeps the bound an upper bound.
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS_FIXED = 64
TEMPLATE_TOKENS_TOOLS = 1024
# the most a provider bills for one image part given by URL (a data: URL's bytes are in the body already): Claude
# Opus 4.7 reads images up to ~3.75 MP, about 5,000 tokens at Anthropic's (w x h) / 750 [verify per provider]
IMAGE_TOKENS = 8192


def prompt_bound(upstream_body: bytes, checked: Checked) -> int:
    """The most prompt tokens an upstream request with this body can be billed for.

    Byte-level BPE tokenizers (DeepSeek's, and every tokenizer vLLM / SGLang serve it with) never make a token of
    less than one byte, so a prompt has at most as many tokens as its UTF-8 text has bytes; the upstream JSON body
    holds all of that text (plus keys and punctuation), so its length bounds the text's. Added to that: the chat
    template's tokens, and images. Legacy prompts of token ids count exactly (an id is one token whatever its
    digits). What the upstream reports beyond this bound is clamped at settlement, so the reservation made from it
    covers every cost the request can be billed.
    """
    b = checked.body
    if checked.endpoint == "completions":
        prompt = b.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
            ids = sum(completion_prompt_tokens(prompt))
            return ids + len(orjson.dumps(b.get("suffix") or "")) + TEMPLATE_TOKENS_FIXED
        return len(upstream_body) + TEMPLATE_TOKENS_FIXED
    messages = b.get("messages") or ()
    images = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                 for p in m["content"] if isinstance(p, dict) and MODALITY_OF_PART.get(str(p.get("type"))))
    tools = TEMPLATE_TOKENS_TOOLS if b.get("tools") or b.get("response_format") else 0
    return (len(upstream_body) + TEMPLATE_TOKENS_FIXED + tools + images * IMAGE_TOKENS
            + TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1))
