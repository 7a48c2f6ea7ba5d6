"""Candidate selection: from a model's deployments, those fit to serve this request, in order.

Order is config data (priority, then weight). Each deployment left out is reported with its reason so the generation
record can show it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from therouter.config import Deployment, ModelConfig, Settings
from therouter.providers.base import Provider


@dataclass(slots=True, frozen=True)
class Needs:
    tools: bool = False
    json_object: bool = False
    json_schema: bool = False
    fim: bool = False
    tokens: int = 0  # prompt estimate + requested completion
    stops: int = 0


@dataclass(slots=True)
class Candidate:
    model_id: str
    dep: Deployment
    provider: Provider

    @property
    def name(self) -> str:
        return self.provider.name


@dataclass(slots=True)
class Skip:
    provider: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"provider": self.provider, "reason": self.reason}


@dataclass
class Router:
    settings: Settings
    providers: dict[str, Provider]
    rng: random.Random = field(default_factory=random.Random)
    # extra filters added by health / breakers / drains: (deployment, provider) -> reason or None
    filters: list[Callable[[str, Deployment, Provider], str | None]] = field(default_factory=list)

    def card(self, model_id: str) -> ModelConfig | None:
        return self.settings.models.get(model_id)

    def candidates(self, model_id: str, needs: Needs) -> tuple[list[Candidate], list[Skip]]:
        card = self.settings.models[model_id]
        ok: list[Candidate] = []
        skipped: list[Skip] = []
        for dep in card.deployments:
            provider = self.providers[dep.provider]
            reason = self._unfit(model_id, dep, provider, card, needs)
            if reason:
                skipped.append(Skip(dep.provider, reason))
            else:
                ok.append(Candidate(model_id, dep, provider))
        return self._order(ok), skipped

    def _unfit(self, model_id: str, dep: Deployment, p: Provider, card: ModelConfig, needs: Needs) -> str | None:
        usable, why = p.usable
        if not usable:
            return f"not configured: {why}"
        caps = set(dep.capabilities)
        if needs.tools and "tools" not in caps:
            return "missing capability: tools"
        if needs.json_schema and not caps & {"json_schema", "json_object"}:
            return "missing capability: json_schema"
        if needs.json_object and not caps & {"json_schema", "json_object"}:
            return "missing capability: json_object"
        if needs.fim and "fim" not in caps:
            return "missing capability: fim"
        ctx = dep.context_length or card.context_length
        if needs.tokens > ctx:
            return f"context too small: {ctx} tokens"
        if needs.stops > p.max_stop:
            return f"too many stop sequences: at most {p.max_stop}"
        for f in self.filters:
            r = f(model_id, dep, p)
            if r:
                return r
        return None

    def _order(self, cands: list[Candidate]) -> list[Candidate]:
        """By priority; within a priority, a weighted random order (weight 0 = only when nothing else is left)."""
        by_prio: dict[int, list[Candidate]] = {}
        for c in cands:
            by_prio.setdefault(c.dep.priority, []).append(c)
        out: list[Candidate] = []
        for prio in sorted(by_prio):
            group = by_prio[prio]
            while group:
                weights = [max(c.dep.weight, 0) for c in group]
                if sum(weights) == 0:
                    out.extend(group)
                    break
                pick = self.rng.choices(range(len(group)), weights=weights)[0]
                out.append(group.pop(pick))
        return out
