"""Candidate selection: from a model's deployments, those fit to serve this request, in the order to try them.

Left out, each with its reason (kept in the generation record): not configured, a capability or context the request
needs, the request's provider preferences, unhealthy (active checks), drained, cooldown (Retry-After), circuit open.

Order: the request's ``provider.order`` if given, else its ``provider.sort`` (measured latency / throughput), else
config data: priority, then within a priority a weighted random order discounted by requests in flight, with optional
prefix affinity among self-hosted replicas. The last usable deployment is never left out for its circuit alone: with
nowhere else to go, ejecting it gains nothing, so it serves as the probe. When several usable deployments all have
open circuits, the request fails fast (503 with Retry-After) rather than waiting.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from therouter import params
from therouter.config import Deployment, ModelConfig, Settings
from therouter.providers.base import Provider
from therouter.routing.balance import load_weight, rendezvous, weighted_order
from therouter.routing.preferences import NO_PREFERENCES, Preferences
from therouter.routing.state import DepKey, RoutingState


@dataclass(slots=True)
class Needs:
    tools: bool = False
    json_object: bool = False
    json_schema: bool = False
    fim: bool = False
    tokens: int = 0  # prompt estimate + requested completion
    stops: int = 0
    stream: bool = False
    params: frozenset[str] = frozenset()  # OpenAI parameters a deployment must honour (params.py: never dropped)


@dataclass(slots=True)
class Candidate:
    model_id: str
    dep: Deployment
    provider: Provider
    forced: bool = False  # the last usable deployment, let through although its circuit is open

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def key(self) -> DepKey:
        return (self.provider.name, self.dep.model)


class SkipKind(enum.Enum):
    """Why a deployment was left out: what code decides on (the :attr:`Skip.reason` text is for people)."""

    UNSUITED = "unsuited"  # lacks what a request parameter asks for (Skip.param, Skip.lacking): a 400 if none is left
    NOT_CONFIGURED = "not_configured"
    CONTEXT = "context"
    STOPS = "stops"
    EXCLUDED = "excluded"  # the request's provider preferences
    UNHEALTHY = "unhealthy"  # an active health check (Router.filters)
    DRAINED = "drained"
    COOLDOWN = "cooldown"  # Retry-After from the upstream
    CIRCUIT = "circuit"  # open, or half-open with its probe in flight
    NO_FALLBACKS = "no_fallbacks"  # allow_fallbacks: false
    RETRY_BUDGET = "retry_budget"
    RETRY_AFTER_CAP = "retry_after_cap"
    NO_TIME = "no_time"  # no time left for a retry before the deadline


@dataclass(slots=True)
class Skip:
    provider: str
    reason: str
    model: str = ""
    retry_in: float | None = None  # seconds until this deployment may be tried again, when known
    param: str | None = None  # skipped for lacking what this request parameter asks for (a 400 if none is left)
    kind: SkipKind = SkipKind.UNHEALTHY
    lacking: str | None = None  # UNSUITED: what it lacks, as the client's error names it ("tools", "json_schema")

    def to_dict(self) -> dict[str, str]:
        d = {"provider": self.provider, "reason": self.reason}
        if self.model:
            d["model"] = self.model
        return d


@dataclass
class Router:
    settings: Settings
    providers: dict[str, Provider]
    rng: random.Random = field(default_factory=random.Random)
    # extra filters (active health checks): (model id, deployment, provider) -> reason or None
    filters: list[Callable[[str, Deployment, Provider], str | None]] = field(default_factory=list)
    state: RoutingState = field(default_factory=RoutingState)

    def card(self, model_id: str) -> ModelConfig | None:
        return self.settings.models.get(model_id)

    def candidates(self, model_id: str, needs: Needs, prefs: Preferences = NO_PREFERENCES,
                   prefix: str = "") -> tuple[list[Candidate], list[Skip]]:
        card = self.settings.models[model_id]
        if self.state.sync is not None:
            self.state.sync.poke()
        ok: list[Candidate] = []
        held: list[tuple[Candidate, Skip]] = []  # fit, but the circuit is open
        skipped: list[Skip] = []
        for dep in card.deployments:
            provider = self.providers[dep.provider]
            cand = Candidate(model_id, dep, provider)
            skip = (self._unsuited(model_id, dep, card, needs, prefs)
                    or self._unfit(model_id, dep, provider, card, needs, prefs))
            if skip is not None:
                skipped.append(skip)
                continue
            skip = self._state_skip(cand)
            if skip is None:
                ok.append(cand)
            elif skip.kind is SkipKind.CIRCUIT:
                held.append((cand, skip))
            else:
                skipped.append(skip)
        if not ok and len(held) == 1:
            cand, _ = held[0]
            cand.forced = True
            ok.append(cand)
        else:
            skipped.extend(s for _, s in held)
        ordered = self._order(model_id, ok, needs, prefs, prefix)
        if not prefs.allow_fallbacks and not prefs.order and len(ordered) > 1:
            skipped.extend(Skip(c.name, "allow_fallbacks is false", model_id, kind=SkipKind.NO_FALLBACKS)
                           for c in ordered[1:])
            ordered = ordered[:1]
        return ordered, skipped

    # ---- filters ----------------------------------------------------------------------------------------------

    def _unsuited(self, model_id: str, dep: Deployment, card: ModelConfig, needs: Needs,
                  prefs: Preferences) -> Skip | None:
        """A deployment that cannot give the answer the request asks for (a 400 naming the parameter if no
        deployment is left), as opposed to one that cannot serve right now."""
        caps = set(dep.capabilities)
        lacking: tuple[str, str, str] | None = None  # (the reason's words, what the client's error names, param)
        if needs.tools and "tools" not in caps:
            lacking = ("capability: tools", "tools", "tools")
        elif needs.json_schema and not caps & {"json_schema", "json_object"}:
            lacking = ("capability: json_schema", "json_schema", "response_format")
        elif needs.json_schema and prefs.require_parameters and "json_schema" not in caps:
            lacking = ("capability: json_schema (require_parameters: no json_object downgrade)", "json_schema",
                       "response_format")
        elif needs.json_object and not caps & {"json_schema", "json_object"}:
            lacking = ("capability: json_object", "json_object", "response_format")
        elif needs.fim and "fim" not in caps:
            lacking = ("capability: fim", "fill-in-the-middle (suffix)", "suffix")
        else:
            name = params.missing(needs.params, card, dep)
            if name is not None:
                lacking = (f"parameter: {name}", f"'{name}'", name)
        if lacking is None:
            return None
        return Skip(dep.provider, f"missing {lacking[0]}", model_id, param=lacking[2], kind=SkipKind.UNSUITED,
                    lacking=lacking[1])

    def _unfit(self, model_id: str, dep: Deployment, p: Provider, card: ModelConfig, needs: Needs,
               prefs: Preferences) -> Skip | None:
        usable, why = p.usable
        if not usable:
            return Skip(dep.provider, f"not configured: {why}", model_id, kind=SkipKind.NOT_CONFIGURED)
        ctx = dep.context_length or card.context_length
        if needs.tokens > ctx:
            return Skip(dep.provider, f"context too small: {ctx} tokens", model_id, kind=SkipKind.CONTEXT)
        if needs.stops > p.max_stop:
            return Skip(dep.provider, f"too many stop sequences: at most {p.max_stop}", model_id,
                        kind=SkipKind.STOPS)
        excluded = prefs.excluded(p.name)
        if excluded:
            return Skip(dep.provider, excluded, model_id, kind=SkipKind.EXCLUDED)
        for f in self.filters:
            r = f(model_id, dep, p)
            if r:
                return Skip(dep.provider, r, model_id, kind=SkipKind.UNHEALTHY)
        return None

    def _state_skip(self, c: Candidate) -> Skip | None:
        st = self.state
        if st.drained(c.name):
            return Skip(c.name, "drained", c.model_id, kind=SkipKind.DRAINED)
        left = st.cooldown_left(c.key)
        if left > 0:
            return Skip(c.name, f"cooldown: rate limited upstream, {left:.1f}s left", c.model_id, left,
                        kind=SkipKind.COOLDOWN)
        b = st.breaker(c.key)
        if not b.available():
            wait = b.remaining()
            what = "circuit open" if b.state == "open" else "circuit half-open, probe in flight"
            return Skip(c.name, f"{what} ({b.last_reason}); next probe in {wait:.1f}s", c.model_id, wait,
                        kind=SkipKind.CIRCUIT)
        return None

    def available(self, c: Candidate) -> Skip | None:
        """Re-checked before a same-deployment retry: why it may no longer be used, or None."""
        skip = self._state_skip(c)
        if skip is None or (c.forced and skip.kind is SkipKind.CIRCUIT):
            return None
        return skip

    # ---- ordering ---------------------------------------------------------------------------------------------

    def _order(self, model_id: str, cands: list[Candidate], needs: Needs, prefs: Preferences,
               prefix: str) -> list[Candidate]:
        if prefs.order:
            rank = {name: i for i, name in enumerate(prefs.order)}
            first = sorted((c for c in cands if c.name in rank), key=lambda c: rank[c.name])
            rest = self._default_order(model_id, [c for c in cands if c.name not in rank], prefix)
            return first + rest
        if prefs.sort:
            base = self._default_order(model_id, cands, prefix)
            pos = {id(c): i for i, c in enumerate(base)}
            return sorted(base, key=lambda c: (self._figure(c, prefs.sort, needs), pos[id(c)]))
        return self._default_order(model_id, cands, prefix)

    def _figure(self, c: Candidate, sort: str | None, needs: Needs) -> float:
        """Smaller is better; unmeasured deployments go after measured ones."""
        st = self.state.stats(c.key)
        if sort == "latency":
            v = (st.ttft if needs.stream else st.latency) or (st.latency if needs.stream else st.ttft)
            return v if v is not None else math.inf
        if sort == "throughput":
            return -st.throughput if st.throughput is not None else math.inf
        # price: what the deployment costs the operator (its `cost`), else the model's price (deployments tie)
        p = c.dep.cost or self.settings.models[c.model_id].pricing
        return float(p.input + p.output)

    def _default_order(self, model_id: str, cands: list[Candidate], prefix: str) -> list[Candidate]:
        if len(cands) < 2:  # (most requests: one deployment can serve; nothing to order)
            return list(cands)
        by_prio: dict[int, list[Candidate]] = {}
        for c in cands:
            by_prio.setdefault(c.dep.priority, []).append(c)
        out: list[Candidate] = []
        affinity = bool(prefix) and self.state.options.affinity_for(model_id)
        for prio in sorted(by_prio):
            group = by_prio[prio]
            owner = self._affinity_owner(group, prefix) if affinity and len(group) > 1 else None
            if owner is not None:
                group = [c for c in group if c is not owner]
                out.append(owner)
            out.extend(weighted_order(group, self._load_weight, self.rng))
        return out

    def _load_weight(self, c: Candidate) -> float:
        return load_weight(c.dep.weight, self.state.stats(c.key).in_flight)

    def _affinity_owner(self, group: list[Candidate], prefix: str) -> Candidate | None:
        replicas = [c for c in group if not c.provider.config.is_hosted and c.dep.weight > 0]
        if len(replicas) < 2:
            return None
        owner = rendezvous(prefix, replicas, key=lambda c: f"{c.name}|{c.dep.model}",
                           weight=lambda c: float(c.dep.weight))
        if owner is None:
            return None
        load = {id(c): self.state.stats(c.key).in_flight for c in replicas}
        if load[id(owner)] - min(load.values()) > self.state.options.affinity_max_imbalance:
            return None  # the sticky replica is busy: spread by load instead
        return owner
