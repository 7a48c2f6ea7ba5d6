"""OpenAI itself, or any server that speaks its API exactly."""

from __future__ import annotations

from therouter.providers.base import Provider


class OpenAIProvider(Provider):
    kind = "openai"
    max_stop = 4
    native_fim = True
