"""Deadlines of many objects checked by one timer: a sweep every ``tick`` seconds while any object is watched,
instead of a timer armed and cancelled per request (each measured 1-5 us under uvloop, several per request). A
deadline fires up to ``tick`` late. Used for the server's header and keep-alive deadlines (``server.py``) and the
upstream client's response-headers deadline (``providers/_h1.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Sweep(Generic[T]):
    """Watched objects -> their deadline (loop time); once it has passed the object is unwatched and
    ``due(obj, now)`` called. Watching an object again replaces its deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float, due: Callable[[T, float], None]) -> None:
        self.loop = loop
        self.tick = tick
        self._due = due
        self.watched: dict[T, float] = {}
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, obj: T, deadline: float) -> None:
        self.watched[obj] = deadline
        if self._handle is None:
            self._handle = self.loop.call_later(self.tick, self._run)

    def unwatch(self, obj: T) -> None:
        self.watched.pop(obj, None)

    def _run(self) -> None:
        self._handle = None
        now = self.loop.time()
        for obj, deadline in list(self.watched.items()):
            if now >= deadline:
                del self.watched[obj]
                self._due(obj, now)
        if self.watched:
            self._handle = self.loop.call_later(self.tick, self._run)
