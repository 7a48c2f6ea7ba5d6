"""/admin: operator endpoints, behind THEROUTER_ADMIN_KEY (policy applied where the router is included)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from therouter.api.deps import AdminDep, ServicesDep
from therouter.errors import InvalidRequest, ModelNotFound

router = APIRouter(prefix="/admin", dependencies=[AdminDep])


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


@router.get("/prices")
async def list_prices(services: ServicesDep) -> Response:
    return _json({"object": "list", "data": await services.meter.list_prices()})


@router.put("/prices/{model_id:path}")
async def set_price(model_id: str, request: Request, services: ServicesDep) -> Response:
    if model_id not in services.settings.models:
        raise ModelNotFound(f"The model `{model_id}` is not in the catalogue.", param="model")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body must be JSON: {input, cached_input, output} in USD per 1M tokens.") from None
    if not isinstance(body, dict) or "input" not in body or "output" not in body:
        raise InvalidRequest("The body must be {input, cached_input?, output} in USD per 1M tokens.")
    for k in ("input", "cached_input", "output"):
        v = body.get(k)
        if k in body and (isinstance(v, bool) or not isinstance(v, (int, float, str))):
            raise InvalidRequest(f"'{k}' must be a number of USD per 1M tokens.", param=k)
    try:
        pv = await services.meter.set_price(model_id, body["input"], body.get("cached_input", body["input"]),
                                            body["output"], body.get("effective_at"))
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    return _json(pv.public())


@router.get("/keys")
async def list_keys(services: ServicesDep) -> Response:
    return _json({"object": "list", "data": [k.public() for k in await services.store.list_keys()]})


@router.get("/usage")
async def usage(services: ServicesDep, key: str | None = None, days: int = 7) -> Response:
    return _json({"object": "list", "data": await services.meter.usage_rows(key, max(1, min(days, 366)))})
