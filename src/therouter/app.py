"""create_app(settings): builds every service once in the lifespan and hangs one Services object on app.state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from therouter import __version__
from therouter.api import admin, admin_keys, errors, ops
from therouter.api import anthropic as anthropic_routes
from therouter.api import openai as openai_routes
from therouter.api.middleware import BodyDeadlineMiddleware, FrontDoor
from therouter.config import Settings
from therouter.errors import GatewayError
from therouter.logs import setup_logging
from therouter.observability import worker_exit
from therouter.server import tune_gc
from therouter.services import build_services

log = logging.getLogger("therouter")


class App(FastAPI):
    """The FastAPI app behind a :class:`~therouter.api.middleware.FrontDoor`: every request enters there (the
    completion routes are served from it, everything else comes back to FastAPI's own stack)."""

    front: FrontDoor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.front(scope, receive, send)

    async def fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging(settings.server.log_format)
        services = await build_services(settings)
        app.state.services = services
        try:
            await services.meter.start()
        except GatewayError as e:
            log.error("the store is unreachable at start (%s); requests needing it will get 503 until it is back",
                      e.message)
        await services.health.start()
        _announce(services.health.report())
        tune_gc()
        try:
            yield
        finally:
            await services.health.aclose()
            await services.meter.aclose()
            for p in services.providers.values():
                await p.transport.aclose()
            await services.store.aclose()
            if services.gateway.tracing is not None:
                services.gateway.tracing.shutdown()
            worker_exit()

    # /openapi.json is served by api/ops.py, to the admin key only
    app = App(title="TheRouter", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
              openapi_url=None)
    app.front = FrontDoor(app.fastapi, openai_routes.PATHS, openai_routes.CompletionsRoute(app),
                          max_header_bytes=settings.server.max_header_bytes, limit=settings.server.max_concurrency)
    app.add_middleware(BodyDeadlineMiddleware, timeout=settings.server.body_timeout)  # the routes FastAPI serves
    errors.install(app)
    app.include_router(openai_routes.router)
    app.include_router(openai_routes.router, prefix="/api")  # OpenRouter's base path: /api/v1/...
    app.include_router(anthropic_routes.router)  # Anthropic's Messages API: /v1/messages, /anthropic/v1/messages
    app.include_router(admin.router)
    app.include_router(admin_keys.router)
    app.include_router(ops.router)
    return app


def _announce(report: dict[str, dict[str, object]]) -> None:
    """One line per worker once its first health checks ran: each provider's state."""
    states = {name: "ok" if st["ok"] else f"unavailable ({st['detail']})" for name, st in report.items()}
    log.info("worker ready; providers: %s", ", ".join(f"{n} {s}" for n, s in states.items()),
             extra={"event": "worker_ready", "providers": states})
