"""The meter: admit (rate limits + budget reservation), settle (exactly once), owed releases, and the journal.

Policies (what tests/metering pins, against a real redis-server):

* **Admission is one script, all or nothing** (``admit.lua``): it frees reservations past their expiry, checks the
  budget (``spend + reserved + this reservation <= budget`` for the key's period: total, UTC day or UTC month),
  then RPM and TPM (sliding-window counter, :mod:`ratelimit`), and only when everything passes counts the request,
  the tokens and the reservation. The clock is the meter's (injected), passed to the script in ms.
* **Worst-case reservation**: the request's bounds -- the most prompt tokens its upstream body can be billed
  for (``validate.prompt_bound``) and ``max_output_tokens`` per sequence (clamped to the model's max output; 0 means
  "not given" and reserves that maximum) times the sequences generated -- at the dearest rates of every model that
  may serve it (its ``models`` fallbacks included). Settlement prices the record at the model that served and clamps
  the upstream's counts to the same bounds, so **no request can cost more than it reserved** and spend never passes
  a budget. Budget arithmetic inside the script is exact up to 2**53 nano-USD (about 9 million USD).
* **Fast path**: a key with no budget and no limits costs no Redis call at admission.
* **Redis down at admission**: a key with a budget fails CLOSED (``StoreUnavailable``, 503, ``Retry-After``); a
  key with only rate limits fails OPEN to the in-process :class:`LocalLimiter` and ``fail_open_total`` counts it.
  A reservation the script may have made before the failure is released later by the background task.
* **Settlement** (``settle.lua``) is idempotent by generation id (a settled marker ``SET NX``, 48 h, plus the record
  itself, 30 d): totals, period and per-model counters, the reservation released (TPM reconciled to actual), the
  record, and the key's own usage stream -- all in the key's hash slot, atomically, so counters equal the sum of
  the stream's records. The cross-slot extras (global ``usage`` feed, key index, ``gen:ID`` lookup, the in-flight
  entry's removal) follow a first settlement only, so the feed is at-least-once, never the counters: on a single
  node the same script posts them (declared as its KEYS 14-17, atomically with the settlement: one round trip); on
  a Redis Cluster, where they live in other slots, a second, plain call does.
  No additive command is ever re-sent after a timeout: an unknown outcome goes to the journal, whose replay runs
  the same idempotent script. ``settle`` never raises and runs shielded from the caller's cancellation.
  On a single node settlements are **group-committed** with the admissions: the scripts queued while a batch is
  in Redis, admissions and settlements alike, go together in the next one (one pipeline of scripts: the scripts'
  outbox, :meth:`Scripts.enqueue`), so a loaded worker pays one round trip per batch, not one per request nor one
  per kind; each caller still returns only once its record is stored (or journalled).
* **Crash recovery** (:mod:`instance`): every request in flight is registered under this process's instance id
  (for a reservation, in the admission's round trip) and checkpointed; requests of an instance that stopped
  heartbeating are settled by the survivors as ``gateway_lost``.
* **Upstream usage is bounded before it is priced** (:mod:`bounds`): bad counts become the gateway's estimate,
  every count is clamped to the served model's card, and each anomaly is counted (``usage_anomalies``).
* **Never lost**: a cost that cannot be computed is journalled unpriced (replay prices it again); a replayed entry
  whose script had already run (its reply lost in a stall) still posts the feed and ``gen:ID`` when that index is
  missing (``SET NX``: at most once more); an entry that can never be applied goes to ``rejected.jsonl`` and the
  log instead of stopping the replay of the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from therouter.config import Settings
from therouter.errors import BudgetExceeded, GatewayError, RateLimited, StoreUnavailable
from therouter.keys import KeyRecord
from therouter.metering.admission import Admission, MeterOptions
from therouter.metering.bounds import Bounds, bound_usage
from therouter.metering.instance import Instance
from therouter.metering.journal import Journal
from therouter.metering.layout import Layout, day_id, month_id, period_id, period_label
from therouter.metering.pricebook import PriceBook
from therouter.metering.prices import PriceVersion, billable, cost_nano, dearest, nano_to_usd, reservation_nano
from therouter.metering.ratelimit import Decision, LocalLimiter, headers, retry_after_seconds, tighter
from therouter.metering.records import GenerationRecord
from therouter.metering.reports import Reports
from therouter.metering.scripts import Scripts
from therouter.protocol.usage import Usage
from therouter.store import Store

log = logging.getLogger("therouter.metering")
_MAX_ORPHANS = 10_000
_MAX_NAMES = 10_000  # cached key-name tuples (_admit_keys, _settle_call), dropped all at once when full
# settle.lua's ARGV[22] (a single node): when a repeated settlement posts the cross-slot extras too
_POST_FIRST, _POST_ALWAYS, _POST_IF_MISSING = "0", "1", "2"  # never (only a first one) / always / if gen:ID is missing
# how long a budget refusal with reservations out waits before its one more look (Meter.admit)
BUDGET_RECHECK_S = 0.02


class Meter:
    def __init__(self, store: Store, settings: Settings, journal_dir: Path,
                 clock: Callable[[], float] = time.time, options: MeterOptions | None = None) -> None:
        self.store, self.settings, self.clock = store, settings, clock
        self.options = options or MeterOptions()
        self.reservation_ttl = self.options.reservation_ttl_for(settings)
        self.layout = Layout(store.prefix)
        self.scripts = Scripts(store)
        self.prices = PriceBook(store, settings, self.layout, self.scripts, clock)
        self.journal = Journal(journal_dir)
        self.reports = Reports(store, self.layout, self.scripts, clock, self.options, self.settled)
        self.local = LocalLimiter(self.options.local_limit_divisor, window_ms=self.options.window_ms)
        self.instance = Instance(store, self.layout, self.scripts, clock, self.options, self.reservation_ttl + 60,
                                 settle=self.settle)
        # metric hooks: read by tests, and each event is passed to `on_event` (the observability layer's counters)
        self.on_event: Callable[..., None] = _ignore
        self.fail_open_total = 0
        self.journal_writes_total = 0
        self.journal_errors_total = 0
        self.usage_anomalies: Counter[tuple[str, str]] = Counter()  # (provider, reason): see bounds.py
        self._orphans: dict[str, tuple[str, int, str]] = {}  # gen id -> (key id, window, model): releases owed
        self._names: dict[tuple[Any, ...], tuple[str, ...]] = {}  # key names shared by requests (_admit_keys, ...)
        self._tasks: set[asyncio.Task[Any]] = set()
        # settlements this process has not stored (or journalled) yet: what a read of its own writes waits for
        self._unsettled: set[asyncio.Future[Any]] = set()
        self._background: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._replay_lock = asyncio.Lock()
        self._prices_loaded = False
        self._prices_at = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._load_prices()
        try:
            await self.replay_journal()
        except StoreUnavailable:
            log.warning("metering journal not replayed: the store is unavailable; retrying in the background")
        try:
            await self.instance.checkpoint(beat=True)  # registered before the first request
        except StoreUnavailable:
            log.warning("metering: instance %s not registered: the store is unavailable; retrying in the background",
                        self.instance.id)
        self._background = asyncio.create_task(self._run_background(), name="meter-background")
        self._heartbeat = asyncio.create_task(self._run_instance(), name="meter-instance")

    async def aclose(self) -> None:
        for task in (self._background, self._heartbeat):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._background = self._heartbeat = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while self._tasks and loop.time() < deadline:  # (a settlement's round trip may start a journal write)
            await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
        try:
            await self.instance.leave()
        except StoreUnavailable:
            pass  # the other instances forget this one once its heartbeat is older than instance_lost_after

    # ---- admission ------------------------------------------------------------------------------------------------

    async def admit(self, key: KeyRecord, model: str, prompt_tokens_est: int, max_output_tokens: int,
                    gen_id: str, *, sequences: int = 1, prompt_bound: int | None = None,
                    fallbacks: Sequence[str] = ()) -> Admission:
        """Admit one request. ``max_output_tokens`` is the per-sequence limit (0: the model's max output) and
        ``sequences`` how many the upstream generates; ``prompt_bound`` the most prompt tokens it can be billed for
        (default: the estimate); ``fallbacks`` the other models that may serve it. The reservation covers the bounds
        at the dearest of those models' prices, so no answer can cost more than was reserved."""
        now = self.clock()
        price = self.prices.current(model, now)
        others = {m: self.prices.current(m, now) for m in fallbacks if m != model}
        per_seq = max(self._clamp_output(m, max_output_tokens) for m in (model, *others))
        max_out = per_seq * max(sequences, 1)
        max_prompt = max(prompt_tokens_est if prompt_bound is None else prompt_bound, 0)
        tokens = max(prompt_tokens_est, 0) + max_out
        reserve = reservation_nano(max_prompt, max_out, dearest(price, *others.values())) \
            if key.budget_nano is not None else 0
        now_ms = int(now * 1000)
        adm = Admission(gen_id, key.id, model, price, reserve, tokens, now, now_ms // self.options.window_ms,
                        fallback_prices=others, max_prompt_tokens=prompt_bound or 0, max_completion_tokens=max_out)
        mrpm, mtpm = key.limits_for(model)
        if key.budget_nano is None and key.rpm is None and key.tpm is None and mrpm is None and mtpm is None:
            self.instance.admitted(adm, prompt_tokens_est, registered=False)
            return adm
        pid = period_id(key.budget_period, now)
        keys = self._admit_keys(key.id, pid, adm.window, model)
        args = self._admit_args(key, adm, pid, now_ms, mrpm, mtpm)
        raw = self.instance.entry(adm, prompt_tokens_est)
        if not self.store.cluster:  # the script registers the request itself once it is admitted
            args += (raw, self.instance.ttl_ms)
        for recheck in (True, False):
            try:  # the admission and this request's in-flight entry: one round trip
                if self.store.cluster:  # (the in-flight hash is in another slot: its HSET goes beside the script)
                    res = await self.scripts.run_with("admit", keys, args, self.instance.registration(gen_id, raw))
                else:
                    res = await self.scripts.run_with("admit", keys, args)
            except StoreUnavailable:
                return self._admit_degraded(key, adm, now_ms, prompt_tokens_est)
            except Exception:
                log.exception("metering: admission script failed; treating the store as unavailable")
                return self._admit_degraded(key, adm, now_ms, prompt_tokens_est)
            status, spent, reserved = str(res[0]), int(res[1]), int(res[2])
            # refused for the budget while reservations are out: one may be an answer another worker has sent and
            # not settled yet (a round trip after its answer; this worker's own go before this admission in its
            # outbox): one more look after that time. A budget refusal consumes nothing, so asking again is safe.
            if not (recheck and status == "budget" and reserved > 0 and not self.store.cluster):
                break
            await asyncio.sleep(BUDGET_RECHECK_S)
        # the key's own limits and its override for this model: the tighter one is what the caller sees
        rdec = tighter(_decision(key.rpm, res[3:7]), _decision(mrpm, res[11:15]))
        tdec = tighter(_decision(key.tpm, res[7:11]), _decision(mtpm, res[15:19]))
        if status in ("budget", "rate"):
            self.instance.refused(gen_id)
            if status == "budget":
                raise self._budget_error(key, pid, spent, reserved, reserve)
            raise self._rate_error(rdec, tdec, tokens)
        adm.tracked, adm.headers = True, headers(rdec, tdec)
        self.instance.admitted(adm, prompt_tokens_est, registered=True)
        return adm

    def _admit_keys(self, key_id: str, pid: str, window: int, model: str) -> tuple[str, ...]:
        """admit.lua's KEYS (with this instance's in-flight hash on a single node): the same for every request of a
        key, budget period, window and model, so built once for them."""
        names = self._names.get(("admit", key_id, pid, window, model))
        if names is not None:
            return names
        lay, mr, mt = self.layout, "r|" + model, "t|" + model
        names = (lay.resv(key_id), lay.resvexp(key_id), lay.per(key_id, pid),
                 lay.rl(key_id, "r", window), lay.rl(key_id, "r", window - 1),
                 lay.rl(key_id, "t", window), lay.rl(key_id, "t", window - 1),
                 lay.rl(key_id, mr, window), lay.rl(key_id, mr, window - 1),
                 lay.rl(key_id, mt, window), lay.rl(key_id, mt, window - 1),
                 *(() if self.store.cluster else (self.instance.key,)))
        return self._remember(("admit", key_id, pid, window, model), names)

    def _remember(self, name: tuple[Any, ...], names: tuple[str, ...]) -> tuple[str, ...]:
        if len(self._names) >= _MAX_NAMES:  # (a window or a day passed for every key: start again)
            self._names.clear()
        self._names[name] = names
        return names

    def _admit_args(self, key: KeyRecord, adm: Admission, pid: str, now_ms: int, mrpm: int | None,
                    mtpm: int | None) -> list[str | int]:
        ttl_ms, window_ms = self.reservation_ttl * 1000, self.options.window_ms
        return [adm.gen_id, now_ms, -1 if key.budget_nano is None else key.budget_nano, adm.reserved_nano, pid,
                ttl_ms, -1 if key.rpm is None else key.rpm, -1 if key.tpm is None else key.tpm,
                adm.reserved_tokens, window_ms, now_ms % window_ms, f"{adm.model}|{adm.price.version}",
                ttl_ms + 60_000, -1 if mrpm is None else mrpm, -1 if mtpm is None else mtpm]

    def _admit_degraded(self, key: KeyRecord, adm: Admission, now_ms: int, prompt_tokens_est: int) -> Admission:
        """Redis unreachable: budgets fail closed, rate limits fail open to the local limiter."""
        self._owe_release(adm.gen_id, key.id, adm.window, adm.model)  # the script may have run before the failure
        self.instance.refused(adm.gen_id)  # ... and so may the in-flight entry: the request goes on untracked
        if key.budget_nano is not None:
            raise StoreUnavailable("Spend can't be checked right now (the store is unavailable); retry shortly.",
                                   retry_after=2, headers={"Retry-After": "2"})
        self.fail_open_total += 1
        self.on_event("fail_open")
        rdec, tdec = self.local.check(key.id, now_ms, key.rpm, key.tpm, adm.reserved_tokens)
        mrpm, mtpm = key.limits_for(adm.model)
        if (mrpm is not None or mtpm is not None) and all(d is None or d.allowed for d in (rdec, tdec)):
            # degraded mode: the key-level counters have moved even if the model override refuses (slight over-count)
            mr, mt = self.local.check(f"{key.id}|{adm.model}", now_ms, mrpm, mtpm, adm.reserved_tokens)
            rdec, tdec = tighter(rdec, mr), tighter(tdec, mt)
        if (rdec and not rdec.allowed) or (tdec and not tdec.allowed):
            raise self._rate_error(rdec, tdec, adm.reserved_tokens)
        adm = replace(adm, local=True, headers=headers(rdec, tdec))
        self.instance.admitted(adm, prompt_tokens_est, registered=False)
        return adm

    def _clamp_output(self, model: str, max_output: int) -> int:
        cfg = self.settings.models.get(model)
        if cfg is None:
            return max(max_output, 0)
        return cfg.max_output_tokens if max_output <= 0 else min(max_output, cfg.max_output_tokens)

    def _budget_error(self, key: KeyRecord, pid: str, spent: int, reserved: int, need: int) -> BudgetExceeded:
        budget = key.budget_nano or 0
        left = max(budget - spent - reserved, 0)
        return BudgetExceeded(
            f"Budget exceeded for this key: ${nano_to_usd(left)} left of ${nano_to_usd(budget)} for the "
            f"{period_label(pid)}; this request may cost up to ${nano_to_usd(need)}.",
            headers={"x-should-retry": "false"},
        )

    def _rate_error(self, rdec: Decision | None, tdec: Decision | None, tokens: int) -> RateLimited:
        per = "minute" if self.options.window_ms == 60_000 else f"{self.options.window_ms // 1000}s"
        parts, retry = [], 1
        for what, d in (("requests", rdec), ("tokens", tdec)):
            if d is None or d.allowed:
                continue
            retry = max(retry, retry_after_seconds(d.retry_ms, self.options.window_ms))
            if d.retry_ms < 0:
                parts.append(f"this request needs up to {tokens} {what}, more than the limit of {d.limit} {what} "
                             f"per {per}; lower max_tokens")
            else:
                parts.append(f"{what} per {per}: limit {d.limit}, remaining {d.remaining}")
        h = headers(rdec, tdec)
        h["Retry-After"] = str(retry)
        return RateLimited(f"Rate limit reached ({'; '.join(parts)}). Retry after {retry}s.",
                           headers=h, retry_after=retry, limit="rpm" if rdec and not rdec.allowed else "tpm")

    # ---- settlement -----------------------------------------------------------------------------------------------

    async def settle(self, adm: Admission, record: GenerationRecord, estimate: Usage | None = None,
                     choices: int = 1, *, only_if_reserved: bool = False, wait: bool = True) -> int:
        """Record the true cost once; returns it in nano-USD. Never raises; survives the caller's cancellation.

        ``wait=False`` (the gateway, for an answer; a single node): the cost is computed here and returned at once,
        the record is stored by the group commit after the caller has moved on -- the answer does not wait for a Redis
        round trip. The outbox keeps order, so an admission queued later runs after it. A process that dies in
        between leaves the request's in-flight entry, which the reaper settles; a store that fails it journals it.
        This process's own reads (:meth:`settled`) wait for it. On a Redis Cluster (no ordered outbox: the settlement
        is two calls of its own) the caller always waits.

        The upstream's usage is bounded first (:mod:`bounds`): counts it got wrong are replaced by ``estimate`` (the
        gateway's own count) and every count is clamped to the served model's card (``choices`` x its max output)
        and to the request's own bounds (what its reservation covered). The record is priced at the model that
        served. ``record.usage`` is updated in place, so the answer shows what was billed. A record whose cost cannot
        be computed is journalled unpriced (replay prices it again) and logged; one that cannot be stored is
        journalled. ``only_if_reserved``: only while the admission's reservation exists (the reaper's lost requests).
        """
        self.instance.done(adm.gen_id)
        try:
            record.id, record.key_id = adm.gen_id, adm.key_id
            record.model = record.model or adm.model  # the model that served (a `models` fallback may differ)
            self._bound(adm, record, estimate, choices)
            self._price(adm, record)
        except Exception:
            log.exception("metering: the cost of %s could not be computed; journalled unpriced", adm.gen_id)
            record.cost_nano = 0
            work = self._journal(adm, record, post=False, priced=False, only_if_reserved=only_if_reserved)
        else:
            if not self.store.cluster:  # queued for the group commit, whose outbox owns it from here: a
                # cancelled caller stops waiting, nothing more (its future is skipped once done), so the wait needs
                # no shield
                fut = self._queue(adm, record, only_if_reserved)
                if wait:
                    await fut
                return record.cost_nano
            work = self._settle(adm, record, only_if_reserved)
        task = self._keep(asyncio.ensure_future(work))
        self._track(task)
        await asyncio.shield(task)
        return record.cost_nano

    def _keep(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """A task of this meter's: ``aclose`` waits for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _track(self, fut: asyncio.Future[Any]) -> None:
        self._unsettled.add(fut)
        fut.add_done_callback(self._unsettled.discard)

    @property
    def unsettled(self) -> int:
        """Settlements this process has started and not yet stored or journalled."""
        return sum(1 for f in self._unsettled if not f.done())

    async def settled(self) -> None:
        """Read-your-writes: returns once every settlement this process started before the call is stored or
        journalled (every read of :class:`Reports` awaits it first)."""
        pending = [f for f in self._unsettled if not f.done()]
        if pending:
            await asyncio.wait(pending)

    def _bound(self, adm: Admission, record: GenerationRecord, estimate: Usage | None, choices: int) -> None:
        """Within the served model's card, and within what the request could send and was reserved for."""
        card = self.settings.models.get(record.model)
        limits = None
        if card is not None:
            context, max_output = card.context_length, card.max_output_tokens * max(choices, 1)
            if adm.max_prompt_tokens > 0:
                context = min(context, adm.max_prompt_tokens)
            if adm.max_completion_tokens > 0:
                max_output = min(max_output, adm.max_completion_tokens)
            limits = Bounds(context, max_output)
        usage, reasons = bound_usage(record.usage, limits, estimate)
        if reasons:
            for reason in reasons:
                self.usage_anomalies[(record.provider, reason)] += 1
                self.on_event("usage_anomaly", record.provider, reason)
            log.warning("metering: usage of %s from %s bounded (%s)", record.id, record.provider or "-",
                        ", ".join(reasons))
        _assign(record.usage, usage)  # in place: the caller renders the same object in its answer
        record.usage.rejected = {}

    def _price(self, adm: Admission, record: GenerationRecord) -> None:
        """Priced at the model that served, within the bounds its reservation covered."""
        price = adm.price_for(record.model)
        usage = billable(record.usage, adm.max_prompt_tokens, adm.max_completion_tokens)
        if usage is not record.usage:  # (within its bounds: the same object back)
            _assign(record.usage, usage)
        record.cost_nano = cost_nano(record.usage, price)
        record.price_version = price.version

    async def _settle(self, adm: Admission, record: GenerationRecord, only_if_reserved: bool = False) -> None:
        if not self.store.cluster:
            await self._queue(adm, record, only_if_reserved)
            return
        try:  # a cluster's pipeline refuses EVALSHA: one script call per settlement
            await self._apply(adm, record, post_owed=False, only_if_reserved=only_if_reserved)
        except Exception as e:  # the outcome is unknown: the journal's replay settles it exactly once
            if not isinstance(e, GatewayError):
                log.exception("metering: settle failed unexpectedly; journalling %s", adm.gen_id)
            await self._journal(adm, record, post=False, only_if_reserved=only_if_reserved)

    def _queue(self, adm: Admission, record: GenerationRecord, only_if_reserved: bool) -> asyncio.Future[None]:
        """Group commit (a single node): the settle script goes into the scripts' outbox, with the admissions and
        settlements queued meanwhile (one round trip for all of them, see ``Scripts.enqueue``); the future is done
        when this one is settled or journalled. ``aclose`` waits for the outbox and the journal writes."""
        p = _Pending(adm, record, only_if_reserved, asyncio.get_running_loop().create_future())
        self._track(p.done)
        try:
            keys, args = self._settle_call(adm, record, _json(record.to_dict()), only_if_reserved, _POST_FIRST)
        except Exception:
            log.exception("metering: settle failed unexpectedly; journalling %s", adm.gen_id)
            self._journal_pending(p)
        else:
            self.scripts.enqueue("settle", keys, args, partial(self._on_settle_reply, p))
            flusher = self.scripts.flusher
            if flusher is not None and flusher not in self._tasks:
                self._keep(flusher)
        return p.done

    def _on_settle_reply(self, p: _Pending, reply: Any) -> None:
        """The settle script's reply (a single node). One whose script failed, or whose round trip did (its
        outcome is unknown), is journalled: the journal's replay settles it exactly once."""
        if not isinstance(reply, BaseException):
            if not p.done.done():
                p.done.set_result(None)
            return
        if isinstance(reply, GatewayError):  # the store is unavailable: the round trip's outcome is unknown
            pass
        elif reply.__traceback__ is None:  # an error reply (never raised): this one's script failed, the others ran
            log.error("metering: settle script failed for %s (%s); journalled", p.adm.gen_id, reply)
        else:  # raised: a bug
            log.error("metering: settle failed unexpectedly; journalling %s", p.adm.gen_id, exc_info=reply)
        self._journal_pending(p)

    def _journal_pending(self, p: _Pending) -> None:
        """Journal a queued settlement in a task of its own (``aclose`` waits for it); then its caller returns."""

        async def journal() -> None:
            try:
                await self._journal(p.adm, p.record, post=False, only_if_reserved=p.only_if_reserved)
            finally:
                if not p.done.done():
                    p.done.set_result(None)

        self._keep(asyncio.ensure_future(journal()))

    async def _apply(self, adm: Admission, record: GenerationRecord, post_owed: bool, replay: bool = False,
                     only_if_reserved: bool = False) -> None:
        """The settle script and the cross-slot extras: after a first settlement, when owed (a journal entry with
        ``post``), or -- on replay, when the script had already run (its reply was lost in a stall) -- when the
        generation index shows they are missing. A single node: all of it in the script, one round trip. A cluster:
        the script, then the extras in a call of their own (they are in other slots)."""
        rec_json = _json(record.to_dict())
        post = _POST_ALWAYS if post_owed else _POST_IF_MISSING if replay and not only_if_reserved else _POST_FIRST
        if not self.store.cluster:
            await self.scripts.run("settle", *self._settle_call(adm, record, rec_json, only_if_reserved, post))
            return
        res = await self.scripts.run("settle", *self._settle_call(adm, record, rec_json, only_if_reserved, None))
        first = int(res[0]) == 1
        if first or post != _POST_FIRST:
            try:
                await self.store.call(lambda: self._post(adm, rec_json, only_if_missing=not (first or post_owed)))
            except Exception:  # noqa: BLE001 - whatever stopped the post, the journal keeps the record
                await self._journal(adm, record, post=True)

    def _settle_call(self, adm: Admission, record: GenerationRecord, rec_json: str, only_if_reserved: bool,
                     post: str | None) -> tuple[list[str], list[str | int]]:
        """settle.lua's KEYS and ARGV; ``post`` (a single node only: None leaves the extras out) says when a repeat
        posts the cross-slot extras too (``_POST_*``; a first settlement always posts them)."""
        kid, gen, at = adm.key_id, adm.gen_id, adm.admitted_at
        day, month = day_id(at), month_id(at)
        tag = self.layout.tag(kid)
        st = self._names.get(("settle", kid, day, adm.window, adm.model))
        if st is None:
            st = self._remember(("settle", kid, day, adm.window, adm.model), self._settle_names(adm, day, month))
        keys = [tag + "settled:" + gen, tag + "gen:" + gen, st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7],
                st[8], tag + "rid:" + record.request_id, st[9]]
        cost, _, prompt, completion, cached, reasoning = record.counter_values()  # (COUNTER_FIELDS' order)
        o = self.options
        args: list[str | int] = [
            gen, cost, record.model, prompt, completion, cached, reasoning, rec_json, o.settled_ttl, o.record_ttl,
            o.day_ttl, o.month_ttl, o.stream_maxlen, prompt + completion, day, month, record.request_id,
            1 if only_if_reserved else 0, record.provider]
        if post is not None:
            keys += (st[10], st[11], self.layout.gen_index(gen), self.instance.key)
            args += (kid, o.feed_maxlen, post)
        return keys, args

    def _settle_names(self, adm: Admission, day: str, month: str) -> tuple[str, ...]:
        """The KEYS of settle.lua that every settlement of a key, day, window and model shares (3-11 and 13; then
        the feed and the key set)."""
        lay, kid = self.layout, adm.key_id
        return (lay.per(kid, "total"), lay.per(kid, "d:" + day), lay.per(kid, "m:" + month), lay.bymodel(kid, day),
                lay.resv(kid), lay.resvexp(kid), lay.stream(kid), lay.rl(kid, "t", adm.window),
                lay.rl(kid, "t|" + adm.model, adm.window), lay.byprov(kid, day), lay.feed(), lay.keyset())

    async def _post(self, adm: Admission, rec_json: str, only_if_missing: bool = False) -> None:
        """The cross-slot extras of one settlement on a cluster (a single node posts them in the settle script)."""
        lay = self.layout
        if only_if_missing and not await self.store.redis.set(lay.gen_index(adm.gen_id), adm.key_id,
                                                              ex=self.options.record_ttl, nx=True):
            return  # the extras were posted when the script first ran
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(lay.feed(), {"gen": adm.gen_id, "key": adm.key_id, "rec": rec_json},
                      maxlen=self.options.feed_maxlen, approximate=True)
            pipe.sadd(lay.keyset(), adm.key_id)
            pipe.set(lay.gen_index(adm.gen_id), adm.key_id, ex=self.options.record_ttl)
            pipe.hdel(self.instance.key, adm.gen_id)  # no longer in flight
            await pipe.execute()

    async def _journal(self, adm: Admission, record: GenerationRecord, post: bool, priced: bool = True,
                       only_if_reserved: bool = False) -> None:
        """Keep a record Redis could not take (never raises: a record that cannot be written goes to the log)."""
        entry: dict[str, Any] = {"v": 1, "adm": adm, "record": record, "post": post}
        if only_if_reserved:
            entry["if_reserved"] = True
        try:
            entry.update(adm=adm.to_dict(), record=record.to_dict())
            if not priced:
                entry["priced"] = False  # replay computes the cost again
            await self.journal.append(entry)
            self.journal_writes_total += 1
            self.on_event("journal_write")
        except Exception:
            self.journal_errors_total += 1
            self.on_event("journal_error")
            log.critical("metering: usage record %s could not be journalled: %s", adm.gen_id, _dump(entry),
                         exc_info=True)

    async def replay_journal(self) -> int:
        """Settle every journalled record (idempotently); returns how many entries were applied. Raises
        StoreUnavailable if Redis is still away (the journal then stays as it is)."""
        async with self._replay_lock:
            applied = 0
            for path in await self.journal.take():
                for entry in await asyncio.to_thread(self.journal.read, path):
                    applied += await self._replay_entry(entry)
                await asyncio.to_thread(self.journal.done, path)
            if applied:
                log.info("metering: %d journalled usage records replayed into the store", applied,
                         extra={"event": "journal_replay", "records": applied})
            return applied

    async def _replay_entry(self, entry: dict[str, Any]) -> int:
        """Apply one journal entry (1) or move it to ``rejected.jsonl`` with a log line (0). Only an unavailable store
        stops the replay (the file is kept and applied again later: settle is idempotent)."""
        try:
            adm = Admission.from_dict(entry["adm"])
            record = GenerationRecord.from_dict(entry["record"])
            if entry.get("priced") is False:
                self._price(adm, record)
        except Exception:
            log.critical("metering: journal entry cannot be applied (malformed or unpriceable); kept in "
                         "rejected.jsonl: %s", _dump(entry), exc_info=True)
            await asyncio.to_thread(self.journal.reject, entry)
            return 0
        try:
            await self._apply(adm, record, post_owed=bool(entry.get("post")), replay=True,
                              only_if_reserved=bool(entry.get("if_reserved")))
        except StoreUnavailable:
            raise
        except Exception:
            log.critical("metering: journal entry %s failed to apply; kept in rejected.jsonl", adm.gen_id,
                         exc_info=True)
            await asyncio.to_thread(self.journal.reject, entry)
            return 0
        return 1

    # ---- owed releases --------------------------------------------------------------------------------------------
    # (a request that fails is settled like any other, with a record; a release is owed only by an admission whose
    # script may have run in Redis before the failure that made it fall back to the local limiter)

    async def _release(self, key_id: str, gen_id: str, window: int, model: str) -> None:
        lay = self.layout
        await self.scripts.run("release", [lay.resv(key_id), lay.resvexp(key_id), lay.rl(key_id, "t", window),
                                           lay.rl(key_id, "t|" + model, window)], [gen_id])

    def _owe_release(self, gen_id: str, key_id: str, window: int, model: str) -> None:
        if len(self._orphans) < _MAX_ORPHANS:  # beyond that, reservation expiry frees them
            self._orphans[gen_id] = (key_id, window, model)

    # ---- requests in flight ---------------------------------------------------------------------------------------

    def serving(self, gen_id: str, model: str, provider: str, upstream_model: str, stream: bool,
                usage: Callable[[], Usage] | None = None) -> None:
        """What serves a request in flight now (and, for a stream, a live usage reading): the next checkpoint
        writes it, so a lost instance's request is settled at that deployment and the output it had produced.
        In-process only, no I/O."""
        self.instance.serving(gen_id, model, provider, upstream_model, stream, usage)

    # ---- background -----------------------------------------------------------------------------------------------

    async def _run_instance(self) -> None:
        """Heartbeat, checkpoints and the reaper: a task of its own, so a long journal replay never delays a
        heartbeat (a late one could get this instance taken for lost)."""
        o = self.options
        while True:
            await asyncio.sleep(min(o.checkpoint_interval, o.heartbeat_interval))
            try:
                await self.instance.tick()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("metering: heartbeat / checkpoint / reaper pass failed")

    async def _run_background(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick)
            try:
                await self.maintain()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("metering: background pass failed")

    async def maintain(self) -> None:
        """One background pass: (re)load prices, pay owed releases, replay the journal."""
        if not self._prices_loaded or time.monotonic() - self._prices_at >= self.options.price_refresh:
            await self._load_prices()
        for gen_id, (key_id, window, model) in list(self._orphans.items()):
            await self._release(key_id, gen_id, window, model)
            self._orphans.pop(gen_id, None)
        if await asyncio.to_thread(self.journal.pending):
            await self.replay_journal()

    async def _load_prices(self) -> None:
        try:
            if self._prices_loaded:
                await self.prices.refresh()
            else:
                await self.prices.load_config()
                self._prices_loaded = True
            self._prices_at = time.monotonic()
        except StoreUnavailable:
            log.warning("metering: prices not loaded from the store (unavailable); using the local copy")
        except Exception:  # e.g. a damaged price key: never block start-up, admissions or the journal's replay
            self._prices_at = time.monotonic()
            log.exception("metering: prices not loaded from the store; using the local copy")

    # ---- prices and reports (delegated) ---------------------------------------------------------------------------

    async def set_price(self, model: str, input_usd: Any, cached_input_usd: Any, output_usd: Any,
                        effective_at: int | None = None, cache_write_usd: Any = None) -> PriceVersion:
        return await self.prices.set(model, input_usd, cached_input_usd, output_usd, effective_at, cache_write_usd)

    async def get_price(self, model: str) -> PriceVersion | None:
        return await self.prices.get(model)

    async def list_prices(self) -> list[dict[str, Any]]:
        return await self.prices.all()

    async def generation(self, gen_id: str, key_id: str | None = None) -> dict[str, Any] | None:
        """A generation record; with the owner's key id it is one read in that key's slot (no index lookup)."""
        return await self.reports.generation(gen_id, key_id)

    async def generation_by_request(self, request_id: str, key_id: str) -> dict[str, Any] | None:
        """The key's newest generation record sent with that ``x-request-id`` (never another key's)."""
        return await self.reports.generation_by_request(request_id, key_id)

    async def key_summary(self, key: KeyRecord) -> dict[str, Any]:
        return await self.reports.key_summary(key)

    async def usage_rows(self, key_id: str | None = None, days: int = 7) -> list[dict[str, Any]]:
        return await self.reports.usage_rows(key_id, days)

    async def rebuild_totals(self, key_id: str) -> dict[str, Any]:
        return await self.reports.rebuild_totals(key_id)


@dataclass(slots=True)
class _Pending:
    """A settlement queued for the next batch (``done`` is set once it is stored or journalled)."""
    adm: Admission
    record: GenerationRecord
    only_if_reserved: bool
    done: asyncio.Future[None]


def _ignore(*_: Any) -> None:
    pass


def _decision(limit: int | None, raw: list[Any]) -> Decision | None:
    if limit is None:
        return None
    ok, remaining, reset, retry = raw
    return Decision(int(ok) == 1, limit, int(remaining), int(reset), int(retry))


def _json(d: dict[str, Any]) -> str:
    return orjson.dumps(d, default=str).decode()  # a stray non-JSON value in a record is kept as text


def _dump(entry: Any) -> str:
    try:
        return _json(entry)
    except Exception:  # noqa: BLE001 - a log line must be written whatever the entry holds
        return repr(entry)


def _assign(target: Usage, source: Usage) -> None:
    target.prompt_tokens, target.completion_tokens = source.prompt_tokens, source.completion_tokens
    target.cached_tokens, target.reasoning_tokens = source.cached_tokens, source.reasoning_tokens
    target.cache_write_tokens = source.cache_write_tokens
    target.estimated = source.estimated
