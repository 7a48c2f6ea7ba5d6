"""What an operator may set on an API key, checked in one place for the admin API and the command line.

Settings arrive as a JSON-like mapping: the body of ``POST /admin/keys`` / ``PATCH /admin/keys/{id}``, or the same
mapping built by ``therouter keys create|update`` from its flags. :func:`key_fields` turns it into ``KeyRecord``
attribute values or raises :class:`InvalidRequest` naming the field (``param``); ``labels`` lets the CLI name its
flags (``--budget``) in the message instead of the JSON field. Pure: no I/O.

Rules (a field left out is left as it is; on an update ``null`` clears it):

* ``name``: 1-128 characters, no control characters (required on create).
* ``budget_usd``: more than 0 and at most ``MAX_BUDGET_USD``, at most 9 decimals (budgets are exact in the admission
  script's arithmetic up to 2**53 nano-USD, about 9 million USD); ``null``: no budget.
* ``budget_period``: ``total``, ``day`` or ``month`` (UTC).
* ``rpm`` / ``tpm``: whole numbers from 1 to ``MAX_LIMIT``; ``null``: no limit. There is no "0 = blocked": revoke.
* ``models``: model ids of the catalogue; ``[]`` or ``null``: every model.
* ``model_limits``: ``{MODEL: {"rpm": N | null, "tpm": N | null}}`` (catalogue models, at least one limit each),
  enforced on top of the key's own limits; replaces the whole map.
* ``expires_at``: unix seconds or ISO 8601 (UTC when no offset is given), in the future and at most 10 years ahead;
  ``null``: never. From then on the key gets exactly an unknown key's 401.
* ``metadata``: up to 16 string pairs, keys up to 64 characters, values up to 512 (OpenAI's metadata rules); replaces
  the whole map; ``null``: none.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from therouter.config import usd_to_nano
from therouter.errors import InvalidRequest

MAX_BUDGET_USD = 9_000_000
MAX_LIMIT = 10**9  # rpm / tpm: far above any real limit, and exact in the admission script's window arithmetic
MAX_AHEAD = 10 * 366 * 86_400  # s: how far ahead a key may expire
MAX_NAME = 128
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
FIELDS = ("name", "budget_usd", "budget_period", "rpm", "tpm", "models", "model_limits", "expires_at", "metadata")
PERIODS = ("total", "day", "month")


def key_fields(body: Any, catalogue: Collection[str], now: float, *, creating: bool,
               labels: Mapping[str, str] | None = None, aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A create / update body -> the ``KeyRecord`` attributes it sets (see the module rules). A model alias is
    stored as the model it names (routing, limits and records all use the canonical id)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("The body must be a JSON object with the key's settings: " + ", ".join(FIELDS) + ".")
    unknown = [f for f in body if f not in FIELDS]
    if unknown:
        raise InvalidRequest(f"Unknown field `{str(unknown[0])[:64]}`; a key takes {', '.join(FIELDS)}.",
                             param=str(unknown[0])[:64], code="unknown_field")
    if creating and body.get("name") is None:
        raise InvalidRequest("A key needs a `name`.", param="name", code="missing_field")
    if not creating and not body:
        raise InvalidRequest("Nothing to change: give at least one of " + ", ".join(FIELDS) + ".")
    def label(f: str) -> str:
        return (labels or {}).get(f, f)

    out: dict[str, Any] = {}
    for f, v in body.items():
        if v is None and f in ("name", "budget_period"):
            raise InvalidRequest(f"{label(f)} cannot be null.", param=f, code="invalid_value")
        if aliases and f == "models" and isinstance(v, list):
            v = [aliases.get(m, m) if isinstance(m, str) else m for m in v]
        if aliases and f == "model_limits" and isinstance(v, Mapping):
            v = {aliases.get(m, m) if isinstance(m, str) else m: lim for m, lim in v.items()}
        out.update(_parse(f, v, catalogue, now, label(f)))
    return out


def _parse(f: str, v: Any, catalogue: Collection[str], now: float, label: str) -> dict[str, Any]:
    if f == "name":
        return {"name": _name(v, label)}
    if f == "budget_usd":
        return {"budget_nano": None if v is None else budget_nano(v, label)}
    if f == "budget_period":
        if v not in PERIODS:
            raise _bad(f, f"{label} must be one of {', '.join(PERIODS)}.")
        return {"budget_period": v}
    if f in ("rpm", "tpm"):
        return {f: None if v is None else limit(v, label, f)}
    if f == "models":
        return {"models": () if v is None else _models(v, catalogue, label)}
    if f == "model_limits":
        return {"model_limits": {} if v is None else _model_limits(v, catalogue, label)}
    if f == "expires_at":
        return {"expires_at": None if v is None else expires_at(v, now, label)}
    return {"metadata": {} if v is None else _metadata(v, label)}


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _name(v: Any, label: str) -> str:
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise _bad("name", f"{label} must be 1-{MAX_NAME} characters without control characters.")
    return v


def budget_nano(v: Any, label: str = "budget_usd") -> int:
    """A budget in USD (a number or its decimal text) -> nano-USD: more than 0, at most MAX_BUDGET_USD."""
    try:
        nano = usd_to_nano(v, label, MAX_BUDGET_USD)
    except ValueError as e:
        raise _bad("budget_usd", str(e)) from None
    if nano == 0:
        raise _bad("budget_usd", f"{label} must be more than 0 USD (leave it out for no budget; revoke a key to stop "
                                 "it)")
    return nano


def limit(v: Any, label: str, param: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(param, f"{label} must be a whole number from 1 to {MAX_LIMIT:,}.")
    if not 1 <= v <= MAX_LIMIT:
        raise _bad(param, f"{label} must be at least 1 and at most {MAX_LIMIT:,}, got {v} (leave it out for no "
                          "limit).")
    return v


def _models(v: Any, catalogue: Collection[str], label: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
        raise _bad("models", f"{label} must be a list of model ids.")
    unknown = [m for m in v if m not in catalogue]
    if unknown:
        raise _bad("models", f"{label}: unknown model(s): {', '.join(m[:100] for m in unknown[:5])}.")
    return tuple(dict.fromkeys(v))


def _model_limits(v: Any, catalogue: Collection[str], label: str) -> dict[str, tuple[int | None, int | None]]:
    if not isinstance(v, Mapping):
        raise _bad("model_limits", f'{label} must be an object {{MODEL: {{"rpm": N, "tpm": N}}}}.')
    out: dict[str, tuple[int | None, int | None]] = {}
    for model, lim in v.items():
        if model not in catalogue:
            raise _bad("model_limits", f"{label}: unknown model: {str(model)[:100]}.")
        if not isinstance(lim, Mapping) or set(lim) - {"rpm", "tpm"} or all(lim.get(d) is None for d in ("rpm", "tpm")):
            raise _bad("model_limits", f'{label}: {model} needs {{"rpm": N, "tpm": N}} with at least one limit.')
        rpm, tpm = (None if lim.get(d) is None else limit(lim[d], f"{label}: {model} limits", "model_limits")
                    for d in ("rpm", "tpm"))
        out[model] = (rpm, tpm)
    return out


def expires_at(v: Any, now: float, label: str = "expires_at") -> int:
    """Unix seconds or ISO 8601 -> whole unix seconds, after ``now`` and at most 10 years ahead."""
    when: int | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        when = v
    elif isinstance(v, float) and v.is_integer():
        when = int(v)
    elif isinstance(v, str) and v.strip().isdigit():
        when = int(v.strip())
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            when = None
        else:
            when = int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())
    if when is None:
        raise _bad("expires_at", f"{label} must be unix seconds or an ISO 8601 time (e.g. 2030-01-31T00:00:00Z).")
    if not now < when <= now + MAX_AHEAD:
        raise _bad("expires_at", f"{label} must be in the future and at most 10 years ahead (to stop a key now, "
                                 "revoke it).")
    return when


def _metadata(v: Any, label: str) -> dict[str, str]:
    ok = isinstance(v, Mapping) and len(v) <= METADATA_PAIRS and all(
        isinstance(k, str) and isinstance(x, str) and 0 < len(k) <= METADATA_KEY and len(x) <= METADATA_VALUE
        for k, x in v.items())
    if not ok:
        raise _bad("metadata", f"{label} must be up to {METADATA_PAIRS} string pairs, keys 1-{METADATA_KEY} "
                               f"characters, values up to {METADATA_VALUE}.")
    return dict(v)
