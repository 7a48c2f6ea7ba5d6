"""The operator's view of routing (``GET /admin/providers``) and the checks behind drain / undrain."""

from __future__ import annotations

from typing import Any

from therouter.config import Settings
from therouter.providers.base import Provider
from therouter.routing.health import HealthMonitor
from therouter.routing.state import RoutingState


def deployment_state(state: RoutingState, health: HealthMonitor, provider: str, key: tuple[str, str]) -> str:
    """One word for a dashboard: drained | unhealthy | open | half_open | cooldown | ok."""
    if state.drained(provider):
        return "drained"
    h = health.state.get(provider)
    if h is not None and not h.ok:
        return "unhealthy"
    circuit = state.breaker(key).state
    if circuit != "closed":
        return circuit
    if state.cooldown_left(key) > 0:
        return "cooldown"
    return "ok"


def providers_report(settings: Settings, providers: dict[str, Provider], state: RoutingState,
                     health: HealthMonitor) -> list[dict[str, Any]]:
    out = []
    for name, p in providers.items():
        by_upstream: dict[str, dict[str, Any]] = {}
        for model_id, card in settings.models.items():
            for d in card.deployments:
                if d.provider != name:
                    continue
                entry = by_upstream.setdefault(d.model, {"upstream_model": d.model, "models": []})
                entry["models"].append({"model": model_id, "priority": d.priority, "weight": d.weight,
                                        "capabilities": list(d.capabilities)})
        deployments = []
        for upstream, entry in by_upstream.items():
            key = (name, upstream)
            deployments.append({**entry, "state": deployment_state(state, health, name, key),
                                **state.snapshot(key)})
        h = health.state.get(name)
        usable, why = p.usable
        out.append({
            "provider": name, "kind": p.kind, "hosted": p.config.is_hosted, "usable": usable,
            **({"not_usable_because": why} if not usable else {}),
            "drained": state.drained(name),
            "health": {"ok": h.ok, "detail": h.detail} if h is not None else None,
            "in_flight": sum(d["in_flight"] for d in deployments),
            "deployments": deployments,
        })
    return out


def stranded_by_drain(settings: Settings, state: RoutingState, provider: str) -> list[str]:
    """Models that would have no undrained deployment left if ``provider`` were drained too."""
    drained = state.drained_providers() | {provider}
    return sorted(mid for mid, card in settings.models.items()
                  if any(d.provider == provider for d in card.deployments)
                  and all(d.provider in drained for d in card.deployments))
