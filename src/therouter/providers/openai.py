"""OpenAI itself, or any server that speaks its API exactly."""

from __future__ import annotations

from typing import Any

from therouter.config import Deployment
from therouter.providers.base import Provider


class OpenAIProvider(Provider):
    kind = "openai"
    max_stop = 4
    native_fim = True

    def adapt_chat(self, out: dict[str, Any], dep: Deployment) -> None:
        thinking = out.pop("thinking", None)  # DeepSeek's switch: OpenAI's is reasoning_effort
        if isinstance(thinking, dict) and "reasoning_effort" not in out:
            out["reasoning_effort"] = "medium" if thinking.get("type") == "enabled" else "none"
