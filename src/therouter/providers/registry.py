"""kind -> adapter class. Routing order and provider choice are config data, never code."""

from __future__ import annotations

from therouter.config import ProviderConfig
from therouter.providers._http import Transport
from therouter.providers.anthropic import AnthropicProvider
from therouter.providers.base import Provider
from therouter.providers.deepseek import DeepSeekProvider
from therouter.providers.openai import OpenAICompatibleProvider, OpenAIProvider
from therouter.providers.sglang import SGLangProvider
from therouter.providers.vllm import VLLMProvider

ADAPTERS: dict[str, type[Provider]] = {
    "deepseek": DeepSeekProvider,
    "vllm": VLLMProvider,
    "sglang": SGLangProvider,
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "openai_compatible": OpenAICompatibleProvider,
}


def build_provider(name: str, config: ProviderConfig, transport: Transport) -> Provider:
    return ADAPTERS[config.kind](name, config, transport)
