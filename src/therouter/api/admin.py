"""/admin: operator endpoints, behind THEROUTER_ADMIN_KEY (policy applied where the router is included). Keys and
usage: admin_keys.py."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from therouter.api.deps import AdminDep, ServicesDep
from therouter.errors import InvalidRequest, ModelNotFound, NotFound
from therouter.routing.report import providers_report, stranded_by_drain

router = APIRouter(prefix="/admin", dependencies=[AdminDep])
log = logging.getLogger("therouter.admin")


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
        raise InvalidRequest("The body must be {input, cached_input?, output, cache_write?, effective_at?}: USD per "
                             "1M tokens, unix seconds.")
    # every field is checked (400 naming it) by the price book: finite, 0..1,000,000 USD, effective_at 0..+10 years
    pv = await services.meter.set_price(model_id, body["input"], body.get("cached_input", body["input"]),
                                        body["output"], body.get("effective_at"), body.get("cache_write"))
    return _json(pv.public())


# ---- routing: outage drills ----------------------------------------------------------------------------------------


def _provider(services: Any, name: str) -> str:
    if name not in services.providers:
        raise NotFound(f"No provider named `{name}`. Known: {', '.join(sorted(services.providers))}.",
                       param="name")
    return name


@router.get("/providers")
async def list_providers(services: ServicesDep) -> Response:
    """Each provider and deployment: drained, health, circuit, cooldown, in flight, recent latency and error rate."""
    synced = await services.shared.refresh()
    budget = services.routing.budget
    return _json({
        "object": "list",
        "data": providers_report(services.settings, services.providers, services.routing, services.health),
        "retry_budget": {"requests_in_flight": budget.requests, "retries_in_flight": budget.retries,
                         "limit": budget.limit, "refused": budget.refused},
        "shared_state": "ok" if synced else "unreachable (this worker's local view)",
    })


@router.post("/providers/{name}/drain")
async def drain(name: str, services: ServicesDep, force: bool = False) -> Response:
    """New requests stop going to the provider; requests in flight finish. Refused (409) if a model would be left
    with no deployment at all, unless ``?force=true``."""
    _provider(services, name)
    stranded = stranded_by_drain(services.settings, services.routing, name)
    if stranded and not force:
        err = InvalidRequest(f"Draining `{name}` would leave {', '.join(stranded)} with no deployment; "
                             "add ?force=true to drain anyway.", param="name", code="would_strand_models")
        err.status = 409
        raise err
    services.routing.set_drained(name, True)
    shared = await services.shared.flush()
    _admin_event("drain", name, force=force, models_without_deployment=stranded or None)
    return _json(_drain_answer(services, name, shared, stranded))


@router.post("/providers/{name}/undrain")
async def undrain(name: str, services: ServicesDep) -> Response:
    _provider(services, name)
    services.routing.set_drained(name, False)
    shared = await services.shared.flush()
    _admin_event("undrain", name)
    return _json(_drain_answer(services, name, shared, []))


@router.post("/providers/{name}/reset")
async def reset(name: str, services: ServicesDep) -> Response:
    """After a fix: close the provider's circuits (on this worker) and forget its cooldowns (everywhere)."""
    _provider(services, name)
    services.routing.reset(name)
    shared = await services.shared.clear_cooldowns(name)
    _admin_event("provider_reset", name)
    return _json({"provider": name, "reset": True, "shared": shared})


def _admin_event(event: str, provider: str, **fields: Any) -> None:
    log.warning("provider %s: %s by the admin API", provider, event.replace("_", " "),
                extra={"event": event, "provider": provider, "action": "admin", **fields})


def _drain_answer(services: Any, name: str, shared: bool, stranded: list[str]) -> dict[str, Any]:
    in_flight = sum(d["in_flight"] for p in providers_report(services.settings, services.providers,
                                                             services.routing, services.health)
                    if p["provider"] == name for d in p["deployments"])
    out: dict[str, Any] = {"provider": name, "drained": services.routing.drained(name), "shared": shared,
                           "in_flight": in_flight}
    if stranded:
        out["models_without_deployment"] = stranded
    return out
