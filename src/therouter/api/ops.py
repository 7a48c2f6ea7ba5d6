"""/health (alive), /ready (store reachable and a deployment usable), /metrics, /openapi.json (admin key)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from therouter.api.deps import AdminDep, ServicesDep
from therouter.auth import admin_ok
from therouter.errors import AuthenticationFailed
from therouter.observability import exposition

router = APIRouter()


@router.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/ready")
async def ready(services: ServicesDep) -> Response:
    store_ok = await services.store.ping()
    usable = []
    for mid, card in services.settings.models.items():
        for d in card.deployments:
            p = services.providers[d.provider]
            if p.usable[0] and services.health.unfit(mid, d, p) is None:
                usable.append(f"{mid}@{d.provider}")
    ok = store_ok and bool(usable)
    body = {"status": "ready" if ok else "not_ready", "store": "ok" if store_ok else "unreachable",
            "usable_deployments": usable, "providers": services.health.report()}
    return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Every worker's metrics (see observability.py), plus the store's reachability and the journal's backlog read
    now. With ``server.metrics_token`` set, only for ``Authorization: Bearer <token>``."""
    token = services.settings.server.metrics_token
    if token is not None and not admin_ok(token.get_secret_value(), request.headers.get("authorization")):
        raise AuthenticationFailed("/metrics needs 'Authorization: Bearer <server.metrics_token>'.",
                                   code="invalid_metrics_token")
    store_up = await services.store.ping()
    backlog = await asyncio.to_thread(services.meter.journal.backlog)
    body = exposition(services.metrics, {
        "therouter_store_up": ("1 when the store (Redis) answered this scrape's ping", 1.0 if store_up else 0.0),
        "therouter_journal_backlog": ("Usage records waiting in the local journal for the store", float(backlog)),
    })
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", dependencies=[AdminDep], include_in_schema=False)
async def openapi(request: Request) -> Response:
    schema: dict[str, Any] = request.app.openapi()
    return Response(orjson.dumps(schema), media_type="application/json")
