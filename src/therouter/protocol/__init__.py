"""OpenAI wire models (pydantic only). Names follow OpenAI's spec; unknown fields are allowed and passed on."""

from therouter.protocol.chat import ChatCompletionRequest, ChatMessage
from therouter.protocol.completions import CompletionRequest

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest"]
