"""Usage over a range of UTC days, grouped by key, model, provider and / or day: ``GET /admin/usage`` and
``therouter usage``.

Read from the per-key, per-day counters that settlement writes in the same script as the records (``bymodel:DAY``,
``byprov:DAY``: see layout.py), so a report costs one read per key and day, never a scan of the records. Those
counters live ``day_ttl`` (40 days); a range further back reads as no usage. ``model`` and ``provider`` cannot be
grouped together (no counter holds both); a key's usage by provider is counted from the version that added
``byprov`` onward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from therouter.errors import InvalidRequest
from therouter.metering.prices import nano_to_usd
from therouter.metering.records import COUNTER_FIELDS

DIMENSIONS = ("key", "model", "provider", "day")
MAX_DAYS = 366
DEFAULT_DAYS = 7


@dataclass(frozen=True, slots=True)
class UsageQuery:
    group_by: tuple[str, ...]
    first: date  # inclusive, UTC
    last: date  # inclusive, UTC
    key_id: str | None = None

    @property
    def source(self) -> str:
        """The per-day counter the report reads: ``byprov`` when grouping by provider, else ``bymodel``."""
        return "byprov" if "provider" in self.group_by else "bymodel"

    def days(self) -> list[str]:
        """YYYYMMDD, newest first."""
        n = (self.last - self.first).days + 1
        return [(self.last - timedelta(days=i)).strftime("%Y%m%d") for i in range(n)]


def usage_query(group_by: str | None, first: str | None, last: str | None, now: float, *, days: int | None = None,
                key_id: str | None = None) -> UsageQuery:
    """Parse the report's parameters (as given to the API or the CLI); raises InvalidRequest naming the bad one.
    ``first`` / ``last``: YYYY-MM-DD (UTC, inclusive); ``last`` defaults to today, ``first`` to ``days`` (7) days
    ending at ``last``."""
    dims = tuple(d.strip() for d in (group_by or "key,model,day").split(",") if d.strip())
    bad = [d for d in dims if d not in DIMENSIONS]
    if not dims or bad or len(set(dims)) != len(dims):
        raise InvalidRequest(f"group_by is a comma-separated list of {', '.join(DIMENSIONS)} (each at most once).",
                             param="group_by", code="invalid_value")
    if "model" in dims and "provider" in dims:
        raise InvalidRequest("group_by can have model or provider, not both.", param="group_by", code="invalid_value")
    end = _day(last, "to") if last else datetime.fromtimestamp(now, UTC).date()
    if first:
        start = _day(first, "from")
    else:
        n = DEFAULT_DAYS if days is None else days
        if not 1 <= n <= MAX_DAYS:
            raise InvalidRequest(f"days must be from 1 to {MAX_DAYS}.", param="days", code="invalid_value")
        start = end - timedelta(days=n - 1)
    if start > end:
        raise InvalidRequest("from must not be after to.", param="from", code="invalid_value")
    if (end - start).days + 1 > MAX_DAYS:
        raise InvalidRequest(f"A report covers at most {MAX_DAYS} days.", param="from", code="invalid_value")
    return UsageQuery(dims, start, end, key_id)


def _day(v: str, param: str) -> date:
    try:
        return date.fromisoformat(v.strip())
    except ValueError:
        raise InvalidRequest(f"{param} must be a date, YYYY-MM-DD (UTC).", param=param, code="invalid_value") from None


@dataclass(slots=True)
class Group:
    """One row of a report before it is rendered: its values per dimension and its summed counters."""

    values: dict[str, str]
    counts: dict[str, int]


def group(q: UsageQuery, cells: Iterable[tuple[str, str, dict[str, str]]]) -> list[Group]:
    """``(key id, YYYYMMDD, counter hash)`` cells -> one group per distinct value of the dimensions, newest day
    first, then dearest first."""
    acc: dict[tuple[str, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTER_FIELDS, 0))
    for key_id, day, h in cells:
        for name, value in h.items():
            sub, _, field = name.rpartition("|")  # model or provider, then the counter
            if field not in COUNTER_FIELDS:
                continue
            at = {"key": key_id, "day": f"{day[:4]}-{day[4:6]}-{day[6:]}", "model": sub, "provider": sub}
            acc[tuple(at[d] for d in q.group_by)][field] += int(value)
    groups = [Group(dict(zip(q.group_by, g, strict=True)), c) for g, c in acc.items()]
    groups.sort(key=lambda g: g.counts["cost"], reverse=True)
    if "day" in q.group_by:
        groups.sort(key=lambda g: g.values["day"], reverse=True)
    return groups


def row(g: Group, names: Mapping[str, str]) -> dict[str, Any]:
    """A group in the report's shape: its values (``key_id`` and ``key_name`` for a key, ``provider`` null when
    none served), the counts and the cost (nano-USD and exact USD text)."""
    out: dict[str, Any] = {}
    for d in DIMENSIONS:
        if d not in g.values:
            continue
        if d == "key":
            out["key_id"], out["key_name"] = g.values["key"], names.get(g.values["key"])
        else:
            out[d] = g.values[d] or None
    out.update({f: g.counts[f] for f in COUNTER_FIELDS if f != "cost"})
    out["cost_nano"], out["cost_usd"] = g.counts["cost"], nano_to_usd(g.counts["cost"])
    return out


def totals(groups: Iterable[Group]) -> dict[str, Any]:
    t = dict.fromkeys(COUNTER_FIELDS, 0)
    for g in groups:
        for f in COUNTER_FIELDS:
            t[f] += g.counts[f]
    out: dict[str, Any] = {f: t[f] for f in COUNTER_FIELDS if f != "cost"}
    out["cost_nano"], out["cost_usd"] = t["cost"], nano_to_usd(t["cost"])
    return out
