"""DeepSeek's hosted API.

- role ``developer`` is refused by DeepSeek: sent as ``system``;
- ``reasoning_effort: "none"`` is refused: sent as ``thinking: {type: disabled}``;
- ``reasoning_content`` on assistant history passes through untouched (DeepSeek refuses a tool-calling turn without it);
- fill-in-the-middle goes to ``/beta/completions``;
- usage ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens`` feed ``prompt_tokens_details.cached_tokens``
  (originals kept); usage rides on the last choice chunk of a stream (the gateway re-emits it OpenAI's way);
- 401 / 402 are our credentials / balance: mapped in ``_http.error_from_upstream`` to a provider fault.
"""

from __future__ import annotations

from typing import Any

from therouter.config import Deployment
from therouter.providers.base import Provider

_EFFORT = {"minimal": "low", "low": "low", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}


class DeepSeekProvider(Provider):
    kind = "deepseek"
    max_stop = 16
    native_fim = True

    def adapt_message(self, m: dict[str, Any]) -> dict[str, Any]:
        if m.get("role") == "developer":
            m = dict(m)
            m["role"] = "system"
        return m

    def adapt_chat(self, out: dict[str, Any], dep: Deployment) -> None:
        effort = out.get("reasoning_effort")
        if effort == "none":
            out.pop("reasoning_effort")
            out["thinking"] = {"type": "disabled"}
        elif isinstance(effort, str):  # DeepSeek knows low / high / max
            out["reasoning_effort"] = _EFFORT.get(effort, effort)  # (V4 thinks by default)

    def fim(self, out: dict[str, Any], dep: Deployment) -> str:
        base = self.config.fim_base_url or (self.config.base_url.removesuffix("/v1") + "/beta")
        return base + "/completions"

    def models_url(self) -> str:
        return self.config.base_url + "/models"
