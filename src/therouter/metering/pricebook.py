"""The price table: versions in Redis, a local copy for the request path.

Rules:

* **Config vs operator.** At start every configured model's price is offered to Redis as a ``config`` version. It is
  written only when the model has no price yet (as version 1, ``effective_at`` 0: it has always applied) or when the
  newest version also came from config and the numbers differ (a new version, effective now). A price set by an
  operator (``set_price``, source ``operator``) is never clobbered by the config file; to go back to config numbers
  an operator sets them explicitly. The compare-and-write is one script, so gateways starting together agree.
* **Versions.** ``price:{MODEL}`` holds the newest version written (possibly scheduled for later);
  ``pricehist:{MODEL}`` holds every version by ``effective_at``. The price in force at ``t`` is the newest
  ``effective_at`` not after ``t`` (:func:`prices.price_at`).
* **Request path.** Admission reads the local copy only (no extra round trip); the background task refreshes it
  every ``refresh`` seconds and ``set_price`` updates it at once, so another process sees an operator's change
  within ``refresh`` seconds. Before Redis was ever reached, the copy holds the config prices as version 0.
* **Bounded input.** An operator's price is a finite number of USD per 1M tokens from 0 to ``MAX_PRICE_USD``
  (1,000,000) with at most 9 decimals; ``effective_at`` is whole unix seconds from 0 to 10 years ahead of now.
  Anything else is a 400 naming the field. A stored version that is not what this build writes (by hand, by an
  older build) is skipped with a warning, so it can never break a listing, ``/v1/models`` or a request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from therouter.config import MAX_PRICE_USD, Settings, usd_to_nano
from therouter.errors import InvalidRequest, ModelNotFound
from therouter.metering.layout import Layout
from therouter.metering.prices import PriceVersion, price_at
from therouter.metering.scripts import Scripts
from therouter.store import Store

log = logging.getLogger("therouter.metering")
MAX_AHEAD = 10 * 366 * 86_400  # s: how far ahead a price may be scheduled
_MAX_WARNED = 1_000


def price_input(input_usd: Any, cached_input_usd: Any, output_usd: Any, effective_at: Any,
                now: float) -> tuple[int, int, int, int]:
    """An operator's price -> (input, cached_input, output in nano-USD per 1M tokens, effective_at in unix s).
    Raises InvalidRequest naming the offending field (see the module rule)."""
    nano = [_usd(value, what) for value, what in ((input_usd, "input"), (cached_input_usd, "cached_input"),
                                                  (output_usd, "output"))]
    return nano[0], nano[1], nano[2], _effective_at(effective_at, now)


def _usd(value: Any, what: str) -> int:
    try:
        return usd_to_nano(value, what, MAX_PRICE_USD)
    except ValueError as e:
        raise InvalidRequest(f"{e} (per 1M tokens).", param=what, code="invalid_value") from None


def _effective_at(v: Any, now: float) -> int:
    if v is None:
        return int(now)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    latest = int(now) + MAX_AHEAD
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= latest:
        raise InvalidRequest(f"effective_at must be whole unix seconds from 0 to {latest} (10 years from now).",
                             param="effective_at", code="invalid_value")
    return v


class PriceBook:
    def __init__(self, store: Store, settings: Settings, layout: Layout, scripts: Scripts,
                 clock: Callable[[], float]) -> None:
        self._store, self._layout, self._scripts, self._clock = store, layout, scripts, clock
        self._config = {
            name: PriceVersion(name, 0, 0, m.pricing.input, m.pricing.cached_input, m.pricing.output, "config",
                               m.pricing.cache_write)
            for name, m in settings.models.items()
        }
        self._versions: dict[str, list[PriceVersion]] = {name: [p] for name, p in self._config.items()}
        # model -> (its versions list, from, until, the version in force from `from` until `until`): what current()
        # found last, so that a request does not scan the versions (a refresh puts a new list: found again)
        self._current: dict[str, tuple[list[PriceVersion], float, float, PriceVersion]] = {}
        self._warned: set[str] = set()  # bad stored versions already logged

    @property
    def models(self) -> list[str]:
        return sorted(self._config)

    def current(self, model: str, at: float | None = None) -> PriceVersion:
        """The version in force at ``at`` (default now) from the local copy; raises ModelNotFound."""
        when = self._clock() if at is None else at
        versions = self._versions.get(model)
        last = self._current.get(model)
        if last is not None and last[0] is versions and last[1] <= when < last[2]:
            return last[3]
        found = price_at(versions or (), when)
        if found is None:
            raise ModelNotFound(f"The model `{model}` has no price", param="model")
        if versions is not None:  # in force from its effective_at until the next version's
            until = min((v.effective_at for v in versions if v.effective_at > when), default=math.inf)
            self._current[model] = (versions, found.effective_at, until, found)
        return found

    async def load_config(self) -> None:
        """Offer every configured price to Redis (see the module rule), then refresh the local copy."""
        for p in self._config.values():
            await self._write(p, "config", int(self._clock()))
        await self.refresh()

    async def refresh(self, models: list[str] | None = None) -> None:
        names = models or self.models

        async def read() -> list[Any]:
            async with self._store.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.zrange(self._layout.pricehist(name), 0, -1)
                return list(await pipe.execute())

        for name, members in zip(names, await self._store.call(read), strict=True):
            versions = [v for v in (self._parse(name, m) for m in members) if v is not None]
            if versions:
                self._versions[name] = versions

    def _parse(self, model: str, member: str) -> PriceVersion | None:
        try:
            v = PriceVersion.from_dict(orjson.loads(member))
            if v.model != model:
                raise ValueError(f"it names the model {v.model!r}")
            return v
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            if member not in self._warned and len(self._warned) < _MAX_WARNED:
                self._warned.add(member)
                log.warning("metering: a stored price version of %s is skipped (%s): %.200s", model,
                            f"{type(e).__name__}: {e}", member)
            return None

    async def set(self, model: str, input_usd: Any, cached_input_usd: Any, output_usd: Any,
                  effective_at: int | None = None, cache_write_usd: Any = None) -> PriceVersion:
        """``cache_write_usd`` None: cache writes are billed at ``input`` under this version."""
        if model not in self._config:
            raise ModelNotFound(f"The model `{model}` is not in the catalogue", param="model")
        inp, cached, out, when = price_input(input_usd, cached_input_usd, output_usd, effective_at, self._clock())
        write = None if cache_write_usd is None else _usd(cache_write_usd, "cache_write")
        p = PriceVersion(model, 0, when, inp, cached, out, "operator", write)
        version = await self._write(p, "operator", when)
        await self.refresh([model])
        return next((v for v in self._versions[model] if v.version == version), replace(p, version=version))

    async def get(self, model: str) -> PriceVersion | None:
        if model not in self._config:
            return None
        await self.refresh([model])
        try:
            return self.current(model)
        except ModelNotFound:
            return None

    async def all(self) -> list[dict[str, Any]]:
        """Per model: the price in force now and every version known."""
        await self.refresh()
        out = []
        for name in self.models:
            versions = sorted(self._versions[name], key=lambda v: (v.effective_at, v.version))
            now = price_at(versions, self._clock())
            out.append({"model": name, "current": now.public() if now else None,
                        "versions": [v.public() for v in versions]})
        return out

    async def _write(self, p: PriceVersion, source: str, effective_at: int) -> int:
        keys = [self._layout.price(p.model), self._layout.pricehist(p.model)]
        args: list[str | int] = [source, p.model, p.input, p.cached_input, p.output, effective_at,
                                 "" if p.cache_write is None else p.cache_write]
        written, version = await self._scripts.run("price_set", keys, args)
        if int(written):
            fields = replace(p, version=int(version), effective_at=effective_at, source=source).public()
            log.info("metering: price of %s is now version %s (%s)", p.model, version, source,
                     extra={**fields, "event": "price_change"})
        return int(version)
