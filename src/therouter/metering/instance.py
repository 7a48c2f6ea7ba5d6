"""This gateway process as a metering instance: a heartbeat, its requests in flight, and the reaper of lost instances.

A process SIGKILLed mid-stream never settles what it had in flight. So that every admitted request still gets a
record and its reservation does not block the key's budget until it expires:

* **Identity and heartbeat.** Each process (each uvicorn worker) is an instance with a random id. Its heartbeat is
  its score (last-seen, ms, the meter's clock) in the ``{meter}:instances`` zset.
* **Registered before the upstream call, at no extra round trip.** An admission that makes a reservation writes
  ``HSET {meter}:inflight:ID GEN entry`` in its own round trip (:meth:`Meter.admit`): on a single node the admission
  script writes it once it has admitted the request; on a cluster, where the hash is in another slot, it is
  pipelined beside the script, and a refused admission's entry is removed by the next checkpoint. Settlement
  removes it with its cross-slot extras (on a single node, inside the settle script). A request without a
  reservation (a key with no budget or limits) is registered by its first checkpoint: no Redis call is added to that
  fast path.
* **Checkpoints.** Every ``checkpoint_interval`` one pipelined batch (with the heartbeat when it is due) writes the
  entries that changed: the deployment serving the request, its prompt tokens (estimate or reported) and output
  tokens so far, read from the live counter the stream's rewriter keeps anyway (nothing is written per chunk).
* **The reaper** (every ``heartbeat_interval``, in every instance) settles each request in flight of an instance
  whose heartbeat is older than ``instance_lost_after`` as ``gateway_lost``: prompt + checkpointed output, marked
  estimated, through :meth:`Meter.settle`, with the rest of the reservation released. A tracked entry is settled
  only if its reservation still exists (``settle.lua``, in the key's slot): an entry left by a refused admission or
  by a request settled meanwhile is never settled again. Settlement is idempotent by generation id, so reapers
  racing each other or the request's own settlement are harmless. Then ``reap.lua`` forgets the instance, unless it
  heartbeated meanwhile.
* **A reaper must itself be in touch.** After a Redis outage every heartbeat is old; an instance reaps only once it
  has been heartbeating without failure for ``instance_lost_after``, so every live instance had time to heartbeat
  again. A restarted process (a new id) therefore reaps its predecessor ``instance_lost_after`` after it starts.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from therouter.metering.admission import Admission, MeterOptions
from therouter.metering.layout import Layout
from therouter.metering.records import GenerationRecord
from therouter.metering.scripts import Scripts
from therouter.protocol.usage import Usage
from therouter.store import Store

log = logging.getLogger("therouter.metering")
Settle = Callable[..., Awaitable[int]]
_REAP_BATCH = 100  # lost instances handled per reaper pass


@dataclass(slots=True)
class InFlight:
    """One request in flight in this process, and what its last checkpoint wrote."""

    adm: Admission
    prompt_tokens: int  # the admission's estimate, until a live usage reading says otherwise
    stream: bool = False
    model: str = ""  # the model / provider / upstream model serving it ("" until an attempt starts)
    provider: str = ""
    upstream_model: str = ""
    usage: Callable[[], Usage] | None = None  # a live reading (a stream's rewriter): read once per checkpoint
    written: tuple[Any, ...] | None = None  # the state Redis holds (None: not written yet)

    def state(self) -> tuple[Any, ...]:
        if self.usage is None:  # (the common case, spelt out: no Usage built)
            return (self.stream, self.model, self.provider, self.upstream_model, self.prompt_tokens, 0, 0, 0, 0)
        try:
            u = self.usage()
        except Exception:  # a bad reading must not stop the checkpoint of every other request
            log.exception("metering: usage of %s could not be read for its checkpoint", self.adm.gen_id)
            u = Usage(prompt_tokens=self.prompt_tokens)
        return (self.stream, self.model, self.provider, self.upstream_model, u.prompt_tokens, u.completion_tokens,
                u.cached_tokens, u.reasoning_tokens, u.cache_write_tokens)

    def encode(self, state: tuple[Any, ...], at: float, tracked: bool = False) -> str:
        """``tracked``: written as if admitted (the admission pipeline registers it before the script said so)."""
        stream, model, provider, upstream_model, prompt, completion, cached, reasoning, cache_write = state
        usage = {"prompt": prompt, "completion": completion, "cached": cached, "reasoning": reasoning}
        if cache_write:
            usage["cache_write"] = cache_write
        adm = self.adm.to_dict()
        if tracked:
            adm["tracked"] = True
        return orjson.dumps({
            "adm": adm, "stream": stream, "model": model, "provider": provider,
            "upstream_model": upstream_model, "at": at, "usage": usage,
        }).decode()


def lost_request(raw: str) -> tuple[Admission, GenerationRecord]:
    """An in-flight entry of a lost instance -> what to settle: outcome ``gateway_lost``, estimated usage."""
    d = orjson.loads(raw)
    adm = Admission.from_dict(d["adm"])
    u = d.get("usage") or {}
    usage = Usage(prompt_tokens=max(int(u.get("prompt", 0)), 0), completion_tokens=max(int(u.get("completion", 0)), 0),
                  cached_tokens=max(int(u.get("cached", 0)), 0), reasoning_tokens=max(int(u.get("reasoning", 0)), 0),
                  cache_write_tokens=max(int(u.get("cache_write", 0)), 0), estimated=True)
    at = float(d.get("at", adm.admitted_at))
    record = GenerationRecord(
        id=adm.gen_id, key_id=adm.key_id, model=str(d.get("model") or adm.model), provider=str(d.get("provider", "")),
        upstream_model=str(d.get("upstream_model", "")), usage=usage, created=int(adm.admitted_at),
        latency_ms=max(int((at - adm.admitted_at) * 1000), 0), outcome="gateway_lost", stream=bool(d.get("stream")),
    )
    return adm, record


class Instance:
    def __init__(self, store: Store, layout: Layout, scripts: Scripts, clock: Callable[[], float],
                 options: MeterOptions, ttl: int, settle: Settle) -> None:
        self.id = secrets.token_hex(8)
        self.key = layout.inflight(self.id)  # this instance's in-flight hash
        self._store, self._layout, self._scripts, self._clock, self._options = store, layout, scripts, clock, options
        self.ttl_ms = ttl * 1000  # the registry and in-flight hash outlive every reservation they could settle
        self._settle = settle
        # the client decodes replies to str (decode_responses=True); redis-py's stubs can't express that
        self._r: Any = store.redis
        self.live: dict[str, InFlight] = {}
        self._drop: set[str] = set()  # entries Redis may hold that no request owns any more (refused, settled)
        self._sending: set[str] = set()  # entries the checkpoint in progress is writing
        self._beat_at: float | None = None  # the meter clock at the last heartbeat Redis acknowledged
        self._healthy_since: float | None = None  # heartbeating without failure since (None: not in touch)
        self._reaped_at: float | None = None

    # ---- the request path (no I/O) --------------------------------------------------------------------------------

    def entry(self, adm: Admission, prompt_tokens: int) -> str:
        """This request's in-flight entry as the admission writes it: as if admitted (tracked). On a single node
        the admission script writes it (``HSET key GEN entry``, ``PEXPIRE key ttl_ms``) once it has admitted the
        request; on a cluster :meth:`registration` pipelines it beside the script."""
        entry = InFlight(adm, max(prompt_tokens, 0))
        return entry.encode(entry.state(), adm.admitted_at, tracked=True)

    def registration(self, gen_id: str, raw: str) -> Callable[[Any], None]:
        """The commands the admission pipeline adds on a cluster: the entry :meth:`entry` encoded."""

        def add(pipe: Any) -> None:
            pipe.hset(self.key, gen_id, raw)
            pipe.pexpire(self.key, self.ttl_ms)  # the hash may be new (emptied hashes vanish)

        return add

    def admitted(self, adm: Admission, prompt_tokens: int, registered: bool) -> None:
        entry = InFlight(adm, max(prompt_tokens, 0))
        entry.written = entry.state() if registered else None  # unregistered: the next checkpoint writes it
        self.live[adm.gen_id] = entry

    def refused(self, gen_id: str) -> None:
        """The admission pipeline may have written an entry for a request that is not going ahead."""
        self._drop.add(gen_id)

    def serving(self, gen_id: str, model: str, provider: str, upstream_model: str, stream: bool,
                usage: Callable[[], Usage] | None = None) -> None:
        entry = self.live.get(gen_id)
        if entry is not None:
            entry.model, entry.provider, entry.upstream_model, entry.stream = model, provider, upstream_model, stream
            entry.usage = usage

    def done(self, gen_id: str) -> None:
        """The request is settled (its settlement deletes its entry in Redis itself)."""
        if self.live.pop(gen_id, None) is None:
            return
        # a checkpoint in flight could write the entry back after the settlement's delete: the next one deletes it
        if gen_id in self._sending:
            self._drop.add(gen_id)

    # ---- background -----------------------------------------------------------------------------------------------

    async def tick(self) -> None:
        """One background pass: checkpoint (with the heartbeat when due), then reap when due."""
        now, o = self._clock(), self._options
        await self.checkpoint(beat=self._beat_at is None or now - self._beat_at >= o.heartbeat_interval)
        if self._reaped_at is None or now - self._reaped_at >= o.heartbeat_interval:
            self._reaped_at = now
            await self.reap()

    async def checkpoint(self, beat: bool = False) -> int:
        """One pipelined batch: the heartbeat (if ``beat``), every entry that changed, the entries to drop.
        Returns how many entries were written."""
        now = self._clock()
        self._drop -= self.live.keys()  # admitted after all (by the local limiter): its entry is written below
        states = {gen: (e, e.state()) for gen, e in self.live.items()}
        writes = {gen: e.encode(st, now) for gen, (e, st) in states.items() if st != e.written}
        drops = set(self._drop)
        if not (beat or writes or drops):
            return 0
        lay, r = self._layout, self._r

        async def send() -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                if beat:
                    pipe.zadd(lay.instances(), {self.id: int(now * 1000)})
                    pipe.pexpire(lay.instances(), self.ttl_ms)
                if writes:
                    pipe.hset(self.key, mapping=writes)
                if drops:
                    pipe.hdel(self.key, *drops)
                pipe.pexpire(self.key, self.ttl_ms)
                return list(await pipe.execute())

        self._sending = set(writes)
        try:
            replies = await self._store.call(send)
        except BaseException:
            self._healthy_since = None
            raise
        finally:
            self._sending = set()
        for gen, (e, st) in states.items():
            if gen in writes:
                e.written = st
        self._drop -= drops
        if beat:
            self._beat(now, added=int(replies[0]) == 1)
        return len(writes)

    def _beat(self, now: float, added: bool) -> None:
        if added and self._beat_at is not None:
            # a reaper took this instance for lost (it could not heartbeat for instance_lost_after) and settled
            # what it had in flight; those settle no-ops now. Write every entry again for the requests still to come.
            log.warning("metering: instance %s was presumed lost (no heartbeat for %ss); re-registering it",
                        self.id, self._options.instance_lost_after)
            for e in self.live.values():
                e.written = None
        self._beat_at = now
        if self._healthy_since is None:
            self._healthy_since = now

    async def reap(self) -> int:
        """Settle what lost instances left in flight; returns how many entries were handed to settlement."""
        now, lost_after = self._clock(), self._options.instance_lost_after
        if self._healthy_since is None or now - self._healthy_since < lost_after:
            return 0
        cutoff = int((now - lost_after) * 1000)
        lay, r = self._layout, self._r
        lost = await self._store.call(partial(r.zrangebyscore, lay.instances(), "-inf", cutoff, 0, _REAP_BATCH))
        n = 0
        for inst in lost:
            if inst == self.id:
                continue
            entries: dict[str, str] = await self._store.call(partial(r.hgetall, lay.inflight(inst)))
            if entries:
                log.warning("metering: instance %s is lost (no heartbeat for over %ss); settling the %d request(s) "
                            "it had in flight as gateway_lost", inst, lost_after, len(entries))
            for gen, raw in entries.items():
                try:
                    adm, record = lost_request(raw)
                except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
                    log.error("metering: unreadable in-flight entry %s of lost instance %s: %s", gen, inst, raw)
                    continue
                await self._settle(adm, record, only_if_reserved=adm.tracked)
                n += 1
            await self._scripts.run("reap", [lay.instances(), lay.inflight(inst)], [inst, cutoff])
        return n

    async def leave(self) -> None:
        """Clean shutdown with nothing in flight: forget this instance now rather than after instance_lost_after."""
        if self.live or self._beat_at is None:
            return
        lay, r = self._layout, self._r

        async def send() -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zrem(lay.instances(), self.id)
                pipe.delete(self.key)
                await pipe.execute()

        await self._store.call(send)
