"""A client leaving, noticed in one way everywhere: the ASGI ``http.disconnect`` message, awaited by one watcher
task at a time, which cancels the work it guards (the request's own task; no second task for the work).

- :func:`waiter` -- the request's disconnect signal, handed to the gateway (``wait_disconnect``) and to the SSE
  response;
- :func:`unless_gone` -- run work unless the client leaves first (``CancelledError("client disconnected")``);
- :func:`client_left` -- in an ``except CancelledError``: whether it was the client leaving (answer nobody) or a
  cancellation from outside, e.g. shutdown (let it go on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")
Gone = Callable[[], Awaitable[None]]


def waiter(receive: Receive) -> Gone:
    """Returns when the client has disconnected (the body must have been read: later messages are the disconnect)."""

    async def gone() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    return gone


async def unless_gone(work: Awaitable[T], gone: Gone) -> T:
    """``work``, run in this task, unless the client leaves first (``gone()`` returns): then it is cancelled and
    ``CancelledError("client disconnected")`` raised. A cancellation from outside stays what it is."""
    me = asyncio.current_task()
    assert me is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await gone()
        left = True
        me.cancel("client disconnected")

    watcher = asyncio.ensure_future(watch())
    try:
        result = await work
    except asyncio.CancelledError:
        if left and me.uncancel() == 0:  # ours alone
            raise asyncio.CancelledError("client disconnected") from None
        raise
    finally:
        watcher.cancel()
    if left:  # the work ended (or swallowed our cancel) as the client left: the client is gone all the same
        me.uncancel()
        raise asyncio.CancelledError("client disconnected")
    return result


def client_left() -> bool:
    """In an ``except asyncio.CancelledError``: True when the client left (this task is not being cancelled from
    outside); False for a real cancellation, which must go on."""
    task = asyncio.current_task()
    return task is None or not task.cancelling()
