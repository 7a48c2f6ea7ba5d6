"""/admin/keys and /admin/usage: API keys and their usage over HTTP, behind THEROUTER_ADMIN_KEY (the CLI's
``therouter keys`` and ``therouter usage`` run the same operations).

A key's plaintext is in the answer to its creation only; listings show its hint (prefix and last four characters).
Settings are checked by :mod:`therouter.keyspec`; a change is seen by every worker within the auth cache's freshness
(2 s). A path id that is not a key id (``key_...``) is never echoed: it may be a key pasted by mistake.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from therouter.api.deps import AdminDep, ServicesDep
from therouter.errors import InvalidRequest, NotFound
from therouter.keys import KEY_ID, KeyRecord
from therouter.keyspec import key_fields
from therouter.metering.usage import usage_query
from therouter.services import Services

router = APIRouter(prefix="/admin", dependencies=[AdminDep])


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body must be a JSON object.") from None


async def _key(services: Services, key_id: str) -> KeyRecord:
    rec = (await services.store.keys_by_ids([key_id])).get(key_id) if KEY_ID.fullmatch(key_id) else None
    if rec is None:
        shown = f"`{key_id}`" if KEY_ID.fullmatch(key_id) else "that id (key ids look like key_...)"
        raise NotFound(f"No key with {shown}.", param="id")
    return rec


@router.post("/keys")
async def create_key(request: Request, services: ServicesDep) -> Response:
    now = time.time()
    fields = key_fields(await _body(request), services.settings.models, now, creating=True,
                        aliases=services.settings.aliases)
    plaintext, rec = await services.store.create_key(fields.pop("name"), **fields)
    return _json({"object": "api_key", "key": plaintext, **rec.public(now)}, status=201)


@router.get("/keys")
async def list_keys(services: ServicesDep) -> Response:
    now, keys = time.time(), await services.store.list_keys()
    last = await services.meter.reports.last_used([k.id for k in keys])
    return _json({"object": "list", "data": [{**k.public(now), "last_used_at": last[k.id]} for k in keys]})


@router.get("/keys/{key_id}")
async def get_key(key_id: str, services: ServicesDep) -> Response:
    rec = await _key(services, key_id)
    return _json({**rec.public(), **await services.meter.reports.key_detail(rec)})


@router.patch("/keys/{key_id}")
async def update_key(key_id: str, request: Request, services: ServicesDep) -> Response:
    rec = await _key(services, key_id)
    if rec.revoked:
        raise InvalidRequest(f"The key `{key_id}` is revoked; a revoked key cannot be changed.", param="id",
                             code="key_revoked", status=409)
    changes = key_fields(await _body(request), services.settings.models, time.time(), creating=False,
                         aliases=services.settings.aliases)
    updated = await services.store.update_key(key_id, **changes)
    if updated is None:
        raise NotFound(f"No key with `{key_id}`.", param="id")
    return _json(updated.public())


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, services: ServicesDep) -> Response:
    rec = await _key(services, key_id)
    await services.store.revoke_key(rec.id)
    return _json({"id": rec.id, "object": "api_key", "revoked": True})


@router.get("/usage")
async def usage(services: ServicesDep, request: Request) -> Response:
    """?group_by=key,model,provider,day (any of them; default key,model,day) &from=&to= (YYYY-MM-DD, UTC) or &days=N
    (7), &key=ID for one key."""
    qp = request.query_params
    days = qp.get("days")
    if days is not None and not days.isdigit():
        raise InvalidRequest("days must be a whole number of days.", param="days", code="invalid_value")
    key_id = qp.get("key")
    if key_id is not None and not KEY_ID.fullmatch(key_id):
        raise InvalidRequest("key must be a key id (key_...).", param="key", code="invalid_value")
    q = usage_query(qp.get("group_by"), qp.get("from"), qp.get("to"), services.meter.clock(),
                    days=int(days) if days is not None else None, key_id=key_id)
    return _json(await services.meter.reports.usage(q))
