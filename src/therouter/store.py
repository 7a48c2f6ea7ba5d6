"""Redis: the one module that imports ``redis`` (with ``_resp``, its batches of the request path on a single node).

The client has short socket and connect timeouts and a breaker, so a hung or dead Redis never hangs a request:
calls fail fast with :class:`StoreUnavailable`. Every key is namespaced by ``key_prefix``.

**Redis Cluster**: a ``redis+cluster://`` (or ``rediss+cluster://``) URL, with one or more seed nodes
(``redis+cluster://:PASSWORD@10.0.0.1:7000,10.0.0.2:7000``), gives a :class:`RedisCluster` client with the same
policy: no command is re-sent after a timeout or a dropped connection (retries 0; MOVED / ASK redirections are
followed), and callers queue for one of ``max_connections`` operations in flight (up to ``pool_timeout``), as the
single node's blocking pool makes them do, instead of failing when a node's connections run out. Every multi-key
script keeps its keys in one hash slot (``{k:KEY_ID}``, ``{MODEL}``, ``{meter}``, ``{route}``); non-transactional
pipelines may span slots (redis-py's cluster pipeline sends each node its part); nothing uses MULTI across slots.
redis-py's cluster pipeline refuses EVALSHA, so a script and the commands pipelined with it on a single node are sent
side by side instead (:meth:`Store.script_with`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from therouter._resp import Command, Commands, Wire
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


class _Connection(aioredis.Connection):
    """redis-py's connection with hiredis' C command packer: packing a settle script's ~30 arguments in Python was
    ~5 % of a request's CPU (bench/profile.py); hiredis does it ~8x faster, byte for byte the same. Arguments it does
    not take (anything but str, bytes, int, float) go through redis-py's own packer, which raises its usual error."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:  # e.g. "SCRIPT LOAD": the server wants the words apart
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


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


CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_client(cfg: StoreConfig) -> RedisCluster:
    """``redis+cluster://[[user]:password@]host:port[,host:port...][/0]`` -> a cluster client (see the module doc)."""
    parts = urlsplit(cfg.redis_url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for hp in hosts.split(","):
        host, _, port = hp.strip().rpartition(":")
        nodes.append(ClusterNode(host.strip("[]") or "127.0.0.1", int(port or 6379)))
    return RedisCluster(
        startup_nodes=nodes, username=unquote(user) or None, password=unquote(password) or None,
        ssl=CLUSTER_SCHEMES[parts.scheme], decode_responses=True,
        socket_timeout=cfg.socket_timeout, socket_connect_timeout=cfg.connect_timeout,
        # per node: Store.call lets max_connections operations run at once, each using at most two connections to a
        # node (a script and its companion pipeline, side by side: Store._script_beside)
        max_connections=2 * cfg.max_connections, retry=Retry(NoBackoff(), 0), health_check_interval=0,
    )


class Store:
    def __init__(self, cfg: StoreConfig, breaker: StoreBreaker | None = None) -> None:
        self.cfg = cfg
        self.prefix = cfg.key_prefix
        self.cluster = is_cluster_url(cfg.redis_url)
        # Callers queue for a connection (up to pool_timeout) instead of opening one connection per concurrent
        # request: a burst of hundreds of requests then costs a short wait, not hundreds of connects whose socket
        # timeouts would read as an outage and flip every key to the fail-open path. A single node: a bounded,
        # blocking pool. A cluster (whose per-node pools fail at once when full): at most max_connections
        # operations in flight, so no node ever needs more connections than that.
        self._slots: asyncio.Semaphore | None = None
        self.redis: Any  # redis.asyncio.Redis or RedisCluster: the same command API
        if self.cluster:
            self.redis = cluster_client(cfg)
            self._slots = asyncio.Semaphore(cfg.max_connections)
        else:
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
                # plain TCP only (rediss:// and unix:// keep the connection class their scheme gives)
                **({"connection_class": _Connection} if cfg.redis_url.startswith("redis://") else {}),
            )
            self.redis = aioredis.Redis(connection_pool=pool)
        # the request path's batches (admission, settlement) on a plain-TCP single node: _resp.Wire
        self._wire = Wire(cfg.redis_url, max_connections=cfg.max_connections, socket_timeout=cfg.socket_timeout,
                          connect_timeout=cfg.connect_timeout, pool_timeout=cfg.pool_timeout) \
            if cfg.redis_url.startswith("redis://") and not self.cluster else None
        self.breaker = breaker or StoreBreaker()

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation under the breaker; any Redis failure becomes StoreUnavailable."""
        if not self.breaker.allow():
            raise StoreUnavailable("the store is unavailable; retry shortly", retry_after=2)
        try:
            result = await (fn() if self._slots is None else self._in_slot(fn))
        except ResponseError as e:
            code = outage_reply(e)
            if code is not None:  # OOM, READONLY, BUSY...: the store cannot serve us
                self.breaker.failure()
                raise StoreUnavailable(f"the store refused the operation ({code}); retry shortly",
                                       retry_after=2) from None
            self.breaker.success()  # the server answered: a script or command error, not an outage
            raise
        except (RedisError, RedisClusterException, OSError, TimeoutError) as e:
            self.breaker.failure()
            if not self.cluster:  # the server may have gone: its idle connections are not trusted again
                await self._drop_idle()
            raise StoreUnavailable(f"the store is unavailable ({type(e).__name__}); retry shortly",
                                   retry_after=2) from None
        self.breaker.success()
        return result

    async def _drop_idle(self) -> None:
        if self._wire is not None:
            await self._wire.aclose()
        with contextlib.suppress(Exception):  # closing what is already broken
            await self.redis.connection_pool.disconnect(inuse_connections=False)

    async def _in_slot(self, fn: Callable[[], Awaitable[T]]) -> T:
        assert self._slots is not None
        try:
            async with asyncio.timeout(self.cfg.pool_timeout):  # (not wait_for: it can drop an acquired permit)
                await self._slots.acquire()
        except TimeoutError:
            raise TimeoutError("no connection to the store became free in time") from None
        try:
            return await fn()
        finally:
            self._slots.release()

    async def script_with(self, script: Any, keys: Sequence[str], args: Sequence[str | int],
                          extra: Callable[[Any], None]) -> Any:
        """EVALSHA of a registered script plus the commands ``extra(pipe)`` adds, in one non-transactional pipeline:
        one round trip (redis-py's own pipelined scripts would first ask ``SCRIPT EXISTS``, a second one). After a
        ``NOSCRIPT`` (the script did not run, e.g. a restarted Redis) the script is loaded and the whole batch sent
        again, so ``extra`` must add idempotent commands only. Returns the script's reply; raises the first error."""
        if self.cluster:
            return await self._script_beside(script, keys, args, extra)
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

    async def script_with_many(self, script: Any,
                               items: Sequence[tuple[Sequence[str], Sequence[str | int], Callable[[Any], None] | None]]
                               ) -> list[Any]:
        """:meth:`script_with` for several ``(keys, args, extra)`` at once (``extra`` None: the script alone), in one
        pipeline (a single node only).
        Returns one entry per item: the script's reply, or the first error among its commands (the other items ran).
        Items answered ``NOSCRIPT`` (they did not run) are sent again, with their idempotent extras, once the script
        is loaded. A connection failure raises (the outcome of every item is then unknown)."""
        assert not self.cluster, "script_with_many needs a single node"
        replies: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        for _ in range(2):
            spans: list[tuple[int, int, int]] = []
            batch = Commands()
            for i in todo:
                keys, args, extra = items[i]
                start = len(batch)
                batch.evalsha(script.sha, len(keys), *keys, *args)
                if extra is not None:
                    extra(batch)
                spans.append((i, start, len(batch)))
            got = await self.send(batch.items)
            missing = []
            for i, a, b in spans:
                part = got[a:b]
                if isinstance(part[0], NoScriptError):
                    missing.append(i)
                    continue
                replies[i] = next((r for r in part if isinstance(r, Exception)), part[0])
            if not missing:
                return replies
            script.sha = await self.redis.script_load(script.script)
            todo = missing
        for i in todo:
            replies[i] = NoScriptError("the script could not be loaded")
        return replies

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        """Commands in one round trip (a single node), replies in order, an error reply as its exception (the
        others ran); a connection failure raises. Replies are Redis' own (``OK``, not redis-py's ``True``)."""
        if self._wire is not None:
            return await self._wire.execute(commands)
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in commands:
                pipe.execute_command(*c)
            return list(await pipe.execute(raise_on_error=False))

    def reply_error(self, e: Exception) -> Exception:
        """An error reply of one command in a pipeline, as :meth:`call` would raise it: an outage reply (OOM,
        READONLY, ...) becomes ``StoreUnavailable``; any other stays what it is."""
        if isinstance(e, ResponseError) and outage_reply(e) is not None:
            self.breaker.failure()
            return StoreUnavailable(f"the store refused the operation ({outage_reply(e)}); retry shortly",
                                    retry_after=2)
        return e

    async def script_many(self, script: Any, calls: Sequence[tuple[Sequence[str], Sequence[str | int]]]) -> list[Any]:
        """One registered script run once per ``(keys, args)`` of ``calls``: :meth:`scripts_many`."""
        return await self.scripts_many([(script, keys, args) for keys, args in calls])

    async def scripts_many(self, calls: Sequence[tuple[Any, Sequence[str], Sequence[str | int]]]) -> list[Any]:
        """Registered scripts, one run per ``(script, keys, args)`` of ``calls``, all in one non-transactional
        pipeline (a single node only: redis-py's cluster pipeline refuses EVALSHA). Returns one reply per call, an
        error reply as its exception (the others ran); calls answered ``NOSCRIPT`` (they did not run) are sent again
        once their script is loaded. A connection failure raises (the outcome of every call is then unknown)."""
        assert not self.cluster, "scripts_many needs a single node"
        replies: list[Any] = [None] * len(calls)
        todo: Sequence[int] = range(len(calls))
        for _ in range(2):
            got = await self.send([("EVALSHA", calls[i][0].sha, len(calls[i][1]), *calls[i][1], *calls[i][2])
                                   for i in todo])
            missing = []
            for i, r in zip(todo, got):
                replies[i] = r
                if isinstance(r, NoScriptError):
                    missing.append(i)
            if not missing:
                return replies
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                script.sha = await self.redis.script_load(script.script)
            todo = missing
        return replies

    async def _script_beside(self, script: Any, keys: Sequence[str], args: Sequence[str | int],
                             extra: Callable[[Any], None]) -> Any:
        """On a cluster, redis-py's pipeline refuses EVALSHA, so the script (on its keys' node; reloaded there after
        a ``NOSCRIPT``) and the extra commands (a pipeline of their own) are sent side by side: the caller still
        waits for one round trip. Same contract as :meth:`script_with`."""

        async def others() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                extra(pipe)
                return list(await pipe.execute(raise_on_error=False))

        reply, replies = await asyncio.gather(script(keys=list(keys), args=list(args)), others(),
                                              return_exceptions=True)
        for r in (reply, *(replies if isinstance(replies, list) else [replies])):
            if isinstance(r, BaseException):
                raise r
        return reply

    async def ping(self) -> bool:
        try:
            return bool(await self.call(self.redis.ping))
        except StoreUnavailable:
            return False

    async def aclose(self) -> None:
        if self._wire is not None:
            await self._wire.aclose()
        await self.redis.aclose()

    # ---- API keys -----------------------------------------------------------------------------------------------

    async def create_key(self, name: str, **fields: Any) -> tuple[str, KeyRecord]:
        """A new key: its plaintext (shown once, never stored) and its record. Three keys in three hash slots,
        written one after the other (no MULTI, so it works on a cluster) in the order that leaves nothing harmful
        half-done: listed, then findable by id, then -- last -- usable. A failure before the end raises, so the
        plaintext is never handed out for a key that does not work; what was written is an id without a record,
        which listings skip."""
        plaintext = new_key()
        rec = KeyRecord(id="key_" + secrets.token_hex(6), name=name, hint=display(plaintext), **fields)
        h = hash_key(plaintext)
        await self.call(lambda: self.redis.sadd(self.k("keys"), rec.id))
        await self.call(lambda: self.redis.set(self.k("keyid", rec.id), h))
        await self.call(lambda: self.redis.hset(self.k("key", h), mapping=rec.to_redis()))
        return plaintext, rec

    async def key_by_hash(self, h: str) -> KeyRecord | None:
        data = await self.call(lambda: self.redis.hgetall(self.k("key", h)))
        return KeyRecord.from_redis(data) if data else None

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(await self.call(lambda: self.redis.smembers(self.k("keys"))))
        found = await self.keys_by_ids(ids)
        return [found[i] for i in ids if i in found]

    async def keys_by_ids(self, ids: Sequence[str]) -> dict[str, KeyRecord]:
        """The records of these key ids (unknown ids left out), in two pipelined round trips."""
        if not ids:
            return {}

        async def read(cmds: Sequence[tuple[str, str]]) -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for cmd, key in cmds:
                    getattr(pipe, cmd)(key)
                return list(await pipe.execute())

        hashes = await self.call(lambda: read([("get", self.k("keyid", i)) for i in ids]))
        known = [(i, h) for i, h in zip(ids, hashes, strict=True) if h]
        data = await self.call(lambda: read([("hgetall", self.k("key", h)) for _, h in known])) if known else []
        return {i: KeyRecord.from_redis(d) for (i, _), d in zip(known, data, strict=True) if d}

    async def revoke_key(self, key_id: str) -> bool:
        h = await self.call(lambda: self.redis.get(self.k("keyid", key_id)))
        if not h:
            return False
        await self.call(lambda: self.redis.hset(self.k("key", h), "revoked", "1"))
        return True

    async def update_key(self, key_id: str, **changes: Any) -> KeyRecord | None:
        """Change some of a key's settings (``KeyRecord`` attributes); returns the new record, None if no such key.
        Only the changed fields are written, so concurrent updates of different fields never undo each other.
        Every gateway worker sees the change within the auth cache's freshness (``auth.FRESH_SECONDS``)."""
        h = await self.call(lambda: self.redis.get(self.k("keyid", key_id)))
        if not h:
            return None
        data = await self.call(lambda: self.redis.hgetall(self.k("key", h)))
        if not data:
            return None
        rec = replace(KeyRecord.from_redis(data), **changes)
        fields = {f: v for f, v in rec.to_redis().items() if f in changes}
        if fields:
            await self.call(lambda: self.redis.hset(self.k("key", h), mapping=fields))
        return rec

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
