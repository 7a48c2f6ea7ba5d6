"""Request accounting for ``/_fake/stats``."""

from __future__ import annotations

from collections import deque
from typing import Any

LOG_SIZE = 200


class Stats:
    """Counters and a ring buffer of the last :data:`LOG_SIZE` generation attempts.

    ``requests`` counts generation attempts (chat/completions); ``by_path`` counts every
    request by raw path except the ``/_fake/*`` admin endpoints.
    """

    __slots__ = ("by_path", "in_flight", "log", "requests")

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests = 0
        self.by_path: dict[str, int] = {}
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)

    def reset(self) -> None:
        """Clear counters and the log (``in_flight`` is live state and is kept)."""
        self.requests = 0
        self.by_path = {}
        self.log.clear()

    def count_path(self, path: str) -> None:
        self.by_path[path] = self.by_path.get(path, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "by_path": dict(self.by_path),
            "log": list(self.log),
        }
