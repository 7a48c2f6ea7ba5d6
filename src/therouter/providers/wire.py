"""A client request in a provider's own wire format (pure data).

/v1/messages receives Anthropic's Messages request; the gateway routes, limits and meters its OpenAI translation,
and hands a deployment that speaks Messages itself (``Provider.speaks == "anthropic"``) the client's own body through
:meth:`Provider.native_request`, so nothing the translation cannot carry is lost on the way up (``cache_control``,
thinking signatures, ``document`` blocks, server tools) -- nor on the way back (:mod:`therouter.native`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# the client's protocol headers a provider of that wire format may be given (never its key, never anything else)
FORWARDED_HEADERS: dict[str, frozenset[str]] = {"anthropic": frozenset({"anthropic-version", "anthropic-beta"})}


@dataclass(frozen=True, slots=True)
class NativeRequest:
    wire: str  # the wire format: "anthropic"
    body: dict[str, Any]  # as the client sent it
    model: str  # the model id the client sent: the native answer's `model`
    headers: dict[str, str] = field(default_factory=dict)  # of FORWARDED_HEADERS[wire] only
    # what only a deployment speaking `wire` can serve (e.g. "document blocks"): the translation leaves it out, so
    # no other deployment may take the request (a 400 naming these when none is left)
    native_only: tuple[str, ...] = ()

    @classmethod
    def of(cls, wire: str, body: dict[str, Any], model: str, headers: Any = None,
           native_only: tuple[str, ...] = ()) -> NativeRequest:
        """``headers``: any mapping of the client's request headers; only the forwardable ones are kept."""
        allowed = FORWARDED_HEADERS.get(wire, frozenset())
        kept = {k.lower(): str(v) for k, v in (headers or {}).items() if k.lower() in allowed}
        return cls(wire, body, model, kept, native_only)
