"""The attempt loop: try candidates in order, retry or fall back on provider faults, stop on the client's own errors.

What happens after a failed attempt is decided by data on the error:

- ``fallback_ok`` false (the request's own fault, e.g. an upstream 400): returned to the client at once;
- ``fallback_ok``: the next candidate is tried; ``Retry-After`` puts the failed deployment in cooldown;
- ``retryable``: once every candidate has been tried, the same deployment may be tried again after a jittered
  exponential backoff (or its ``Retry-After``, if no longer than ``retry_after_cap``), if the retry budget, the
  attempt limit and the request deadline allow.

Each attempt holds an in-flight slot on its deployment (a :class:`Lease`, handed to the caller on success so a stream
keeps it until it ends), feeds the deployment's breaker, and is recorded on the call for the generation record.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from therouter.errors import (
    GatewayError,
    NoDeploymentAvailable,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRequestRejected,
    UpstreamTimeout,
)
from therouter.routing.budget import RetryBudget, retry_delay
from therouter.routing.router import Candidate, Router, Skip
from therouter.routing.state import Lease

log = logging.getLogger("therouter.routing")
T = TypeVar("T")


class HasAttempts(Protocol):
    attempts: list[dict[str, Any]]
    skipped: list[Skip]


class Exhausted(Exception):
    """Every candidate of one model was tried (or could not be): the caller may try another model."""

    def __init__(self, errors: list[tuple[Candidate, GatewayError]]) -> None:
        super().__init__("all candidates failed")
        self.errors = errors


@dataclass
class AttemptPolicy:
    router: Router
    # called after every attempt with (candidate, error or None, seconds)
    observers: list[Callable[[Candidate, GatewayError | None, float], None]] = field(default_factory=list)
    on_retry: Callable[[Candidate], None] | None = None
    on_failover: Callable[[Candidate, Candidate], None] | None = None  # (failed first, served)
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @property
    def budget(self) -> RetryBudget:
        return self.router.state.budget

    async def run(
        self,
        call: HasAttempts,
        cands: list[Candidate],
        attempt: Callable[[Candidate], Awaitable[T]],
        deadline: float,
        clock: Callable[[], float],
        cancel_on: Callable[[], Awaitable[None]] | None = None,
        stream: bool = False,
    ) -> tuple[Candidate, T, Lease]:
        state, opts = self.router.state, self.router.state.options
        errors: list[tuple[Candidate, GatewayError]] = []
        queue = list(cands)
        retry_q: list[Candidate] = []
        last_err: dict[tuple[str, str], GatewayError] = {}
        tries: dict[tuple[str, str], int] = {}
        n = 0
        while n < opts.max_attempts and clock() < deadline:
            retry = False
            if queue:
                cand = queue.pop(0)
            else:
                picked = self._pick_retry(call, retry_q, last_err, tries, deadline, clock)
                if picked is None:
                    break
                cand, delay = picked
                if not self.budget.try_retry():
                    call.skipped.append(Skip(cand.name, "retry budget exhausted", cand.model_id))
                    break
                retry = True
            try:
                if retry:
                    await self.sleep(delay)
                    why = self.router.available(cand)
                    if why:
                        call.skipped.append(Skip(cand.name, why, cand.model_id))
                        continue
                grant: Literal["go", "probe", "forced"] | None = state.breaker(cand.key).acquire()
                if grant is None and cand.forced:
                    grant = "forced"  # the last usable deployment: sent although its circuit is open
                if grant is None:  # the circuit opened (or its probe was taken) while this request was routed
                    why = self.router.available(cand) or "circuit open"
                    call.skipped.append(Skip(cand.name, why, cand.model_id))
                    continue
                probe = grant == "probe"
                n += 1
                tries[cand.key] = tries.get(cand.key, 0) + 1
                if retry and self.on_retry:
                    self.on_retry(cand)
                lease = state.begin(cand.key, probe)
                t0 = clock()
                streamed = stream or cand.provider.config.assembles  # sent upstream as a stream
                try:
                    # a client that leaves cancels the attempt: always for streamed answers (nothing will read them;
                    # a non-stream one is assembled from a stream), and for passthrough answers on providers whose
                    # policy is `cancel` (self-hosted by default)
                    if cancel_on is not None and (streamed or cand.provider.config.disconnect_policy == "cancel"):
                        result = await unless_gone(attempt(cand), cancel_on)
                    else:
                        result = await attempt(cand)
                except GatewayError as e:
                    lease.close()
                    self._failed(call, cand, e, clock() - t0, probe, retry, streamed)
                    if not e.fallback_ok:
                        raise
                    errors.append((cand, e))
                    last_err[cand.key] = e
                    if e.retryable:
                        retry_q.append(cand)
                    continue
                except BaseException:
                    lease.close()
                    if probe:
                        state.breaker(cand.key).release_probe()
                    call.attempts.append(_record(cand, None, clock() - t0, probe, retry, outcome="cancelled"))
                    raise
            finally:
                if retry:
                    self.budget.retry_done()
            dt = clock() - t0
            state.breaker(cand.key).success(probe or grant == "forced")  # a forced success is evidence too
            state.observe(cand.key, True, dt, streamed)  # a streamed attempt's dt is its time to first chunk
            call.attempts.append(_record(cand, None, dt, probe, retry))
            self._observe(cand, None, dt)
            if errors and self.on_failover and errors[0][0].key != cand.key:
                self.on_failover(errors[0][0], cand)
            return cand, result, lease
        raise Exhausted(errors)

    def _pick_retry(self, call: HasAttempts, retry_q: list[Candidate], last_err: dict[Any, GatewayError],
                    tries: dict[Any, int], deadline: float,
                    clock: Callable[[], float]) -> tuple[Candidate, float] | None:
        opts = self.router.state.options
        while retry_q:
            cand = retry_q.pop(0)
            err = last_err[cand.key]
            delay = retry_delay(err, tries[cand.key] - 1, opts.backoff_base, opts.backoff_max,
                                opts.retry_after_cap, self.rng)
            if delay is None:
                if err.retry_after:
                    call.skipped.append(Skip(cand.name, f"Retry-After {err.retry_after:.0f}s is beyond the "
                                                        f"{opts.retry_after_cap:.0f}s cap", cand.model_id))
                continue
            cooldown = self.router.state.cooldown_left(cand.key)
            if cooldown > opts.retry_after_cap:
                continue
            delay = max(delay, cooldown)
            if clock() + delay >= deadline:
                call.skipped.append(Skip(cand.name, "no time left for a retry before the deadline", cand.model_id))
                continue
            return cand, delay
        return None

    def _failed(self, call: HasAttempts, cand: Candidate, e: GatewayError, dt: float, probe: bool, retry: bool,
                stream: bool) -> None:
        state = self.router.state
        call.attempts.append(_record(cand, e, dt, probe, retry))
        # the full text for the operator (secrets already redacted); the client only ever sees e.message
        log.log(logging.WARNING if e.fallback_ok else logging.INFO, "attempt on %s (%s) failed: %s: %s",
                cand.name, cand.dep.model, e.code, e.detail or e.message)
        self._observe(cand, e, dt)
        b = state.breaker(cand.key)
        if isinstance(e, (UpstreamRateLimited, UpstreamRequestRejected)):
            b.success(probe)  # the host answered: alive (a rate limit is handled by the cooldown below)
        elif e.fallback_ok:
            b.failure(probe, e.code or "upstream error")
        elif probe:
            b.release_probe()
        if e.fallback_ok:
            state.observe(cand.key, False, dt, stream, f"{e.code}: {e.message}")
        if e.retry_after and e.fallback_ok:
            state.set_cooldown(cand.key, e.retry_after)
        if isinstance(e, UpstreamAuthError):
            log.error("provider %s refused our credentials or account (%s): check its API key and balance; "
                      "requests fall back meanwhile", cand.name, e.message)

    def _observe(self, cand: Candidate, err: GatewayError | None, dt: float) -> None:
        for obs in self.observers:
            obs(cand, err, dt)


async def unless_gone(work: Awaitable[T], gone: Callable[[], Awaitable[None]]) -> T:
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


def _record(cand: Candidate, err: GatewayError | None, dt: float, probe: bool, retry: bool,
            outcome: str | None = None) -> dict[str, Any]:
    a: dict[str, Any] = {"provider": cand.name, "model": cand.dep.model, "model_id": cand.model_id,
                         "latency_ms": int(dt * 1000)}
    if err is None:
        a["outcome"] = outcome or "ok"
    else:
        a["outcome"] = "error"
        a["status"] = err.status
        a["code"] = err.code
        a["error"] = (err.detail or err.message)[:2000]  # the upstream's full text (secrets redacted)
        if isinstance(err, UpstreamError) and err.sent:
            a["possibly_accepted"] = True
    if retry:
        a["retry"] = True
    if probe:
        a["probe"] = True
    return a


def all_failed(errors: list[tuple[Candidate, GatewayError]], skipped: list[Skip], model: str = "") -> GatewayError:
    """The client's answer when nothing served: which deployments were tried and why they failed (or were skipped)."""
    seen: set[tuple[str, str]] = set()
    notes = []
    for s in skipped:
        if (s.provider, s.reason) not in seen:
            seen.add((s.provider, s.reason))
            notes.append(f"{s.provider}: {s.reason}")
    skipped_txt = f" Skipped: {'; '.join(notes)}." if notes else ""
    if not errors:
        what = f"of `{model}` " if model else ""
        err = NoDeploymentAvailable(f"No deployment {what}is available.{skipped_txt}")
        waits = [s.retry_in for s in skipped if s.retry_in]
        err.retry_after = max(min(waits), 1.0) if waits else 1.0
        return err
    # only each error's message: our own words (or a sanitised 4xx), never an upstream's raw text (that is detail)
    tried = "; ".join(f"{c.name}: {e.code} ({e.message[:160]})" for c, e in errors)
    msg = f"All deployments failed. Tried: {tried}.{skipped_txt}"
    if all(isinstance(e, UpstreamTimeout) for _, e in errors):
        return UpstreamTimeout(msg, code="all_deployments_timed_out")
    if all(isinstance(e, (UpstreamRateLimited, UpstreamAuthError)) for _, e in errors):
        waits = [e.retry_after for _, e in errors if e.retry_after]
        err = NoDeploymentAvailable(msg, code="all_deployments_unavailable")
        err.retry_after = min(waits) if waits else 1
        return err
    return UpstreamError(msg, code="all_deployments_failed")
