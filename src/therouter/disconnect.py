"""A client leaving, noticed in one way everywhere: it cancels the work it guards (the request's own task; no
second task for the work), from one of two sources:

- :func:`waiter` -- the ASGI ``http.disconnect`` message, awaited by one watcher task at a time (any ASGI server);
- :class:`Signal` -- the server's own notice: our protocol (``server.py``) gives one to a completion request
  (``api.hints``) and fires it when the connection is lost; the guarded work subscribes a callback, no watcher
  task at all (two tasks less per stream, one per JSON answer).

:func:`unless_gone` runs work unless the client leaves first (``CancelledError("client disconnected")``);
:func:`client_left`, in an ``except CancelledError``, tells the client leaving (answer nobody) from a cancellation
from outside, e.g. shutdown (let it go on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class Signal:
    """The connection of one request lost: fired once by the server, callbacks run then (or at once if it was)."""

    __slots__ = ("_callbacks", "fired")

    def __init__(self) -> None:
        self.fired = False
        self._callbacks: list[Callable[[], None]] = []

    def subscribe(self, fn: Callable[[], None]) -> None:
        if self.fired:
            fn()
        else:
            self._callbacks.append(fn)

    def unsubscribe(self, fn: Callable[[], None]) -> None:
        if fn in self._callbacks:
            self._callbacks.remove(fn)

    def fire(self) -> None:
        if self.fired:
            return
        self.fired = True
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()


Gone = Callable[[], Awaitable[None]] | Signal


def waiter(receive: Receive) -> Callable[[], Awaitable[None]]:
    """Returns when the client has disconnected (the body must have been read: later messages are the disconnect)."""

    async def gone() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    return gone


async def unless_gone(work: Awaitable[T], gone: Gone) -> T:
    """``work``, run in this task, unless the client leaves first (``gone`` fires or returns): then it is cancelled and
    ``CancelledError("client disconnected")`` raised. A cancellation from outside stays what it is."""
    me = asyncio.current_task()
    assert me is not None
    left = False

    def leave() -> None:
        nonlocal left
        if not left:
            left = True
            me.cancel("client disconnected")

    signal, watcher = None, None
    if isinstance(gone, Signal):
        signal = gone
        signal.subscribe(leave)
    else:
        watcher = asyncio.ensure_future(_watch(gone, leave))
    try:
        result = await work
    except asyncio.CancelledError:
        if left and me.uncancel() == 0:  # ours alone
            raise asyncio.CancelledError("client disconnected") from None
        raise
    finally:
        if signal is not None:
            signal.unsubscribe(leave)
        if watcher is not None:
            watcher.cancel()
    if left:  # the work ended (or swallowed our cancel) as the client left: the client is gone all the same
        me.uncancel()
        raise asyncio.CancelledError("client disconnected")
    return result


async def _watch(gone: Callable[[], Awaitable[None]], then: Callable[[], None]) -> None:
    await gone()
    then()


def client_left() -> bool:
    """In an ``except asyncio.CancelledError``: True when the client left (this task is not being cancelled from
    outside); False for a real cancellation, which must go on."""
    task = asyncio.current_task()
    return task is None or not task.cancelling()
