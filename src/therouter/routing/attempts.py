"""The attempt loop: try candidates in order, fall back on provider faults, stop on the client's own errors.

Whether an error allows another try is data on the error (``fallback_ok``); this loop only reads it. Every attempt is
recorded (provider, outcome, latency, status) on the call for the generation record.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from therouter.errors import (
    GatewayError,
    NoDeploymentAvailable,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from therouter.routing.router import Candidate

log = logging.getLogger("therouter.routing")
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected from a non-stream request whose provider policy is `cancel`."""


class HasAttempts(Protocol):
    attempts: list[dict[str, Any]]


@dataclass
class AttemptPolicy:
    max_attempts: int = 3
    # observers: called after every attempt with (candidate, error or None, seconds)
    observers: list[Callable[[Candidate, GatewayError | None, float], None]] = field(default_factory=list)

    async def run(
        self,
        call: HasAttempts,
        cands: list[Candidate],
        attempt: Callable[[Candidate], Awaitable[T]],
        deadline: float,
        clock: Callable[[], float],
        cancel_on: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[Candidate, T]:
        errors: list[tuple[Candidate, GatewayError]] = []
        for cand in cands[: self.max_attempts]:
            if clock() >= deadline:
                break
            t0 = clock()
            try:
                if cancel_on is not None and cand.provider.config.disconnect_policy == "cancel":
                    result = await _unless_gone(attempt(cand), cancel_on)
                else:
                    result = await attempt(cand)
            except GatewayError as e:
                dt = clock() - t0
                call.attempts.append(_attempt(cand, e, dt))
                self._observe(cand, e, dt)
                if isinstance(e, UpstreamAuthError):
                    log.error("provider %s refused our credentials or account: check its API key and balance",
                              cand.name)
                if not e.fallback_ok:
                    raise
                errors.append((cand, e))
                continue
            dt = clock() - t0
            call.attempts.append(_attempt(cand, None, dt))
            self._observe(cand, None, dt)
            return cand, result
        raise all_failed(errors)

    def _observe(self, cand: Candidate, err: GatewayError | None, dt: float) -> None:
        for obs in self.observers:
            obs(cand, err, dt)


async def _unless_gone(work: Awaitable[T], gone: Callable[[], Awaitable[None]]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _attempt(cand: Candidate, err: GatewayError | None, dt: float) -> dict[str, Any]:
    a: dict[str, Any] = {"provider": cand.name, "model": cand.dep.model, "latency_ms": int(dt * 1000)}
    if err is None:
        a["outcome"] = "ok"
    else:
        a["outcome"] = "error"
        a["status"] = err.status
        a["code"] = err.code
        a["error"] = err.message[:300]
        if isinstance(err, UpstreamError) and err.sent:
            a["possibly_accepted"] = True
    return a


def all_failed(errors: list[tuple[Candidate, GatewayError]]) -> GatewayError:
    if not errors:
        return NoDeploymentAvailable("No deployment could be tried before the request deadline.")
    tried = "; ".join(f"{c.name}: {e.code} ({e.message[:120]})" for c, e in errors)
    msg = f"All deployments failed. Tried: {tried}"
    if all(isinstance(e, UpstreamTimeout) for _, e in errors):
        return UpstreamTimeout(msg, code="all_deployments_timed_out")
    if all(isinstance(e, (UpstreamRateLimited, UpstreamAuthError)) for _, e in errors):
        waits = [e.retry_after for _, e in errors if e.retry_after]
        err = NoDeploymentAvailable(msg, code="all_deployments_unavailable")
        err.retry_after = min(waits) if waits else 1
        return err
    return UpstreamError(msg, code="all_deployments_failed")
