"""/health (alive), /ready (store reachable and a deployment usable), /metrics."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from therouter.api.deps import ServicesDep

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
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
