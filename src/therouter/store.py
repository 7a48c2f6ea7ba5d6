"""Redis: the one module that imports ``redis``.

The client has short socket and connect timeouts and a breaker, so a hung or dead Redis never hangs a request:
calls fail fast with :class:`StoreUnavailable`. Every key is namespaced by ``key_prefix``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from therouter.config import StoreConfig
from therouter.errors import StoreUnavailable
from therouter.keys import KeyRecord, display, hash_key, new_key

T = TypeVar("T")
# Error replies that mean "the store cannot serve us right now", not "this command is wrong". redis-py turns most of
# them into their own exception classes and strips the prefix from the message (OOM -> OutOfMemoryError, READONLY ->
# ReadOnlyError, ...; LOADING -> BusyLoadingError, a ConnectionError, is an outage anyway); the rest (BUSY,
# NOREPLICAS) stay plain ResponseErrors that keep their prefix.
_OUTAGE_CLASSES: tuple[tuple[type[ResponseError], str], ...] = (
    (OutOfMemoryError, "OOM"), (ReadOnlyError, "READONLY"), (TryAgainError, "TRYAGAIN"),
    (ClusterDownError, "CLUSTERDOWN"),  # MasterDownError is a ClusterDownError
)
_OUTAGE_REPLIES = frozenset({"OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS"})


def outage_reply(e: ResponseError) -> str | None:
    """The reply code (``OOM``, ``READONLY``, ...) when an error reply means the store is out of service, else None."""
    for cls, code in _OUTAGE_CLASSES:
        if isinstance(e, cls):
            return str(getattr(e, "status_code", None) or code)
    prefix = str(e).split(" ", 1)[0]
    return prefix if prefix in _OUTAGE_REPLIES else None


class StoreBreaker:
    """Opens after `threshold` consecutive failures; while open, calls fail at once; a probe is let through every
    `cooldown` seconds. Clock injected."""

    def __init__(self, threshold: int = 5, cooldown: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown, self.clock = threshold, cooldown, clock
        self.failures = 0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self.cooldown:
            self.opened_at = self.clock()  # one probe per cooldown
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = self.clock()

    @property
    def open(self) -> bool:
        return self.opened_at is not None


class Store:
    def __init__(self, cfg: StoreConfig, breaker: StoreBreaker | None = None) -> None:
        self.cfg = cfg
        self.prefix = cfg.key_prefix
        # A bounded pool that makes callers queue for a connection (up to pool_timeout) instead of opening one
        # connection per concurrent request: a burst of hundreds of requests then costs a short wait, not hundreds
        # of connects whose socket timeouts would read as an outage and flip every key to the fail-open path.
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.redis_url,
            max_connections=cfg.max_connections,
            timeout=cfg.pool_timeout,
            socket_timeout=cfg.socket_timeout,
            socket_connect_timeout=cfg.connect_timeout,
            retry_on_timeout=False,  # never re-send a non-idempotent command after a timeout
            retry=None,
            decode_responses=True,
            health_check_interval=0,
        )
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self.breaker = breaker or StoreBreaker()

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation under the breaker; any Redis failure becomes StoreUnavailable."""
        if not self.breaker.allow():
            raise StoreUnavailable("the store is unavailable; retry shortly", retry_after=2)
        try:
            result = await fn()
        except ResponseError as e:
            code = outage_reply(e)
            if code is not None:  # OOM, READONLY, BUSY...: the store cannot serve us
                self.breaker.failure()
                raise StoreUnavailable(f"the store refused the operation ({code}); retry shortly",
                                       retry_after=2) from None
            self.breaker.success()  # the server answered: a script or command error, not an outage
            raise
        except (RedisError, OSError, TimeoutError) as e:
            self.breaker.failure()
            raise StoreUnavailable(f"the store is unavailable ({type(e).__name__}); retry shortly",
                                   retry_after=2) from None
        self.breaker.success()
        return result

    async def script_with(self, script: Any, keys: Sequence[str], args: Sequence[str | int],
                          extra: Callable[[Any], None]) -> Any:
        """EVALSHA of a registered script plus the commands ``extra(pipe)`` adds, in one non-transactional pipeline:
        one round trip (redis-py's own pipelined scripts would first ask ``SCRIPT EXISTS``, a second one). After a
        ``NOSCRIPT`` (the script did not run, e.g. a restarted Redis) the script is loaded and the whole batch sent
        again, so ``extra`` must add idempotent commands only. Returns the script's reply; raises the first error."""
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                extra(pipe)
                replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[0], NoScriptError):
                script.sha = await self.redis.script_load(script.script)
                continue
            for r in replies:
                if isinstance(r, Exception):
                    raise r
            return replies[0]
        raise NoScriptError("the script could not be loaded")

    async def ping(self) -> bool:
        try:
            return bool(await self.call(self.redis.ping))
        except StoreUnavailable:
            return False

    async def aclose(self) -> None:
        await self.redis.aclose()

    # ---- API keys -----------------------------------------------------------------------------------------------

    async def create_key(self, name: str, **limits: Any) -> tuple[str, KeyRecord]:
        plaintext = new_key()
        rec = KeyRecord(id="key_" + secrets.token_hex(6), name=name, hint=display(plaintext), **limits)
        h = hash_key(plaintext)

        async def write() -> None:
            async with self.redis.pipeline(transaction=True) as p:
                p.hset(self.k("key", h), mapping=rec.to_redis())
                p.set(self.k("keyid", rec.id), h)
                p.sadd(self.k("keys"), rec.id)
                await p.execute()

        await self.call(write)
        return plaintext, rec

    async def key_by_hash(self, h: str) -> KeyRecord | None:
        data = await self.call(lambda: self.redis.hgetall(self.k("key", h)))
        return KeyRecord.from_redis(data) if data else None

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        h = await self.call(lambda: self.redis.get(self.k("keyid", key_id)))
        return await self.key_by_hash(h) if h else None

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(await self.call(lambda: self.redis.smembers(self.k("keys"))))
        out = []
        for key_id in ids:
            rec = await self.key_by_id(key_id)
            if rec:
                out.append(rec)
        return out

    async def revoke_key(self, key_id: str) -> bool:
        h = await self.call(lambda: self.redis.get(self.k("keyid", key_id)))
        if not h:
            return False
        await self.call(lambda: self.redis.hset(self.k("key", h), "revoked", "1"))
        return True

    async def update_key(self, key_id: str, **fields: str) -> bool:
        h = await self.call(lambda: self.redis.get(self.k("keyid", key_id)))
        if not h:
            return False
        await self.call(lambda: self.redis.hset(self.k("key", h), mapping=fields))
        return True

    # ---- routing state shared across workers (drains, cooldowns): see routing/shared.py -------------------------

    def _route(self, name: str) -> str:
        return self.k("{route}", name)  # one hash slot, so the MGET below also works on a cluster

    async def route_get(self, names: list[str]) -> list[str | None]:
        keys = [self._route(n) for n in names]
        return await self.call(lambda: self.redis.mget(keys)) if keys else []

    async def route_set(self, name: str, value: str, ttl: float) -> None:
        await self.call(lambda: self.redis.set(self._route(name), value, px=max(int(ttl * 1000), 1)))

    async def route_delete(self, name: str) -> None:
        await self.call(lambda: self.redis.delete(self._route(name)))
