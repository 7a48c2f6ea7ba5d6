"""Metrics: the objects, the per-request observation, and the exposition that sums every worker.

* **One request, one observation.** :meth:`Metrics.finish` takes a :class:`Finished` (what the client was answered:
  status, model, provider, tokens, cost, times) and updates every request metric; the gateway calls it from one place.
* **Workers.** ``therouter serve --workers N`` runs prometheus-client's multiprocess mode: each worker writes its
  values to files in ``PROMETHEUS_MULTIPROC_DIR`` (which ``serve`` creates fresh and removes), and a scrape of any
  worker reads them all (:func:`exposition`): counters and histograms sum over every worker that ever ran, gauges
  use the mode declared with them (``livesum``: requests in flight; ``livemax``: a circuit open on any live worker).
  A dead worker's live gauges are dropped at the next scrape. With one process the values stay in memory.
* **Bounded labels.** Models and providers are names from the config (anything else becomes ``""``), codes are HTTP
  statuses, outcomes and token types fixed sets. No key, request id or user text is ever a label.
* **Hot path.** Label children are looked up once per label set and cached (``.labels()`` is not free), and a
  request's ~13 updates call the children's values directly (:func:`_adder`, :func:`_observer`: what ``inc`` and
  ``observe`` do once their checks -- labels set, amount not negative -- hold by construction).
"""

from __future__ import annotations

import glob
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from therouter.config import Settings
from therouter.errors import BudgetExceeded, GatewayError, RateLimited
from therouter.protocol.usage import Usage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
TOKEN_TYPES = ("prompt", "cached", "completion", "reasoning")
ENDPOINTS = frozenset({"chat", "completions", "messages"})  # the `endpoint` label (anything else: "")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NANO = 10**9


@dataclass(slots=True)
class Finished:
    """One client request, once its answer is known: what its metrics and its log line are made of."""

    request_id: str
    status: int  # the HTTP status answered (499: the client left before any answer)
    outcome: str  # a generation outcome (completed, client_cancelled, upstream_cut, rejected, failed) or "refused"
    model: str = ""  # the model that served; else the model asked for (when it is in the catalogue); else ""
    provider: str = ""  # "" when none served
    seconds: float | None = None  # to the end of the answer (a stream: its last event)
    ttft: float | None = None  # to the first content (a stream's first chunk; a JSON answer: the upstream's answer)
    generation_id: str = ""
    key_id: str = ""
    usage: Usage | None = None
    cost_nano: int = 0
    attempts: int = 0
    requested: str = ""  # the model asked for (differs from `model` when a `models` fallback served)
    fallback_from: str = ""  # the provider first tried, when another one served
    error: GatewayError | None = None
    endpoint: str = ""  # chat | completions | messages (/v1/messages, served through chat)


Add = Callable[[float], None]
_VALUE_INCS = (Counter.inc, Gauge.inc)  # the public methods _adder stands for (a subclass's own: not replaced)


def _adder(child: Any) -> Add:
    """A counter's or gauge's child's ``inc`` without its checks (the child has its labels; callers add only what
    the metric allows: counters never a negative amount): its value's own ``inc`` -- the lock in one process, the
    mmap'd file with ``--workers N``. The public ``inc`` if this prometheus_client keeps its value elsewhere."""
    value = getattr(child, "_value", None)
    add = getattr(value, "inc", None)
    if not callable(add) or type(child).inc not in _VALUE_INCS or getattr(child, "_is_most_recent", False):
        return child.inc  # type: ignore[no-any-return]
    return add  # type: ignore[no-any-return]


def _observer(child: Any) -> Add:
    """A histogram child's ``observe`` (without exemplars): its sum, then the first bucket whose upper bound holds the
    amount, found by bisection instead of a walk (the last bound is +Inf; NaN counts in no bucket, as in
    ``observe``). The public ``observe`` if this prometheus_client's histogram is made otherwise."""
    try:
        add_sum, bounds = child._sum.inc, tuple(child._upper_bounds)
        buckets = tuple(b.inc for b in child._buckets)
    except AttributeError:
        return child.observe  # type: ignore[no-any-return]
    if type(child).observe is not Histogram.observe or len(bounds) != len(buckets) or bounds[-1] != float("inf"):
        return child.observe  # type: ignore[no-any-return]

    def observe(amount: float) -> None:
        add_sum(amount)
        i = bisect_left(bounds, amount)
        if amount <= bounds[i]:
            buckets[i](1)

    return observe


class _Series:
    """What one request's observation updates, for one (model, provider, status, endpoint)."""

    __slots__ = ("duration", "requests", "spend", "tokens", "ttft")

    def __init__(self, m: Metrics, model: str, provider: str, code: str, endpoint: str) -> None:
        self.requests = _adder(m._child(m.requests, model, provider, code, endpoint))
        self.duration = _observer(m._child(m.duration, model, provider))
        self.ttft: Add | None = None  # made at the first time to first token (refusals have none)
        # (a child is a series in the exposition: tokens and spend only where a provider served)
        self.tokens = tuple(_adder(m._child(m.tokens, model, provider, kind)) for kind in TOKEN_TYPES) if provider \
            else ()
        self.spend = _adder(m._child(m.spend, model, provider)) if provider else None


class _Attempt:
    """What one upstream attempt's observation updates, for one (provider, outcome)."""

    __slots__ = ("alert", "attempts", "seconds")

    def __init__(self, m: Metrics, provider: str, outcome: str) -> None:
        self.attempts = _adder(m._child(m.attempts, provider, outcome))
        self.seconds = _observer(m._child(m.attempt_seconds, provider))
        self.alert = _adder(m._child(m.provider_alerts, provider)) if outcome == "upstream_auth_error" else None


class Metrics:
    def __init__(self, settings: Settings | None = None) -> None:
        self.registry = CollectorRegistry()
        self.models = frozenset(settings.models) if settings else frozenset()
        self.providers = frozenset(settings.providers) if settings else frozenset()
        self._children: dict[tuple[Any, ...], Any] = {}
        self._series: dict[tuple[str, str, int, str], _Series] = {}  # bounded: labels from the config, statuses
        self._attempts: dict[tuple[str, str], _Attempt] = {}  # bounded: providers, the error classes' codes
        self._in_flight: dict[str, Add] = {}  # by provider
        r = self.registry
        self.requests = Counter("therouter_requests_total", "Client requests by model, provider (empty when none "
                                "served), the HTTP status answered and the endpoint (chat, completions, messages)",
                                ["model", "provider", "code", "endpoint"], registry=r)
        self.duration = Histogram("therouter_request_duration_seconds", "Time to the end of the answer (a stream: "
                                  "to its last event)", ["model", "provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("therouter_time_to_first_token_seconds", "Time to the first content: a stream's first "
                              "chunk, a JSON answer's arrival", ["model", "provider"], buckets=TTFT_BUCKETS,
                              registry=r)
        self.tokens = Counter("therouter_tokens_total", "Billed tokens by type (prompt, cached, completion, "
                              "reasoning)", ["model", "provider", "type"], registry=r)
        self.spend = Counter("therouter_spend_usd_total", "Billed cost in USD (the exact amounts are integers in the "
                             "store; this is for graphs)", ["model", "provider"], registry=r)
        self.fallbacks = Counter("therouter_fallbacks_total", "Requests served by another deployment or model than "
                                 "the first one tried, by the model asked for", ["model"], registry=r)
        self.budget_rejections = Counter("therouter_budget_rejections_total", "Requests refused with 402: the key's "
                                         "budget cannot cover them", registry=r)
        self.rate_limited = Counter("therouter_rate_limited_total", "Requests refused with 429 by a key's limits",
                                    ["limit"], registry=r)
        self._routing_metrics()
        self._meter_metrics()

    # ---- one request ----------------------------------------------------------------------------------------------

    def finish(self, f: Finished) -> None:
        model = f.model if f.model in self.models else ""
        provider = f.provider if f.provider in self.providers else ""
        endpoint = f.endpoint if f.endpoint in ENDPOINTS else ""
        key = (model, provider, f.status, endpoint)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, model, provider, str(f.status), endpoint)
        series.requests(1)
        if f.seconds is not None:
            series.duration(f.seconds)
        if f.ttft is not None:
            if series.ttft is None:
                series.ttft = _observer(self._child(self.ttft, model, provider))
            series.ttft(f.ttft)
        u = f.usage
        if u is not None and provider:
            prompt, cached, completion, reasoning = series.tokens
            if u.prompt_tokens > 0:
                prompt(u.prompt_tokens)
            if u.cached_tokens > 0:
                cached(u.cached_tokens)
            if u.completion_tokens > 0:
                completion(u.completion_tokens)
            if u.reasoning_tokens > 0:
                reasoning(u.reasoning_tokens)
        if f.cost_nano > 0 and series.spend is not None:
            series.spend(f.cost_nano / NANO)
        if f.fallback_from:
            self._child(self.fallbacks, f.requested if f.requested in self.models else model).inc()
        if f.error is None:
            return
        if isinstance(f.error, BudgetExceeded):
            self.budget_rejections.inc()
        elif isinstance(f.error, RateLimited):
            self._child(self.rate_limited, f.error.limit).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ---- upstream attempts, routing -------------------------------------------------------------------------------

    def _routing_metrics(self) -> None:
        r = self.registry
        self.attempts = Counter("therouter_upstream_attempts_total", "Upstream attempts by provider and outcome (ok, "
                                "or the gateway's error code for the kind of failure)", ["provider", "outcome"],
                                registry=r)
        self.attempt_seconds = Histogram("therouter_upstream_attempt_seconds", "Upstream attempt latency (a stream: "
                                         "to its first content)", ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.provider_alerts = Counter("therouter_provider_auth_failures_total",
                                       "Upstream 401/402/403: our credentials or balance at the provider",
                                       ["provider"], registry=r)
        self.stream_errors = Counter("therouter_stream_errors_total", "Streams ended by an upstream fault",
                                     ["provider", "code"], registry=r)
        self.breaker_changes = Counter("therouter_circuit_state_changes_total",
                                       "Circuit breaker transitions per deployment (state: open|half_open|closed)",
                                       ["provider", "state"], registry=r)
        self.circuit_open = Gauge("therouter_circuit_open", "1 while a deployment's circuit is open (or half-open) "
                                  "on any live worker", ["provider", "model"], multiprocess_mode="livemax",
                                  registry=r)
        self.in_flight = Gauge("therouter_in_flight_requests", "Upstream requests in flight, all workers",
                               ["provider"], multiprocess_mode="livesum", registry=r)
        self.failovers = Counter("therouter_failovers_total",
                                 "Requests served by another deployment after the first one failed",
                                 ["from_provider", "to_provider"], registry=r)
        self.retries = Counter("therouter_retries_total", "Same-deployment retries", ["provider"], registry=r)

    def observe_attempt(self, provider: str, err: GatewayError | None, seconds: float) -> None:
        # the class's own code: a fixed set (an instance may carry an upstream's free-form code)
        outcome = "ok" if err is None else str(type(err).code or "error")
        a = self._attempts.get((provider, outcome))
        if a is None:
            a = self._attempts[provider, outcome] = _Attempt(self, provider, outcome)
        a.attempts(1)
        a.seconds(seconds)
        if a.alert is not None:
            a.alert(1)

    def observe_stream_error(self, provider: str, err: GatewayError) -> None:
        self._child(self.stream_errors, provider, str(err.code or "upstream_error")).inc()

    def observe_breaker(self, provider: str, state: str, models: Iterable[str] = ()) -> None:
        """A deployment's circuit changed; ``models`` are the public models it serves (its circuit_open series)."""
        self._child(self.breaker_changes, provider, state).inc()
        for model in models:
            self._child(self.circuit_open, provider, model).set(0 if state == "closed" else 1)

    def observe_in_flight(self, provider: str, delta: int) -> None:
        add = self._in_flight.get(provider)
        if add is None:
            add = self._in_flight[provider] = _adder(self._child(self.in_flight, provider))
        add(delta)

    def observe_failover(self, from_provider: str, to_provider: str) -> None:
        self._child(self.failovers, from_provider, to_provider).inc()

    def observe_retry(self, provider: str) -> None:
        self._child(self.retries, provider).inc()

    def declare(self, deployments: Iterable[tuple[str, str]]) -> None:
        """Every (provider, public model) and provider starts at 0, so dashboards see the series before a change."""
        for provider, model in deployments:
            self._child(self.circuit_open, provider, model).set(0)
            self._child(self.in_flight, provider).inc(0)

    # ---- metering -------------------------------------------------------------------------------------------------

    def _meter_metrics(self) -> None:
        r = self.registry
        self.meter_counters = {
            "fail_open": Counter("therouter_ratelimit_fail_open_total", "Admissions decided by the local limiter "
                                 "because the store was unavailable", registry=r),
            "journal_write": Counter("therouter_journal_writes_total", "Usage records written to the local journal "
                                     "because the store was unavailable", registry=r),
            "journal_error": Counter("therouter_journal_errors_total", "Failures writing the local journal",
                                     registry=r),
            "usage_anomaly": Counter("therouter_usage_anomalies_total", "Upstream usage counts the meter replaced by "
                                     "its own estimate or clamped to the model card, by provider and reason",
                                     ["provider", "reason"], registry=r),
        }

    def meter_event(self, name: str, *labels: str) -> None:
        """The meter's hook (``Meter.on_event``): one fail-open admission, journal write or usage anomaly."""
        metric = self.meter_counters.get(name)
        if metric is not None:
            (self._child(metric, *labels) if labels else metric).inc()


# ---- exposition ---------------------------------------------------------------------------------------------------


def multiproc_dir(env: Mapping[str, str] = os.environ) -> str | None:
    return env.get(MULTIPROC_ENV) or env.get(MULTIPROC_ENV.lower()) or None


def exposition(metrics: Metrics, scrape_values: Mapping[str, tuple[str, float]],
               alive: Callable[[int], bool] | None = None) -> bytes:
    """The text exposition: every worker's values (multiprocess mode) or this process's, plus values read at scrape
    time (``name -> (help, value)``, e.g. the store's reachability and the journal's backlog)."""
    path = multiproc_dir()
    if path is None:
        registry = metrics.registry
        extra = _ScrapeValues(scrape_values)
        registry.register(extra)
        try:
            return generate_latest(registry)
        finally:
            registry.unregister(extra)
    forget_dead_workers(path, alive or pid_alive)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]  # prometheus_client: unannotated
    registry.register(_ScrapeValues(scrape_values))
    return generate_latest(registry)


def forget_dead_workers(path: str, alive: Callable[[int], bool]) -> list[int]:
    """Drop the live gauges of workers that are gone (killed: no shutdown ran ``mark_process_dead``)."""
    dead: set[int] = set()
    for f in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        tail = os.path.basename(f).rsplit("_", 1)[-1].removesuffix(".db")
        if tail.isdigit() and not alive(int(tail)):
            dead.add(int(tail))
    for pid in dead:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # prometheus_client: unannotated
    return sorted(dead)


def clear_multiproc_dir(path: str | None = None) -> None:
    """Empty the metrics folder (a run starts from zero; nothing of a previous run is summed in)."""
    path = path or multiproc_dir()
    if path is not None:
        for f in glob.glob(os.path.join(path, "*.db")):
            os.remove(f)


def worker_exit(pid: int | None = None) -> None:
    """A worker shutting down: its live gauges (requests in flight, circuits) stop counting."""
    path = multiproc_dir()
    if path is not None:
        mark_process_dead(os.getpid() if pid is None else pid, path)  # type: ignore[no-untyped-call]  # (as above)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ScrapeValues:
    def __init__(self, values: Mapping[str, tuple[str, float]]) -> None:
        self.values = values

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (doc, value) in self.values.items():
            yield GaugeMetricFamily(name, doc, value=value)
