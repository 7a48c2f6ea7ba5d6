from __future__ import annotations

from pydantic import Field

from therouter.protocol.common import SamplingParams


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool | None = None
    best_of: int | None = Field(None, ge=0, le=20)
    logprobs: int | None = Field(None, ge=0, le=20)
    models: list[str] | None = None
    provider: dict[str, object] | None = None
