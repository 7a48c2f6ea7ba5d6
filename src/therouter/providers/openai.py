"""OpenAI itself (``kind: openai``), and any other server that speaks its chat API (``kind: openai_compatible``).

OpenAI:

- the output limit is sent as ``max_completion_tokens``: reasoning models (o-series, gpt-5) refuse ``max_tokens``,
  and every current chat model accepts ``max_completion_tokens`` (the legacy completions endpoint keeps
  ``max_tokens``, the only name it knows);
- the ``developer`` role and ``reasoning_effort`` pass through as sent (OpenAI defines them);
- usage ``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens`` are OpenAI's
  own fields (``Usage.from_openai``); reasoning text is never returned by OpenAI's chat API, only billed;
- error codes: ``insufficient_quota`` (a 429 about our billing, not a rate limit) is our account's fault at the
  provider: it falls back like a 402 and is not retried; ``invalid_api_key`` (401) likewise; ``rate_limit_exceeded``
  (429, with ``retry-after``) falls back and cools the deployment; ``context_length_exceeded``,
  ``unsupported_parameter`` / ``unsupported_value`` / ``invalid_value`` (400) are the client's, shown with their
  ``param``.

``openai_compatible``: the generic behaviour every adapter starts from (``base.Provider``) for self-hosted servers
that implement OpenAI's API -- LMDeploy's ``api_server``, TensorRT-LLM's ``trtllm-serve``, LightLLM, MindIE's
OpenAI endpoint: ``max_tokens`` as sent, health at ``/health``, self-hosted by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from therouter.config import Deployment
from therouter.errors import GatewayError
from therouter.providers._http import error_from_upstream
from therouter.providers._sanitize import MAX_INPUT
from therouter.providers.base import Provider

ACCOUNT_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "account_deactivated"})


class OpenAIProvider(Provider):
    kind = "openai"
    max_stop = 4
    native_fim = True

    def adapt_chat(self, out: dict[str, Any], dep: Deployment) -> None:
        thinking = out.pop("thinking", None)  # DeepSeek's switch: OpenAI's is reasoning_effort
        if isinstance(thinking, dict) and "reasoning_effort" not in out:
            out["reasoning_effort"] = "medium" if thinking.get("type") == "enabled" else "none"
        limit = out.pop("max_tokens", None)
        if limit is not None:
            out["max_completion_tokens"] = limit

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        try:
            obj = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            obj = {"message": body[:MAX_INPUT].decode("utf-8", "replace")}
        msg, code, param = self.error_fields(obj)
        if code in ACCOUNT_CODES:
            status = 402  # our balance at the provider: fall back, never retry, never the client's fault
        return error_from_upstream(status, msg, code, param, headers, secrets=self.secrets())


class OpenAICompatibleProvider(Provider):
    kind = "openai_compatible"
    max_stop = 16
    default_health_path = "/health"
