"""Drains and cooldowns shared across workers and replicas through Redis, with the local state as the fast path.

- Writes go to the local state at once, and to Redis in the background (a cooldown) or awaited (a drain, so the
  operator learns whether it is shared). A failed write is kept and retried at the next refresh.
- Reads never happen on the request path: a background loop (``start``) refreshes every ``sync_interval`` seconds,
  so a worker's copy is never staler than that; a refresh is one MGET of every known drain and cooldown key. Without
  the loop (embedded use), ``poke()`` (called per routed request) refreshes at most every ``sync_interval``.
- A Redis outage never breaks routing: errors are swallowed and the local state keeps serving.

Keys (through ``Store.route_*``, all under ``<prefix>{route}:``, each with a TTL): ``drain:<provider>`` (value: the
wall time it was drained; TTL ``drain_ttl``) and ``cool:<provider>|<upstream model>`` (value: the wall time the
cooldown ends; TTL the cooldown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from therouter.errors import GatewayError
from therouter.routing.state import DepKey, RoutingState

log = logging.getLogger("therouter.routing")


class RouteStore(Protocol):
    async def route_get(self, names: list[str]) -> list[str | None]: ...

    async def route_set(self, name: str, value: str, ttl: float) -> None: ...

    async def route_delete(self, name: str) -> None: ...


def drain_name(provider: str) -> str:
    return f"drain:{provider}"


def cool_name(key: DepKey) -> str:
    return f"cool:{key[0]}|{key[1]}"


class SharedSync:
    def __init__(self, state: RoutingState, store: RouteStore, providers: Iterable[str], deployments: Iterable[DepKey],
                 wall: Callable[[], float] = time.time) -> None:
        self.state = state
        self.store = store
        self.providers = sorted(set(providers))
        self.deployments = sorted(set(deployments))
        self.wall = wall
        self._pending_drains: dict[str, bool] = {}
        self._changes: dict[str, int] = {}  # provider -> local drain changes so far (a read older than one loses)
        self._tasks: set[asyncio.Task[None]] = set()
        self._refreshing: asyncio.Task[bool] | None = None
        self._last = float("-inf")
        self._loop: asyncio.Task[None] | None = None
        state.sync = self

    # ---- writes ---------------------------------------------------------------------------------------------------

    def push_drain(self, provider: str, drained: bool) -> None:
        self._pending_drains[provider] = drained
        self._changes[provider] = self._changes.get(provider, 0) + 1
        self._spawn(self._flush_drains())

    async def flush(self) -> bool:
        """Write pending drains now; True when Redis has them all."""
        await self._flush_drains()
        return not self._pending_drains

    def push_cooldown(self, key: DepKey, seconds: float) -> None:
        until = self.wall() + seconds
        self._spawn(self._write(cool_name(key), f"{until:.3f}", seconds))

    async def clear_cooldowns(self, provider: str) -> bool:
        """Forget the provider's shared cooldowns (operator reset); False if Redis could not be told."""
        try:
            for key in self.deployments:
                if key[0] == provider:
                    await self.store.route_delete(cool_name(key))
        except (GatewayError, OSError):
            return False
        return True

    async def _flush_drains(self) -> None:
        for provider, drained in list(self._pending_drains.items()):
            name = drain_name(provider)
            try:
                if drained:
                    await self.store.route_set(name, f"{self.wall():.3f}", self.state.options.drain_ttl)
                else:
                    await self.store.route_delete(name)
            except (GatewayError, OSError) as e:
                log.warning("could not share the drain of %s (%s): it holds on this worker only for now", provider,
                            getattr(e, "message", type(e).__name__))
                return
            if self._pending_drains.get(provider) == drained:
                del self._pending_drains[provider]

    async def _write(self, name: str, value: str, ttl: float) -> None:
        try:
            await self.store.route_set(name, value, ttl)
        except (GatewayError, OSError):
            pass  # the cooldown still holds locally; other workers learn of it from their own 429s

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (unit tests of the pure parts): nothing to share with
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- reads ----------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """First read now (a new worker must not route on an empty view), then refresh every ``sync_interval``."""
        await self.refresh()
        self._loop = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.state.options.sync_interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("routing state refresh failed")

    def poke(self) -> None:
        """Refresh in the background if the local copy is older than ``sync_interval`` (no-op under ``start``)."""
        if self._loop is not None and not self._loop.done():
            return
        now = self.state.clock()
        if now - self._last < self.state.options.sync_interval:
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        self._last = now
        try:
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
        except RuntimeError:
            self._refreshing = None

    async def refresh(self) -> bool:
        """One round trip: pending drains written, then every shared drain and cooldown read. False if Redis failed."""
        self._last = self.state.clock()
        if self._pending_drains:
            await self._flush_drains()
        names = [drain_name(p) for p in self.providers] + [cool_name(k) for k in self.deployments]
        if not names:
            return True
        seen = dict(self._changes)
        try:
            values = await self.store.route_get(names)
        except (GatewayError, OSError):
            return False
        self._apply(values, seen)
        return True

    def _apply(self, values: list[str | None], seen: dict[str, int]) -> None:
        n = len(self.providers)
        for provider, v in zip(self.providers, values[:n]):
            if provider in self._pending_drains or self._changes.get(provider, 0) != seen.get(provider, 0):
                continue  # our own change wins until it is written, and over a read that started before it
            self.state.set_drained(provider, v is not None, share=False)
        now = self.wall()
        for key, v in zip(self.deployments, values[n:]):
            if v is None:
                continue
            try:
                left = float(v) - now
            except ValueError:
                continue
            if left > 0:
                self.state.set_cooldown(key, left, share=False)

    async def aclose(self) -> None:
        tasks = list(self._tasks) + [t for t in (self._refreshing, self._loop) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
