"""vLLM's OpenAI-compatible server (self-hosted).

- reasoning is called ``reasoning`` (message and delta): clients get ``reasoning_content``; assistant history carries
  both keys upstream (templates differ in which they read);
- ``suffix`` is refused by vLLM: FIM is built here from the deployment's ``fim_tokens``, only where declared;
- the legacy ``guided_*`` fields are silently ignored by vLLM >= 0.12: translated to ``structured_outputs``;
- error bodies carry an integer ``code`` (handled in ``Provider.error_fields``).
"""

from __future__ import annotations

from typing import Any

from therouter.config import Deployment
from therouter.providers.base import Provider

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class VLLMProvider(Provider):
    kind = "vllm"
    max_stop = 64
    reasoning_field = "reasoning"
    default_health_path = "/health"

    def adapt_message(self, m: dict[str, Any]) -> dict[str, Any]:
        if m.get("role") == "assistant" and m.get("reasoning_content") is not None and "reasoning" not in m:
            m = dict(m)
            m["reasoning"] = m["reasoning_content"]
        return m

    def adapt_chat(self, out: dict[str, Any], dep: Deployment) -> None:
        _guided(out)
        effort = out.get("reasoning_effort")
        if effort == "none":
            out.pop("reasoning_effort")
            kw = dict(out.get("chat_template_kwargs") or {})
            kw["thinking"] = False
            out["chat_template_kwargs"] = kw
        elif isinstance(effort, str) and "thinking" not in (out.get("chat_template_kwargs") or {}):
            # DeepSeek's templates only switch thinking on; the effort itself is left for models that read it
            out["chat_template_kwargs"] = {**(out.get("chat_template_kwargs") or {}), "thinking": True}
        thinking = out.pop("thinking", None)
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
            kw = dict(out.get("chat_template_kwargs") or {})
            kw["thinking"] = thinking["type"] == "enabled"
            out["chat_template_kwargs"] = kw


def _guided(out: dict[str, Any]) -> None:
    so: dict[str, Any] | None = None
    for old, new in _GUIDED.items():
        if old in out:
            so = so if so is not None else dict(out.get("structured_outputs") or {})
            so[new] = out.pop(old)
    for k in [k for k in out if k.startswith("guided_")]:  # guided_decoding_backend, guided_whitespace_pattern...
        out.pop(k)  # silently ignored by vLLM >= 0.12: never sent, so nothing pretends to be constrained
    if so is not None:
        out["structured_outputs"] = so
