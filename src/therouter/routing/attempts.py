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
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from therouter.disconnect import Gone, unless_gone
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
from therouter.routing.router import Candidate, Router, Skip, SkipKind
from therouter.routing.state import Lease

log = logging.getLogger("therouter.routing")
T = TypeVar("T")


class AttemptOutcome(enum.Enum):
    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"  # the client left (or the request was cancelled) while the attempt ran


@dataclass(slots=True)
class Attempt:
    """One upstream attempt, as the generation record keeps it (:meth:`to_dict`)."""

    provider: str
    model: str  # the upstream's model id
    model_id: str  # ours
    latency_ms: int
    outcome: AttemptOutcome
    status: int | None = None
    code: str | None = None
    error: str | None = None  # the upstream's full text (secrets redacted), for the operator
    possibly_accepted: bool = False  # the request may have reached the provider (it may bill us)
    retry: bool = False
    probe: bool = False
    stream_error: dict[str, Any] | None = None  # the serving attempt passed the gate, then broke

    def to_dict(self) -> dict[str, Any]:
        a: dict[str, Any] = {"provider": self.provider, "model": self.model, "model_id": self.model_id,
                             "latency_ms": self.latency_ms, "outcome": self.outcome.value}
        if self.outcome is AttemptOutcome.ERROR:
            a.update(status=self.status, code=self.code, error=self.error)
        if self.possibly_accepted:
            a["possibly_accepted"] = True
        if self.retry:
            a["retry"] = True
        if self.probe:
            a["probe"] = True
        if self.stream_error is not None:
            a["stream_error"] = self.stream_error
        return a

    @classmethod
    def of(cls, cand: Candidate, err: GatewayError | None, dt: float, probe: bool, retry: bool,
           outcome: AttemptOutcome | None = None) -> Attempt:
        a = cls(cand.name, cand.dep.model, cand.model_id, int(dt * 1000), outcome or AttemptOutcome.OK,
                retry=retry, probe=probe)
        if err is not None:
            a.outcome, a.status, a.code = AttemptOutcome.ERROR, err.status, err.code
            a.error = (err.detail or err.message)[:2000]
            a.possibly_accepted = isinstance(err, UpstreamError) and err.sent
        return a


class HasAttempts(Protocol):
    attempts: list[Attempt]
    skipped: list[Skip]


class Exhausted(Exception):
    """Every candidate of one model was tried (or could not be): the caller may try another model."""

    def __init__(self, errors: list[tuple[Candidate, GatewayError]]) -> None:
        super().__init__("all candidates failed")
        self.errors = errors


@dataclass(slots=True)
class _Plan:
    """One model's attempts in progress: who is next, who may be retried, what failed."""

    queue: list[Candidate]
    retry_q: list[Candidate] = field(default_factory=list)
    last_err: dict[tuple[str, str], GatewayError] = field(default_factory=dict)
    tries: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: list[tuple[Candidate, GatewayError]] = field(default_factory=list)
    sent: int = 0  # attempts made (max_attempts counts them)


@dataclass(slots=True)
class _Pick:
    cand: Candidate
    delay: float | None = None  # a retry of a failed deployment, after this backoff; None: its first try

    @property
    def retry(self) -> bool:
        return self.delay is not None


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
        cancel_on: Gone | None = None,
        stream: bool = False,
    ) -> tuple[Candidate, T, Lease]:
        """Pick the next candidate, try it, record how it went; until one serves (returned with its result and its
        in-flight lease) or none is left (:class:`Exhausted`). A failure that does not allow fallback is raised."""
        plan = _Plan(list(cands))
        while plan.sent < self.router.state.options.max_attempts and clock() < deadline:
            pick = self._pick(call, plan, deadline, clock)
            if pick is None:
                break
            try:
                served = await self._try(call, plan, pick, attempt, clock, cancel_on, stream)
            finally:
                if pick.retry:
                    self.budget.retry_done()
            if served is not None:
                return served
        raise Exhausted(plan.errors)

    # ---- pick ---------------------------------------------------------------------------------------------------

    def _pick(self, call: HasAttempts, plan: _Plan, deadline: float, clock: Callable[[], float]) -> _Pick | None:
        """The next candidate: the untried ones in order, then a retry of a retryable failure (if the retry budget
        allows one). None: nothing is left to try."""
        if plan.queue:
            return _Pick(plan.queue.pop(0))
        picked = self._pick_retry(call, plan, deadline, clock)
        if picked is None:
            return None
        if not self.budget.try_retry():
            call.skipped.append(Skip(picked.cand.name, "retry budget exhausted", picked.cand.model_id,
                                     kind=SkipKind.RETRY_BUDGET))
            return None
        return picked

    def _pick_retry(self, call: HasAttempts, plan: _Plan, deadline: float,
                    clock: Callable[[], float]) -> _Pick | None:
        opts = self.router.state.options
        while plan.retry_q:
            cand = plan.retry_q.pop(0)
            err = plan.last_err[cand.key]
            delay = retry_delay(err, plan.tries[cand.key] - 1, opts.backoff_base, opts.backoff_max,
                                opts.retry_after_cap, self.rng)
            if delay is None:
                if err.retry_after:
                    call.skipped.append(Skip(cand.name, f"Retry-After {err.retry_after:.0f}s is beyond the "
                                                        f"{opts.retry_after_cap:.0f}s cap", cand.model_id,
                                             kind=SkipKind.RETRY_AFTER_CAP))
                continue
            cooldown = self.router.state.cooldown_left(cand.key)
            if cooldown > opts.retry_after_cap:
                continue
            delay = max(delay, cooldown)
            if clock() + delay >= deadline:
                call.skipped.append(Skip(cand.name, "no time left for a retry before the deadline", cand.model_id,
                                         kind=SkipKind.NO_TIME))
                continue
            return _Pick(cand, delay)
        return None

    def _grant(self, call: HasAttempts, pick: _Pick) -> str | None:
        """The deployment's breaker lets the attempt through ("go", "probe", or "forced": the last usable deployment
        sent although its circuit is open), or the skip is recorded and None returned."""
        cand = pick.cand
        if pick.retry:
            skip = self.router.available(cand)
            if skip is not None:
                call.skipped.append(skip)
                return None
        grant: str | None = self.router.state.breaker(cand.key).acquire()
        if grant is None and cand.forced:
            grant = "forced"
        if grant is None:  # the circuit opened (or its probe was taken) while this request was routed
            call.skipped.append(self.router.available(cand) or Skip(cand.name, "circuit open", cand.model_id,
                                                                    kind=SkipKind.CIRCUIT))
        return grant

    # ---- try ----------------------------------------------------------------------------------------------------

    async def _try(self, call: HasAttempts, plan: _Plan, pick: _Pick, attempt: Callable[[Candidate], Awaitable[T]],
                   clock: Callable[[], float], cancel_on: Gone | None,
                   stream: bool) -> tuple[Candidate, T, Lease] | None:
        """One attempt: wait out a retry's backoff, pass the breaker, hold an in-flight slot and run it. Returns
        what served, or None when the next pick should follow (the failure recorded)."""
        cand, state = pick.cand, self.router.state
        if pick.delay is not None:
            await self.sleep(pick.delay)
        grant = self._grant(call, pick)
        if grant is None:
            return None
        probe = grant == "probe"
        plan.sent += 1
        plan.tries[cand.key] = plan.tries.get(cand.key, 0) + 1
        if pick.retry and self.on_retry:
            self.on_retry(cand)
        lease = state.begin(cand.key, probe)
        t0 = clock()
        streamed = stream or cand.provider.config.assembles  # sent upstream as a stream
        try:
            # a client that leaves cancels the attempt: always for streamed answers (nothing will read them; a
            # non-stream one is assembled from a stream), and for passthrough answers on providers whose policy is
            # `cancel` (self-hosted by default)
            if cancel_on is not None and (streamed or cand.provider.config.disconnect_policy == "cancel"):
                result = await unless_gone(attempt(cand), cancel_on)
            else:
                result = await attempt(cand)
        except GatewayError as e:
            lease.close()
            self._failed(call, cand, e, clock() - t0, probe, pick.retry, streamed)
            if not e.fallback_ok:
                raise
            plan.errors.append((cand, e))
            plan.last_err[cand.key] = e
            if e.retryable:
                plan.retry_q.append(cand)
            return None
        except BaseException:
            lease.close()
            self._cancelled(call, cand, clock() - t0, probe, pick.retry)
            raise
        self._succeeded(call, plan, cand, clock() - t0, probe, grant == "forced", pick.retry, streamed)
        return cand, result, lease

    # ---- record -------------------------------------------------------------------------------------------------

    def _succeeded(self, call: HasAttempts, plan: _Plan, cand: Candidate, dt: float, probe: bool, forced: bool,
                   retry: bool, streamed: bool) -> None:
        state = self.router.state
        state.breaker(cand.key).success(probe or forced)  # a forced success is evidence too
        state.observe(cand.key, True, dt, streamed)  # a streamed attempt's dt is its time to first chunk
        call.attempts.append(Attempt.of(cand, None, dt, probe, retry))
        self._observe(cand, None, dt)
        if plan.errors and self.on_failover and plan.errors[0][0].key != cand.key:
            self.on_failover(plan.errors[0][0], cand)

    def _cancelled(self, call: HasAttempts, cand: Candidate, dt: float, probe: bool, retry: bool) -> None:
        if probe:
            self.router.state.breaker(cand.key).release_probe()
        call.attempts.append(Attempt.of(cand, None, dt, probe, retry, outcome=AttemptOutcome.CANCELLED))

    def _failed(self, call: HasAttempts, cand: Candidate, e: GatewayError, dt: float, probe: bool, retry: bool,
                stream: bool) -> None:
        state = self.router.state
        call.attempts.append(Attempt.of(cand, e, dt, probe, retry))
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
        waits = [s.retry_in for s in skipped if s.retry_in]
        return NoDeploymentAvailable(f"No deployment {what}is available.{skipped_txt}",
                                     retry_after=max(min(waits), 1.0) if waits else 1.0)
    # only each error's message: our own words (or a sanitised 4xx), never an upstream's raw text (that is detail)
    tried = "; ".join(f"{c.name}: {e.code} ({e.message[:160]})" for c, e in errors)
    msg = f"All deployments failed. Tried: {tried}.{skipped_txt}"
    if all(isinstance(e, UpstreamTimeout) for _, e in errors):
        return UpstreamTimeout(msg, code="all_deployments_timed_out")
    if all(isinstance(e, (UpstreamRateLimited, UpstreamAuthError)) for _, e in errors):
        waits = [e.retry_after for _, e in errors if e.retry_after]
        return NoDeploymentAvailable(msg, code="all_deployments_unavailable", retry_after=min(waits) if waits else 1)
    return UpstreamError(msg, code="all_deployments_failed")
