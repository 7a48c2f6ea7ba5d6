from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from therouter.protocol.common import Role, SamplingParams, WireModel


class FunctionDef(WireModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDef


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class Reasoning(WireModel):
    """OpenRouter's reasoning controls; mapped per deployment by its adapter (providers/base.py)."""

    effort: Effort | None = None
    max_tokens: int | None = Field(None, ge=0)
    exclude: bool | None = None  # strip reasoning from the answer (still billed)
    enabled: bool | None = None


class ChatMessage(WireModel):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_effort: Effort | None = None
    reasoning: Reasoning | None = None
    # OpenRouter-style routing preferences (consumed by the gateway, never sent upstream)
    models: list[str] | None = None
    provider: dict[str, Any] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError("must be 'none', 'auto', 'required' or a {type: function} object")
        return v
