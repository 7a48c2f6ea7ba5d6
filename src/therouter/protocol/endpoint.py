"""Which OpenAI endpoint a request is for: everything that differs between chat and legacy completions, in one
object (never an ``endpoint == "chat"`` string check)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: Literal["chat", "completions"]  # also the request validator's kind (validate.check)
    object: str  # a non-stream answer's `object`
    chunk_object: str  # a stream chunk's `object`
    id_prefix: str
    chat: bool  # messages in, message / delta out; else prompt in, text out (and `suffix` means FIM)

    def new_id(self) -> str:
        return self.id_prefix + os.urandom(16).hex()  # (uuid4 costs more, for the same 32 hex digits)


CHAT = Endpoint("chat", "chat.completion", "chat.completion.chunk", "chatcmpl-", chat=True)
COMPLETIONS = Endpoint("completions", "text_completion", "text_completion", "cmpl-", chat=False)
ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (CHAT, COMPLETIONS)}


def endpoint(name: str) -> Endpoint:
    """The endpoint of a name the api layer uses ("chat" | "completions")."""
    return ENDPOINTS[name]
