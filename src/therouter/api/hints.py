"""What our server (``server.py``) tells a completion route about its request's connection, as one ASGI scope
extension (``scope["extensions"][HINTS]``), so the route can skip work that cannot matter: a watcher task for the
disconnect (``gone``, fired by the server), the body deadline's timer when the body is all in, a write timeout's
timer while writes are not paused, ASGI's two messages for a whole JSON answer. Under any other ASGI server (or in
process) there are no hints and the route does everything the ASGI way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from starlette.types import Scope

from therouter.disconnect import Signal

HINTS = "therouter.hints"


class Hints(Protocol):
    gone: Signal  # fired when the connection is lost before the answer is complete

    def body_complete(self) -> bool:
        """The whole request body has arrived (reading it cannot wait)."""
        ...

    def write_ready(self) -> bool:
        """Writes are not paused (a send cannot wait)."""
        ...

    def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> bool:
        """A whole answer (headers as text, no content-length) written at once; False, having done nothing, when it
        cannot be now (the caller sends it the ASGI way)."""
        ...


def hints_of(scope: Scope) -> Hints | None:
    ext = scope.get("extensions")
    return ext.get(HINTS) if ext else None
