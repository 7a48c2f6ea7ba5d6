"""Per-flavor wire shapes: ids, errors, usage, messages, /models, request validation.

See /work/shared/reference/wire-formats.md sections 2-4.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, NamedTuple

from therouter.fakeupstream.content import Plan, schema_content

ROUTE_CHAT = "chat"
ROUTE_COMPLETIONS = "completions"
ROUTE_BETA_CHAT = "beta_chat"
ROUTE_BETA_COMPLETIONS = "beta_completions"

FIM_BEGIN = "<\uff5cfim\u2581begin\uff5c>"
FIM_HOLE = "<\uff5cfim\u2581hole\uff5c>"
FIM_END = "<\uff5cfim\u2581end\uff5c>"


class ErrorSpec(NamedTuple):
    status: int
    message: str
    type: str  # OpenAI/DeepSeek style type (vllm/sglang derive theirs from the status)
    code: str  # OpenAI/DeepSeek style string code
    param: str | None = None


STATUS_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    402: "PaymentRequiredError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

FAULT_ERRORS: dict[str, ErrorSpec] = {
    "400": ErrorSpec(
        400, "Invalid request (injected by fake upstream)", "invalid_request_error", "invalid_request_error"
    ),
    "401": ErrorSpec(
        401, "Authentication Fails, Your api key is invalid", "authentication_error", "invalid_request_error"
    ),
    "402": ErrorSpec(402, "Insufficient Balance", "unknown_error", "invalid_request_error"),
    "408": ErrorSpec(408, "Request Timeout", "timeout_error", "request_timeout"),
    "403": ErrorSpec(403, "Your API key does not have permission to use the specified resource",
                     "permission_error", "permission_denied"),
    "429": ErrorSpec(429, "Rate Limit Reached", "rate_limit_error", "rate_limit_exceeded"),
    "529": ErrorSpec(529, "Overloaded", "overloaded_error", "overloaded"),
    "500": ErrorSpec(500, "Internal Server Error", "server_error", "internal_error"),
    "503": ErrorSpec(503, "Server overloaded, please retry shortly", "server_error", "server_overloaded"),
    "in_band": ErrorSpec(500, "upstream generation failed (injected in-band error)", "server_error", "internal_error"),
}


def context_length_error(prompt_tokens: int, completion_tokens: int, max_model_len: int) -> ErrorSpec:
    asked = max_model_len + prompt_tokens
    msg = (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{asked + completion_tokens} tokens ({asked} in the messages, {completion_tokens} in the completion). "
        "Please reduce the length of the messages or completion."
    )
    return ErrorSpec(400, msg, "invalid_request_error", "context_length_exceeded", "messages")


def bad_request(message: str, param: str | None = None) -> ErrorSpec:
    return ErrorSpec(400, message, "invalid_request_error", "invalid_request_error", param)


def missing_field(name: str) -> ErrorSpec:
    return bad_request(f"Failed to deserialize the JSON body into the target type: missing field `{name}`", name)


def _metrics(prefix: str, names: tuple[str, str, str], labels: list[str], values: tuple[float, ...]) -> str:
    lines = []
    for name, value in zip(names, values, strict=True):
        lines.append(f"# TYPE {prefix}:{name} gauge")
        lines.extend(f"{prefix}:{name}{{{lbl}}} {float(value)}" for lbl in labels)
    return "\n".join(lines) + "\n"


class Flavor:
    name = "base"
    reasoning_field = "reasoning_content"
    owned_by = "fake"
    #: how the finish_reason is sent in streams: "empty_content" (DeepSeek: delta {"content": ""}),
    #: "attach" (vLLM: on the last generated chunk), "empty_delta" (SGLang: delta {})
    finish_mode = "empty_delta"
    chunk_extra: ClassVar[dict[str, Any]] = {}
    response_extra: ClassVar[dict[str, Any]] = {}
    choice_extra: ClassVar[dict[str, Any]] = {}
    matched_field: str | None = None  # the finish choice's field naming the stop string that ended the text
    auth_header = "authorization"  # the request header that carries the API key
    hidden_reasoning = False  # reasoning tokens are billed but their text never sent (OpenAI's reasoning models)

    def auth_value(self, api_key: str) -> str:
        return f"Bearer {api_key}"

    def context_error(self, prompt_tokens: int, completion_tokens: int, max_model_len: int) -> ErrorSpec:
        return context_length_error(prompt_tokens, completion_tokens, max_model_len)

    def plan_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request as the flavour-neutral planner (``content.build_plan``) reads it: OpenAI's shape."""
        return body

    def adjust_plan(self, plan: Plan, body: dict[str, Any]) -> None:
        """Flavour-specific touches to a plan once built."""

    # ---- ids -------------------------------------------------------------------------
    def chat_id(self) -> str:
        return f"chatcmpl-{uuid.uuid4().hex}"

    def completion_id(self) -> str:
        return f"cmpl-{uuid.uuid4().hex}"

    def tool_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    # ---- errors ----------------------------------------------------------------------
    def error_body(self, err: ErrorSpec) -> dict[str, Any]:
        """HTTP error response body."""
        return {"error": self.stream_error(err)["error"]}

    def stream_error(self, err: ErrorSpec) -> dict[str, Any]:
        """In-stream error event payload (always ``{"error": {...}}``)."""
        return {
            "error": {
                "message": err.message,
                "type": STATUS_TYPES.get(err.status, "BadRequestError"),
                "param": err.param,
                "code": err.status,
            }
        }

    def error_headers(self, err: ErrorSpec) -> list[tuple[bytes, bytes]]:
        return []

    def model_not_found(self, model: str) -> ErrorSpec:
        msg = f"The model `{model}` does not exist."
        return ErrorSpec(404, msg, "invalid_request_error", "model_not_found", "model")

    def unauthorized(self) -> ErrorSpec:
        return ErrorSpec(401, "Unauthorized", "authentication_error", "invalid_api_key")

    # ---- usage -----------------------------------------------------------------------
    def usage(self, plan: Plan) -> dict[str, Any]:
        completion = plan.completion_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": plan.prompt_tokens,
            "total_tokens": plan.prompt_tokens + completion,
            "completion_tokens": completion,
        }
        if plan.cached_tokens > 0:
            usage["prompt_tokens_details"] = {"cached_tokens": plan.cached_tokens}
        if plan.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": plan.reasoning_tokens}
        return usage

    def include_usage(self, body: dict[str, Any]) -> bool:
        """Whether a stream reports usage (as a separate ``choices: []`` chunk)."""
        so = body.get("stream_options")
        return isinstance(so, dict) and bool(so.get("include_usage"))

    def usage_null_on_chunks(self, include_usage: bool) -> bool:
        return False

    # ---- request handling ------------------------------------------------------------
    def default_model(self, models: list[str]) -> str | None:
        for m in models:
            if m != "*":
                return m
        return None

    def thinking_requested(self, body: dict[str, Any]) -> bool:
        kw = body.get("chat_template_kwargs")
        return isinstance(kw, dict) and bool(kw.get("thinking") or kw.get("enable_thinking"))

    def validate(self, route: str, body: dict[str, Any], reasoning_on: bool) -> ErrorSpec | None:
        return None

    # ---- response shapes -------------------------------------------------------------
    def role_delta(self, plan: Plan) -> dict[str, Any]:
        return {"role": "assistant", "content": ""}

    def reasoning_delta(self, text: str) -> dict[str, Any]:
        return {self.reasoning_field: text}

    def message(self, plan: Plan) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": plan.text if not plan.tool_calls else None}
        msg[self.reasoning_field] = plan.reasoning_text if plan.reasoning else None
        msg["tool_calls"] = [_tool_call_json(tc) for tc in plan.tool_calls] or None
        return msg

    def model_entry(self, model_id: str, created: int, max_model_len: int) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": self.owned_by,
            "root": model_id,
            "max_model_len": max_model_len,
        }

    def metrics_text(self, models: list[str], running: int, waiting: int, kv_usage: float) -> str | None:
        """Prometheus text for ``GET /metrics`` (``None``: the endpoint does not exist)."""
        return None


def _tool_call_json(tc: Any) -> dict[str, Any]:
    return {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}


class DeepSeekFlavor(Flavor):
    name = "deepseek"
    reasoning_field = "reasoning_content"
    owned_by = "deepseek"
    finish_mode = "empty_content"
    chunk_extra: ClassVar[dict[str, Any]] = {"system_fingerprint": "fp_fake_deepseek"}
    response_extra: ClassVar[dict[str, Any]] = {"system_fingerprint": "fp_fake_deepseek"}

    def chat_id(self) -> str:
        return str(uuid.uuid4())

    completion_id = chat_id

    def tool_id(self) -> str:
        return f"call_00_{uuid.uuid4().hex[:24]}"

    def error_body(self, err: ErrorSpec) -> dict[str, Any]:
        return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}

    stream_error = error_body

    def error_headers(self, err: ErrorSpec) -> list[tuple[bytes, bytes]]:
        return [(b"x-ds-trace-id", uuid.uuid4().hex.encode())]

    def model_not_found(self, model: str) -> ErrorSpec:
        # Real DeepSeek answers an unknown model with 400 "Model Not Exist" (wire-formats.md 2.9).
        return ErrorSpec(400, "Model Not Exist", "invalid_request_error", "invalid_request_error")

    def unauthorized(self) -> ErrorSpec:
        return ErrorSpec(
            401, "Authentication Fails, Your api key is invalid", "authentication_error", "invalid_request_error"
        )

    def usage(self, plan: Plan) -> dict[str, Any]:
        completion = plan.completion_tokens
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
            "prompt_cache_hit_tokens": plan.cached_tokens,
            "prompt_cache_miss_tokens": plan.prompt_tokens - plan.cached_tokens,
            "completion_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        }

    def usage_null_on_chunks(self, include_usage: bool) -> bool:
        return include_usage

    def default_model(self, models: list[str]) -> str | None:
        return None  # DeepSeek requires `model`

    def thinking_requested(self, body: dict[str, Any]) -> bool:
        th = body.get("thinking")
        return isinstance(th, dict) and th.get("type") == "enabled"

    def validate(self, route: str, body: dict[str, Any], reasoning_on: bool) -> ErrorSpec | None:
        if route == ROUTE_COMPLETIONS and body.get("suffix") is not None:
            return bad_request("suffix (FIM) is only supported on the beta endpoint /beta/completions", "suffix")
        if body.get("reasoning_effort") == "none":
            return bad_request(
                "Failed to deserialize the JSON body into the target type: reasoning_effort: unknown variant "
                "`none`, expected one of `low`, `medium`, `high`, `max`"
            )
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            return bad_request("This response_format type is unavailable now", "response_format")
        for i, m in enumerate(body.get("messages") or ()):
            if not isinstance(m, dict):
                continue
            role = m.get("role")
            if role == "developer":
                return bad_request(
                    f"Failed to deserialize the JSON body into the target type: messages[{i}]: unknown variant "
                    "`developer`, expected one of `system`, `user`, `assistant`, `tool`"
                )
            if reasoning_on and role == "assistant" and m.get("tool_calls") and m.get("reasoning_content") is None:
                return bad_request("The `reasoning_content` in the thinking mode must be passed back to the API.")
        return None

    def role_delta(self, plan: Plan) -> dict[str, Any]:
        if plan.reasoning:
            return {"role": "assistant", "content": None, "reasoning_content": ""}
        return {"role": "assistant", "content": ""}

    def reasoning_delta(self, text: str) -> dict[str, Any]:
        return {"content": None, "reasoning_content": text}

    def message(self, plan: Plan) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": plan.text}
        if plan.reasoning:
            msg["reasoning_content"] = plan.reasoning_text
        if plan.tool_calls:
            msg["tool_calls"] = [
                {"index": i, **_tool_call_json(tc)} for i, tc in enumerate(plan.tool_calls)
            ]
        return msg

    def model_entry(self, model_id: str, created: int, max_model_len: int) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "owned_by": self.owned_by}


class VLLMFlavor(Flavor):
    name = "vllm"
    reasoning_field = "reasoning"
    owned_by = "vllm"
    finish_mode = "attach"
    response_extra: ClassVar[dict[str, Any]] = {
        "service_tier": None, "system_fingerprint": None, "prompt_logprobs": None, "kv_transfer_params": None,
    }
    choice_extra: ClassVar[dict[str, Any]] = {"stop_reason": None}
    matched_field = "stop_reason"

    def tool_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def include_usage(self, body: dict[str, Any]) -> bool:
        # vLLM: include_usage defaults to true once stream_options is present.
        so = body.get("stream_options")
        if not isinstance(so, dict):
            return False
        v = so.get("include_usage", True)
        return True if v is None else bool(v)

    def validate(self, route: str, body: dict[str, Any], reasoning_on: bool) -> ErrorSpec | None:
        if route == ROUTE_COMPLETIONS and body.get("suffix") is not None:
            return bad_request("suffix is not currently supported", "suffix")
        return None

    def metrics_text(self, models: list[str], running: int, waiting: int, kv_usage: float) -> str | None:
        return _metrics(
            "vllm", ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"),
            [f'engine="0",model_name="{m}"' for m in models], (running, waiting, kv_usage),
        )

    def message(self, plan: Plan) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": plan.text if not plan.tool_calls else None,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [_tool_call_json(tc) for tc in plan.tool_calls],
            "reasoning": plan.reasoning_text if plan.reasoning else None,
        }

    def model_entry(self, model_id: str, created: int, max_model_len: int) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": model_id,
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{model_id.replace('/', '-')}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }


class SGLangFlavor(Flavor):
    name = "sglang"
    reasoning_field = "reasoning_content"
    owned_by = "sglang"
    finish_mode = "empty_delta"
    choice_extra: ClassVar[dict[str, Any]] = {"matched_stop": None}
    matched_field = "matched_stop"

    def chat_id(self) -> str:
        return uuid.uuid4().hex

    completion_id = chat_id

    def error_body(self, err: ErrorSpec) -> dict[str, Any]:
        return {
            "object": "error",
            "message": err.message,
            "type": STATUS_TYPES.get(err.status, "BadRequestError"),
            "param": err.param,
            "code": err.status,
        }

    def usage(self, plan: Plan) -> dict[str, Any]:
        usage = super().usage(plan)
        usage.pop("completion_tokens_details", None)
        usage.setdefault("prompt_tokens_details", None)
        usage["reasoning_tokens"] = plan.reasoning_tokens
        return usage

    def usage_null_on_chunks(self, include_usage: bool) -> bool:
        return True

    def metrics_text(self, models: list[str], running: int, waiting: int, kv_usage: float) -> str | None:
        return _metrics(
            "sglang", ("num_running_reqs", "num_queue_reqs", "token_usage"),
            [f'model_name="{m}"' for m in models], (running, waiting, kv_usage),
        )


class OpenAIFlavor(Flavor):
    """OpenAI itself: reasoning models (o-series, gpt-5*) refuse ``max_tokens`` (they take ``max_completion_tokens``)
    and any temperature but 1, bill reasoning tokens without sending their text, keep the ``developer`` role, and
    report usage with every detail field."""

    name = "openai"
    owned_by = "openai"
    hidden_reasoning = True
    chunk_extra: ClassVar[dict[str, Any]] = {"system_fingerprint": "fp_fake_openai", "service_tier": "default"}
    response_extra: ClassVar[dict[str, Any]] = {"system_fingerprint": "fp_fake_openai", "service_tier": "default"}

    def error_body(self, err: ErrorSpec) -> dict[str, Any]:
        return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}

    stream_error = error_body

    def unauthorized(self) -> ErrorSpec:
        return ErrorSpec(401, "Incorrect API key provided. You can find your API key at "
                         "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key")

    def default_model(self, models: list[str]) -> str | None:
        return None

    def usage(self, plan: Plan) -> dict[str, Any]:
        completion = plan.completion_tokens
        return {
            "prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": plan.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }

    def thinking_requested(self, body: dict[str, Any]) -> bool:
        return reasoning_model(str(body.get("model"))) and body.get("reasoning_effort") not in ("none", "minimal")

    def validate(self, route: str, body: dict[str, Any], reasoning_on: bool) -> ErrorSpec | None:
        if not reasoning_model(str(body.get("model"))):
            return None
        if body.get("max_tokens") is not None:
            return ErrorSpec(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                             "'max_completion_tokens' instead.", "invalid_request_error", "unsupported_parameter",
                             "max_tokens")
        t = body.get("temperature")
        if t is not None and t != 1:
            return ErrorSpec(400, f"Unsupported value: 'temperature' does not support {t} with this model. Only the "
                             "default (1) value is supported.", "invalid_request_error", "unsupported_value",
                             "temperature")
        effort = body.get("reasoning_effort")
        if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            return ErrorSpec(400, f"Invalid value: '{effort}'. Supported values are: 'none', 'minimal', 'low', "
                             "'medium', 'high' and 'xhigh'.", "invalid_request_error", "invalid_value",
                             "reasoning_effort")
        return None

    def message(self, plan: Plan) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": plan.text if not plan.tool_calls else None,
                               "refusal": None, "annotations": []}
        if plan.tool_calls:
            msg["tool_calls"] = [_tool_call_json(tc) for tc in plan.tool_calls]
        return msg

    def role_delta(self, plan: Plan) -> dict[str, Any]:
        return {"role": "assistant", "content": "", "refusal": None}

    def adjust_plan(self, plan: Plan, body: dict[str, Any]) -> None:
        rf = body.get("response_format")
        spec = rf.get("json_schema") if isinstance(rf, dict) and rf.get("type") == "json_schema" else None
        if isinstance(spec, dict):  # structured outputs follow the schema
            schema_content(plan, spec.get("schema"))

    def model_entry(self, model_id: str, created: int, max_model_len: int) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "openai"}


def reasoning_model(model: str) -> bool:
    """OpenAI's reasoning models: the o-series and gpt-5 (not gpt-5-chat)."""
    return (model.startswith("o") and model[1:2].isdigit()) or (model.startswith("gpt-5") and "chat" not in model)


FLAVOR_CLASSES: dict[str, type[Flavor]] = {
    "deepseek": DeepSeekFlavor,
    "vllm": VLLMFlavor,
    "sglang": SGLangFlavor,
    "openai": OpenAIFlavor,
}


def get_flavor(name: str) -> Flavor:
    return FLAVOR_CLASSES[name]()
