"""SGLang's OpenAI-compatible server (self-hosted).

- errors come as a flat ``{"object":"error", "message", "code": int}`` (handled in ``Provider.error_fields``);
- reasoning is ``reasoning_content`` already; reasoning tokens sit at top-level ``usage.reasoning_tokens``
  (read by ``Usage.from_openai``);
- thinking for DeepSeek V3.x templates is ``chat_template_kwargs.thinking``;
- health at ``/health`` (a 1-token generation in current releases: 503 while starting).
"""

from __future__ import annotations

from typing import Any

from therouter.config import Deployment
from therouter.providers.base import Provider


class SGLangProvider(Provider):
    kind = "sglang"
    max_stop = 64
    default_health_path = "/health"

    def adapt_chat(self, out: dict[str, Any], dep: Deployment) -> None:
        thinking = out.pop("thinking", None)
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
            kw = dict(out.get("chat_template_kwargs") or {})
            kw["thinking"] = thinking["type"] == "enabled"
            out["chat_template_kwargs"] = kw
        effort = out.get("reasoning_effort")
        if effort == "none":
            out.pop("reasoning_effort")
            kw = dict(out.get("chat_template_kwargs") or {})
            kw["thinking"] = False
            out["chat_template_kwargs"] = kw
        elif isinstance(effort, str) and "thinking" not in (out.get("chat_template_kwargs") or {}):
            # DeepSeek's templates only switch thinking on; the effort itself is left for models that read it
            out["chat_template_kwargs"] = {**(out.get("chat_template_kwargs") or {}), "thinking": True}
