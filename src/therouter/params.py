"""The parameter policy (OpenRouter's, made visible): which OpenAI parameters a deployment honours, which may be
dropped where it does not, and which never are.

* **Hints and sampling controls** (:data:`HINTS`): a deployment that does not honour one gets the request without it;
  the answer names it in ``x-therouter-dropped-params`` and the generation record in ``dropped_params``. With
  ``provider.require_parameters: true`` in the request, or ``routing.unsupported_parameters: reject`` in the config,
  such a deployment is skipped instead, and a request that no deployment can serve gets a 400
  ``unsupported_parameter`` naming the parameter.
* **Parameters that change what the answer is** (:data:`SHAPING`: ``tools`` / ``tool_choice``, ``response_format``,
  ``logprobs``, ``n > 1``, ``suffix``, ``echo``, ``best_of``, non-text ``modalities`` / ``audio``) are never dropped:
  they filter the deployments, and with none left the answer is a 400 naming the parameter.
* Anything else -- a non-OpenAI field -- passes through untouched. Out-of-range values are always a 400 (validation).

A value equal to OpenAI's default (``presence_penalty: 0``, ``n: 1``, ``logprobs: false``, ``parallel_tool_calls:
true``, ...) is never a reason to refuse or skip anything: it asks for nothing the upstream would not do anyway.

What a deployment honours: its ``parameters`` list in the config when it has one, else its model's
``supported_parameters``; ``reasoning`` / ``reasoning_effort`` also when the deployment has the ``reasoning``
capability (its adapter maps them to the host's own switch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from therouter.config import Deployment, ModelConfig

_UNSET = object()
# hint -> its OpenAI default (a value equal to it asks for nothing); _UNSET: any value is a request
HINTS: dict[str, Any] = {
    "temperature": _UNSET, "top_p": _UNSET, "seed": _UNSET, "presence_penalty": 0, "frequency_penalty": 0,
    "logit_bias": _UNSET, "top_logprobs": _UNSET, "parallel_tool_calls": True, "user": _UNSET, "metadata": _UNSET,
    "store": False, "service_tier": _UNSET, "prediction": _UNSET, "safety_identifier": _UNSET,
    "prompt_cache_key": _UNSET, "verbosity": _UNSET, "reasoning_effort": _UNSET, "reasoning": _UNSET,
}
# parameters that change what the answer is -> their default
SHAPING: dict[str, Any] = {
    "tools": _UNSET, "tool_choice": _UNSET, "response_format": _UNSET, "logprobs": False, "n": 1, "suffix": _UNSET,
    "echo": False, "best_of": 1, "modalities": _UNSET, "audio": _UNSET,
}
# shaping parameters the router already checks through deployment capabilities (tools, json_*, fim)
_BY_CAPABILITY = frozenset({"tools", "tool_choice", "response_format", "suffix"})
ALWAYS = frozenset({"max_tokens", "max_completion_tokens", "stream", "stream_options", "stop"})
REASONING = frozenset({"reasoning", "reasoning_effort"})


def _asks(name: str, value: Any, defaults: Mapping[str, Any]) -> bool:
    if value is None:
        return False
    default = defaults[name]
    if name == "modalities":
        return bool(value != ["text"])
    return default is _UNSET or bool(value != default)


# derived once per (card, deployment): settings are frozen, so a card's answers never change; an entry holds its
# objects, so an id is never reused while it is cached (a reload brings new objects: bounded, cleared when full)
_HONOURED: dict[tuple[int, int], tuple[ModelConfig, Deployment, frozenset[str]]] = {}
_OFFERED: dict[int, tuple[ModelConfig, frozenset[str]]] = {}
_CACHE_MAX = 4096


def honoured(card: ModelConfig, dep: Deployment) -> frozenset[str]:
    """The OpenAI parameters this deployment honours."""
    hit = _HONOURED.get((id(card), id(dep)))
    if hit is not None and hit[0] is card and hit[1] is dep:
        return hit[2]
    out = _honoured(card, dep)
    if len(_HONOURED) >= _CACHE_MAX:
        _HONOURED.clear()
    _HONOURED[(id(card), id(dep))] = (card, dep, out)
    return out


def _honoured(card: ModelConfig, dep: Deployment) -> frozenset[str]:
    listed = dep.parameters if dep.parameters is not None else card.supported_parameters
    out = set(listed) | ALWAYS
    if "reasoning" in dep.capabilities:
        out |= REASONING
    if "max_tokens" in out:
        out.add("max_completion_tokens")
    return frozenset(out)


def model_parameters(card: ModelConfig) -> list[str]:
    """What `/v1/models` lists: every parameter some deployment of the model honours."""
    return sorted(offered(card))


def offered(card: ModelConfig) -> frozenset[str]:
    """:func:`model_parameters` as a set (asked per request: derived once per card)."""
    hit = _OFFERED.get(id(card))
    if hit is not None and hit[0] is card:
        return hit[1]
    out: set[str] = set(card.supported_parameters)
    for dep in card.deployments:
        out |= honoured(card, dep) - {"stream", "stream_options", "max_completion_tokens"}
    if len(_OFFERED) >= _CACHE_MAX:
        _OFFERED.clear()
    _OFFERED[id(card)] = (card, frozenset(out))
    return _OFFERED[id(card)][1]


def per_deployment(card: ModelConfig) -> list[dict[str, Any]]:
    """`/v1/models`: what each deployment honours (hosted and self-hosted hosts differ), in routing order."""
    return [{"provider": d.provider, "priority": d.priority,
             "supported_parameters": sorted(honoured(card, d) - {"stream", "stream_options", "max_completion_tokens"})}
            for d in sorted(card.deployments, key=lambda d: d.priority)]


def hints_in(body: Mapping[str, Any]) -> list[str]:
    """Hint parameters present in the body (any value but null): dropped where a deployment lacks them."""
    found = [k for k in HINTS if k in body and body[k] is not None]
    if "top_logprobs" in found and body.get("logprobs") is True:
        found.remove("top_logprobs")  # with logprobs it is part of what the answer is
    return found


def asked_hints(body: Mapping[str, Any]) -> frozenset[str]:
    """Hints with a non-default value: the ones `require_parameters` insists on."""
    return frozenset(k for k in hints_in(body) if _asks(k, body[k], HINTS))


_SHAPING_CHECKED = frozenset(SHAPING) - _BY_CAPABILITY


def asked_shaping(body: Mapping[str, Any]) -> frozenset[str]:
    """Shaping parameters with a non-default value that the capability check does not already cover."""
    out = {k for k in body if k in _SHAPING_CHECKED and _asks(k, body[k], SHAPING)}  # (a body has few keys)
    if body.get("logprobs") is True and body.get("top_logprobs") is not None:
        out.add("logprobs")
    return frozenset(out)


def missing(needed: Iterable[str], card: ModelConfig, dep: Deployment) -> str | None:
    """The first needed parameter this deployment does not honour (sorted: a stable answer), or None."""
    have = honoured(card, dep)
    for name in sorted(needed):
        if name not in have:
            return name
    return None


def dropped_for(body: Mapping[str, Any], card: ModelConfig, dep: Deployment) -> list[str]:
    """The hint parameters of ``body`` this deployment does not honour (dropped from its upstream request)."""
    have = honoured(card, dep)
    return [k for k in hints_in(body) if k not in have]


def without(body: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    names = list(names)
    if not names:
        return body
    out = dict(body)
    for k in names:
        out.pop(k, None)
    return out
