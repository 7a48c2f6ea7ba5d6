"""Provider health: active checks of self-hosted servers and the model-list check of hosted providers.

- Self-hosted (vLLM / SGLang): ``GET /health`` at start-up and every ``routing.health_check_interval`` seconds (10);
  a server that is not running is reported and skipped by routing until a check succeeds again.
- Hosted: ``GET /models`` at start-up and every ``server.model_check_interval``; a deployment whose upstream id the
  provider no longer lists is reported (log line and /ready detail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from therouter.config import Deployment, Settings
from therouter.errors import GatewayError
from therouter.providers.base import Provider

log = logging.getLogger("therouter.health")


@dataclass
class ProviderHealth:
    ok: bool = True
    detail: str = "not checked yet"
    checked_at: float = 0.0
    missing_models: list[str] = field(default_factory=list)


class HealthMonitor:
    def __init__(self, settings: Settings, providers: dict[str, Provider],
                 on_start: list[Callable[[], Awaitable[Any]]] | None = None,
                 on_stop: list[Callable[[], Awaitable[Any]]] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self.providers = providers
        self.interval = settings.routing.health_check_interval
        self._sleep = sleep  # injected: tests see the interval without waiting for it
        # routing's other background work rides on this lifecycle (e.g. the first read of shared drains)
        self.on_start = list(on_start or [])
        self.on_stop = list(on_stop or [])
        self.state: dict[str, ProviderHealth] = {n: ProviderHealth() for n in providers}
        self._task: asyncio.Task[None] | None = None
        self._last_models = 0.0

    # router filter
    def unfit(self, model_id: str, dep: Deployment, p: Provider) -> str | None:
        st = self.state.get(p.name)
        if st is not None and not st.ok:
            return f"unhealthy: {st.detail}"
        return None

    async def check_all(self, models: bool = True) -> None:
        jobs = [self._check_health(p) for p in self.providers.values() if p.health_url() and p.usable[0]]
        if models:
            jobs += [self._check_models(p) for p in self.providers.values() if p.config.is_hosted and p.usable[0]]
        await asyncio.gather(*jobs, return_exceptions=True)

    async def start(self) -> None:
        for hook in self.on_start:
            try:
                await hook()
            except Exception:
                log.exception("routing start-up hook failed")
        await self.check_all()
        self._last_models = time.monotonic()
        for name, p in self.providers.items():
            usable, why = p.usable
            st = self.state[name]
            if not usable:
                st.ok, st.detail = False, f"not configured: {why}"
                log.warning("provider %s is skipped by routing: %s", name, why)
            elif not st.ok:
                log.warning("provider %s is not reachable (%s): skipped until a health check succeeds", name,
                            st.detail)
        self._task = asyncio.create_task(self._loop())

    async def aclose(self) -> None:
        for hook in self.on_stop:
            try:
                await hook()
            except Exception:
                log.exception("routing shutdown hook failed")
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # the loop logs its own failures
                await self._task

    async def _loop(self) -> None:
        while True:
            await self._sleep(self.interval)
            every = self.settings.server.model_check_interval
            due = every > 0 and time.monotonic() - self._last_models >= every
            if due:
                self._last_models = time.monotonic()
            try:
                await self.check_all(models=due)
            except Exception:
                log.exception("health check failed")

    async def _get(self, p: Provider, url: str, timeout: float = 3.0) -> tuple[int, bytes]:
        return await p.get(url, timeout)

    async def _check_health(self, p: Provider) -> None:
        st = self.state[p.name]
        url = p.health_url()
        assert url
        try:
            status, _ = await self._get(p, url)
            ok, detail = status == 200, ("healthy" if status == 200 else f"health check answered {status}")
        except (GatewayError, TimeoutError) as e:
            ok, detail = False, (e.message if isinstance(e, GatewayError) else "health check timed out")
        if ok != st.ok and st.checked_at:
            log.warning("provider %s is now %s (%s)", p.name, "healthy" if ok else "unhealthy", detail)
        st.ok, st.detail, st.checked_at = ok, detail, time.time()

    async def _check_models(self, p: Provider) -> None:
        st = self.state[p.name]
        try:
            status, body = await self._get(p, p.models_url(), timeout=10.0)
            if status != 200:
                log.warning("provider %s: GET /models answered %s", p.name, status)
                return
            listed = {m.get("id") for m in orjson.loads(body).get("data", []) if isinstance(m, dict)}
        except (GatewayError, TimeoutError, orjson.JSONDecodeError, AttributeError) as e:
            log.warning("provider %s: GET /models failed: %s", p.name, getattr(e, "message", type(e).__name__))
            return
        wanted = {d.model for m in self.settings.models.values() for d in m.deployments if d.provider == p.name}
        missing = sorted(wanted - listed)
        if missing:
            log.warning("provider %s no longer lists %s: update the deployments that use them",
                        p.name, ", ".join(missing))
        st.missing_models = missing

    def report(self) -> dict[str, Any]:
        return {n: {"ok": s.ok, "detail": s.detail, "missing_models": s.missing_models}
                for n, s in self.state.items()}
