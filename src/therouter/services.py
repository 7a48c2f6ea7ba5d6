"""Services: every long-lived object of a running gateway, built once (in the app's lifespan)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from therouter.auth import Authenticator
from therouter.config import Settings
from therouter.gateway import Gateway
from therouter.metering.admission import MeterOptions
from therouter.metering.meter import Meter
from therouter.observability import Metrics
from therouter.providers import Provider, build_provider, make_transport
from therouter.routing.attempts import AttemptPolicy
from therouter.routing.health import HealthMonitor
from therouter.routing.options import RoutingOptions
from therouter.routing.router import Router
from therouter.routing.shared import SharedSync
from therouter.routing.state import RoutingState
from therouter.store import Store
from therouter.tracing import Tracing


@dataclass
class Services:
    settings: Settings
    store: Store
    auth: Authenticator
    meter: Meter
    providers: dict[str, Provider]
    router: Router
    health: HealthMonitor
    gateway: Gateway
    metrics: Metrics
    routing: RoutingState
    shared: SharedSync


async def build_services(settings: Settings, routing: RoutingOptions | None = None) -> Services:
    store = Store(settings.store)
    providers = {
        name: build_provider(name, cfg, make_transport(settings.server.upstream_client, cfg.max_connections))
        for name, cfg in settings.providers.items()
    }
    metrics = Metrics(settings)
    served: dict[tuple[str, str], list[str]] = {}  # (provider, upstream model) -> the public models it serves
    for mid, m in settings.models.items():
        for d in m.deployments:
            served.setdefault((d.provider, d.model), []).append(mid)
    metrics.declare((key[0], mid) for key, mids in served.items() for mid in mids)
    state = RoutingState(routing or settings.routing,
                         on_breaker=lambda key, st: metrics.observe_breaker(key[0], st, served.get(key, ())),
                         on_in_flight=lambda key, n: metrics.observe_in_flight(key[0], n))
    deployments = set(served)
    tracing = Tracing.from_endpoint(settings.otel_endpoint)
    shared = SharedSync(state, store, providers, deployments)
    health = HealthMonitor(settings, providers, on_start=[shared.start], on_stop=[shared.aclose])
    router = Router(settings, providers, filters=[health.unfit], state=state)
    policy = AttemptPolicy(
        router,
        observers=[lambda c, e, dt: metrics.observe_attempt(c.name, e, dt),
                   *([tracing.attempt] if tracing is not None else [])],
        on_retry=lambda c: metrics.observe_retry(c.name),
        on_failover=lambda a, b: metrics.observe_failover(a.name, b.name),
    )
    meter = Meter(store, settings, Path(settings.data_dir) / "journal", options=MeterOptions.from_settings(settings))
    meter.on_event = metrics.meter_event
    gateway = Gateway(settings, router, meter, policy, metrics=metrics, tracing=tracing)
    auth = Authenticator(store, stale_seconds=settings.store.key_cache_seconds)
    return Services(settings, store, auth, meter, providers, router, health, gateway, metrics, state, shared)
