"""The Lua scripts of the metering package, read from the ``.lua`` files beside this module and registered once.

``admit``, ``settle`` and ``release`` share the helpers of ``common.lua`` (prepended). Registered scripts run with
EVALSHA; redis-py reloads a script itself after a ``NOSCRIPT`` (e.g. after a Redis restart) -- safe, since a
``NOSCRIPT`` reply means the script did not run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from therouter.errors import StoreUnavailable
from therouter.store import Store

# a queued call: script name, keys, args, extra commands, and where its reply goes: the future of a run_with caller
# (an error reply as the exception `Store.reply_error` makes of it), or an enqueue caller's callback (the reply, an
# error reply or the round trip's failure as it is)
_Queued = tuple[str, Sequence[str], Sequence[str | int], Callable[[Any], None] | None,
                "asyncio.Future[Any] | Callable[[Any], None]"]

_WITH_COMMON = ("admit", "settle", "release")
_PLAIN = ("price_set", "rebuild", "reap")


def _text(name: str) -> str:
    return resources.files("therouter.metering").joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    def __init__(self, store: Store) -> None:
        self._store = store
        common = _text("common")
        self._scripts: dict[str, Any] = {}
        self._queue: list[_Queued] = []  # calls waiting for the next round trip (a single node): the outbox
        self.flusher: asyncio.Task[None] | None = None  # the task sending the outbox, while there is one
        for name in _WITH_COMMON:
            self._scripts[name] = store.redis.register_script(common + "\n" + _text(name))
        for name in _PLAIN:
            self._scripts[name] = store.redis.register_script(_text(name))

    async def run(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """One script call under the store's breaker (failures become ``StoreUnavailable``)."""
        script = self._scripts[name]
        return await self._store.call(lambda: script(keys=list(keys), args=list(args)))

    async def run_with(self, name: str, keys: Sequence[str], args: Sequence[str | int],
                       extra: Callable[[Any], None] | None = None) -> Any:
        """The script and a few more (idempotent) commands, added by ``extra(pipeline)`` (if any), in one round trip.
        On a single node the calls made while a batch is in Redis go together in the next one (group commit: one
        pipeline for many admissions); each caller gets its own reply or error, as if it had gone alone."""
        script = self._scripts[name]
        if self._store.cluster:
            if extra is None:
                return await self._store.call(lambda: script(keys=list(keys), args=list(args)))
            return await self._store.call(lambda: self._store.script_with(script, keys, args, extra))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put((name, keys, args, extra, done))
        return await done

    def enqueue(self, name: str, keys: Sequence[str], args: Sequence[str | int],
                deliver: Callable[[Any], None]) -> None:
        """A script call for the next round trip (a single node), with the other calls queued meanwhile -- admissions
        and settlements alike: ``deliver`` gets, once, its reply, its error reply (a ``ResponseError``), or the
        exception that failed the round trip (``StoreUnavailable``, or what else was raised); it must not raise."""
        self._put((name, keys, args, None, deliver))

    def _put(self, q: _Queued) -> None:
        self._queue.append(q)
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush(), name="scripts-batch")

    async def _flush(self) -> None:
        try:
            while self._queue:
                queued, self._queue = self._queue, []
                if all(q[3] is None for q in queued):  # the scripts alone: one round trip for all of them
                    await self._send(queued)
                    continue
                for name in {q[0] for q in queued}:  # (a call with extras: a round trip per script)
                    await self._send([q for q in queued if q[0] == name])
        finally:
            self.flusher = None

    async def _send(self, batch: list[_Queued]) -> None:
        store = self._store
        try:
            if all(q[3] is None for q in batch):  # (the scripts alone: each one's reply is its only one)
                calls = [(self._scripts[name], keys, args) for name, keys, args, _, _ in batch]
                replies = await store.call(lambda: store.scripts_many(calls))
            else:
                script = self._scripts[batch[0][0]]
                items = [(keys, args, extra) for _, keys, args, extra, _ in batch]
                replies = await store.call(lambda: store.script_with_many(script, items))
        except BaseException as e:
            for *_, to in batch:  # each caller its own exception object
                _deliver(to, StoreUnavailable(e.message, retry_after=e.retry_after)
                         if isinstance(e, StoreUnavailable) else e if isinstance(e, Exception)
                         else StoreUnavailable("the store call was interrupted", retry_after=2), store)
            if not isinstance(e, Exception):
                raise
            return
        for (*_, to), reply in zip(batch, replies):
            _deliver(to, reply, store)

    async def run_many(self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[str | int]]]) -> list[Any]:
        """The script once per ``(keys, args)``, in one round trip (a single node; see ``Store.script_many``): one
        reply per call, an error reply as its exception. A failure of the round trip raises ``StoreUnavailable``."""
        script = self._scripts[name]
        return await self._store.call(lambda: self._store.script_many(script, calls))


def _deliver(to: asyncio.Future[Any] | Callable[[Any], None], reply: Any, store: Store) -> None:
    if not isinstance(to, asyncio.Future):
        to(reply)
    elif to.done():  # its caller has gone (cancelled)
        pass
    elif isinstance(reply, Exception):
        to.set_exception(store.reply_error(reply))
    else:
        to.set_result(reply)
