"""Per-request routing preferences, OpenRouter-style: a `models` fallback list and a `provider` object.

```json
{"model": "a", "models": ["b", "c"],
 "provider": {"order": ["deepseek", "vllm-local"], "only": [...], "ignore": [...],
              "allow_fallbacks": true, "require_parameters": false, "sort": "latency"}}
```

Provider names are the keys of the config's ``providers``; an unknown name is a 400 (param ``provider``). Every model
in ``models`` must exist (404) and be allowed for the key (403); an alias there resolves to its canonical id first. Unknown keys inside ``provider`` (OpenRouter has more,
e.g. ``data_collection``) are ignored. Both fields are stripped before the request goes upstream.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from therouter.errors import InvalidRequest, ModelNotFound, PermissionDenied

Sort = Literal["price", "latency", "throughput"]
SORTS: tuple[str, ...] = ("price", "latency", "throughput")


@dataclass(frozen=True, slots=True)
class Preferences:
    models: tuple[str, ...] = ()  # fallback models, tried after the request's own model
    order: tuple[str, ...] = ()  # providers to try first, in this order
    only: frozenset[str] | None = None  # if set, no other provider is used
    ignore: frozenset[str] = frozenset()
    allow_fallbacks: bool = True  # False: only `order` (or, without it, only the first candidate)
    require_parameters: bool = False  # only deployments that support every parameter natively (no downgrade)
    sort: Sort | None = None  # by measured figures instead of priority / weight

    def excluded(self, provider: str) -> str | None:
        if provider in self.ignore:
            return "ignored by request"
        if self.only is not None and provider not in self.only:
            return "not in request's provider.only"
        if not self.allow_fallbacks and self.order and provider not in self.order:
            return "not in request's provider.order (allow_fallbacks is false)"
        return None

    @property
    def default(self) -> bool:
        return self == NO_PREFERENCES


NO_PREFERENCES = Preferences()


def parse_preferences(body: Mapping[str, Any], providers: Collection[str], models: Collection[str],
                      model: str, key_models: Collection[str] = (), max_models: int = 5,
                      aliases: Mapping[str, str] | None = None) -> Preferences:
    fallback = _models(body.get("models"), models, model, key_models, max_models, aliases or {})
    raw = body.get("provider")
    if raw is None:
        return Preferences(models=fallback) if fallback else NO_PREFERENCES
    if not isinstance(raw, dict):
        raise InvalidRequest("'provider' must be an object: {order, only, ignore, allow_fallbacks, "
                             "require_parameters, sort}.", param="provider")
    order = _names(raw, "order", providers)
    only = _names(raw, "only", providers)
    sort = raw.get("sort")
    if sort is not None and sort not in SORTS:
        raise InvalidRequest(f"'provider.sort' must be one of {', '.join(SORTS)}.", param="provider")
    return Preferences(
        models=fallback,
        order=tuple(dict.fromkeys(order or ())),
        only=frozenset(only) if only is not None else None,
        ignore=frozenset(_names(raw, "ignore", providers) or ()),
        allow_fallbacks=_flag(raw, "allow_fallbacks", True),
        require_parameters=_flag(raw, "require_parameters", False),
        sort=sort,
    )


def _names(raw: Mapping[str, Any], field: str, providers: Collection[str]) -> list[str] | None:
    v = raw.get(field)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InvalidRequest(f"'provider.{field}' must be a list of provider names.", param="provider")
    unknown = [x for x in v if x not in providers]
    if unknown:
        raise InvalidRequest(
            f"Unknown provider(s) in 'provider.{field}': {', '.join(repr(x[:64]) for x in unknown[:5])}. "
            f"Known providers: {', '.join(sorted(providers))}.", param="provider")
    return v


def _flag(raw: Mapping[str, Any], field: str, default: bool) -> bool:
    v = raw.get(field, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequest(f"'provider.{field}' must be true or false.", param="provider")
    return v


def _models(v: Any, models: Collection[str], model: str, key_models: Collection[str],
            max_models: int, aliases: Mapping[str, str]) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InvalidRequest("'models' must be a list of model ids.", param="models")
    if len(v) > max_models:
        raise InvalidRequest(f"'models' lists {len(v)} models; at most {max_models} are allowed.", param="models")
    v = [aliases.get(m, m) for m in v]
    for m in v:
        if m not in models:
            raise ModelNotFound(f"The model `{m[:200]}` in 'models' does not exist or you do not have access to it.",
                                param="models")
        if key_models and m not in key_models:
            raise PermissionDenied(f"This API key is not allowed to use the model `{m}`.", param="models")
    return tuple(m for m in dict.fromkeys(v) if m != model)
