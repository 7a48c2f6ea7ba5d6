"""Metrics and logging. Metric objects live on a per-app registry (no module-level mutable state)."""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("therouter_requests_total", "Client requests by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("therouter_request_seconds", "Time to the full answer (non-stream) or to the "
                                 "response headers (stream)", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.attempts = Counter("therouter_upstream_attempts_total", "Upstream attempts by provider and outcome",
                                ["provider", "outcome"], registry=r)
        self.attempt_seconds = Histogram("therouter_upstream_attempt_seconds", "Upstream attempt latency",
                                         ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.provider_alerts = Counter("therouter_provider_auth_failures_total",
                                       "Upstream 401/402/403: our credentials or balance at the provider",
                                       ["provider"], registry=r)
        self.stream_errors = Counter("therouter_stream_errors_total", "Streams ended by an upstream fault",
                                     ["provider", "code"], registry=r)
        self.routing_metrics()

    def observe_attempt(self, provider: str, code: str | None, seconds: float) -> None:
        self.attempts.labels(provider, code or "ok").inc()
        self.attempt_seconds.labels(provider).observe(seconds)
        if code == "upstream_auth_error":
            self.provider_alerts.labels(provider).inc()

    # ---- routing (breakers, fail-overs, retries) ----------------------------------------------------------------

    def routing_metrics(self) -> None:
        r = self.registry
        self.breaker_changes = Counter("therouter_circuit_state_changes_total",
                                       "Circuit breaker transitions per deployment (state: open|half_open|closed)",
                                       ["provider", "state"], registry=r)
        self.failovers = Counter("therouter_failovers_total",
                                 "Requests served by another deployment after the first one failed",
                                 ["from_provider", "to_provider"], registry=r)
        self.retries = Counter("therouter_retries_total", "Same-deployment retries", ["provider"], registry=r)

    def observe_breaker(self, provider: str, state: str) -> None:
        self.breaker_changes.labels(provider, state).inc()

    def observe_failover(self, from_provider: str, to_provider: str) -> None:
        self.failovers.labels(from_provider, to_provider).inc()

    def observe_retry(self, provider: str) -> None:
        self.retries.labels(provider).inc()


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if any(getattr(h, "_therouter", False) for h in root.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h._therouter = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(level)


class _MeterCollector:
    """Exposes the meter's own counters (fail-open admissions, journal writes) at scrape time."""

    def __init__(self, meter: object) -> None:
        self.meter = meter

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily

        for name, attr, doc in (
            ("therouter_ratelimit_fail_open", "fail_open_total",
             "Admissions decided by the local limiter because the store was unavailable"),
            ("therouter_journal_writes", "journal_writes_total",
             "Usage records written to the local journal because the store was unavailable"),
            ("therouter_journal_errors", "journal_errors_total", "Failures writing the local journal"),
        ):
            yield CounterMetricFamily(name, doc, value=int(getattr(self.meter, attr, 0)))
        anomalies = CounterMetricFamily("therouter_usage_anomalies", "Upstream usage counts the meter replaced by "
                                        "its own estimate or clamped to the model card, by provider and reason",
                                        labels=["provider", "reason"])
        for (provider, reason), n in sorted(getattr(self.meter, "usage_anomalies", {}).items()):
            anomalies.add_metric([provider, reason], n)
        yield anomalies


def register_meter(metrics: Metrics, meter: object) -> None:
    metrics.registry.register(_MeterCollector(meter))  # type: ignore[arg-type]
