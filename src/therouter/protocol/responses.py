"""What the gateway itself writes back, as typed models serialised by orjson (plain dataclasses: the hot path cannot
pay for pydantic). Upstream answers pass through as they are, with only our fields set (:func:`stamp`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class ErrorObject:
    message: str
    type: str
    param: str | None
    code: str | None


@dataclass(slots=True)
class ErrorResponse:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``."""

    error: ErrorObject

    def to_json(self) -> bytes:
        return orjson.dumps(self)


@dataclass(slots=True, kw_only=True)
class Identity:
    """The fields the gateway owns in every answer and chunk: our generation id, the endpoint's ``object``, the
    request's ``created``, the public model and the provider's config name (declared in OpenAI's wire order)."""

    id: str
    object: str
    created: int
    model: str
    provider: str


@dataclass(slots=True, kw_only=True)
class ChatCompletionChunk(Identity):
    """A chunk the gateway writes itself: the final usage chunk (``choices: []``), OpenAI's way (orjson writes the
    fields in declaration order: the identity, then these)."""

    choices: list[Any]
    usage: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(self)


@dataclass(slots=True, kw_only=True)
class ChatCompletion(Identity):
    """A non-stream answer (chat.completion or text_completion): the upstream's body with our identity and usage.
    Fields the upstream added and we do not know pass through (``extra``). Built by keyword only; :meth:`to_json`
    writes the fields in OpenAI's order, not the declaration order."""

    choices: list[Any]
    usage: dict[str, Any]
    extra: dict[str, Any]

    @classmethod
    def from_upstream(cls, obj: dict[str, Any], who: Identity, usage: dict[str, Any]) -> ChatCompletion:
        known = ("id", "object", "created", "model", "provider", "choices", "usage")
        created = obj.get("created")
        return cls(id=who.id, object=str(obj.get("object") or who.object),
                   created=created if isinstance(created, int) else who.created, model=who.model,
                   provider=who.provider, choices=obj.get("choices") or [], usage=usage,
                   extra={k: v for k, v in obj.items() if k not in known})

    def to_json(self) -> bytes:
        out: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                               "provider": self.provider, "choices": self.choices}
        out.update(self.extra)
        out["usage"] = self.usage
        return orjson.dumps(out)
