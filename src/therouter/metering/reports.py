"""Read side of metering: generation records, key summaries and details, usage rows and reports (usage.py), and
rebuilding counters from records.

Counters are caches of the records: the records are the truth. ``rebuild_totals`` re-reads a key's usage stream, recomputes every counter
the stream covers and compares it with what is stored; when the stream is complete (nothing trimmed:
``entries-added == length``) it overwrites the counters in one script that first checks no record was added
meanwhile (otherwise it recomputes, up to a few times). A period counter that already expired is not revived.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson

from therouter.keys import KeyRecord
from therouter.metering.admission import DAY, MeterOptions
from therouter.metering.layout import Layout, day_id, month_id, period_id, period_label
from therouter.metering.prices import nano_to_usd
from therouter.metering.records import COUNTER_FIELDS, GenerationRecord
from therouter.metering.scripts import Scripts
from therouter.metering.usage import UsageQuery, group, row, totals
from therouter.store import Store

Counts = dict[str, int]
_PAGE = 1000
_BATCH = 1000  # commands per pipeline when a report reads many counters


def counts(h: dict[str, str], prefix: str = "") -> Counts:
    return {f: int(h.get(prefix + f) or 0) for f in COUNTER_FIELDS}


class Reports:
    """``settled``: waits for this process's settlements in flight (``Meter.settled``); every read awaits it first, so
    a process reads its own answers' records (they are written just after the answers)."""

    def __init__(self, store: Store, layout: Layout, scripts: Scripts, clock: Callable[[], float],
                 options: MeterOptions, settled: Callable[[], Awaitable[None]]) -> None:
        self._store, self._layout, self._scripts, self._clock, self._options = store, layout, scripts, clock, options
        self._settled = settled
        # the client decodes replies to str (decode_responses=True); redis-py's stubs can't express that
        self._r: Any = store.redis

    async def generation(self, gen_id: str, key_id: str | None = None) -> dict[str, Any] | None:
        await self._settled()
        return await self._generation(gen_id, key_id)

    async def _generation(self, gen_id: str, key_id: str | None = None) -> dict[str, Any] | None:
        r, lay = self._r, self._layout
        kid = key_id or await self._store.call(lambda: r.get(lay.gen_index(gen_id)))
        if not kid:
            return None
        raw = await self._store.call(lambda: r.get(lay.gen(kid, gen_id)))
        return orjson.loads(raw) if raw else None

    async def generation_by_request(self, request_id: str, key_id: str) -> dict[str, Any] | None:
        await self._settled()
        r, lay = self._r, self._layout
        gen_id = await self._store.call(lambda: r.get(lay.rid(key_id, request_id)))
        return await self._generation(gen_id, key_id) if gen_id else None

    async def key_summary(self, key: KeyRecord) -> dict[str, Any]:
        await self._settled()
        lay, pid = self._layout, period_id(key.budget_period, self._clock())

        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hgetall(lay.per(key.id, "total"))
                pipe.hgetall(lay.per(key.id, pid))
                pipe.hget(lay.resv(key.id), "s:" + pid)
                return list(await pipe.execute())

        total_h, period_h, reserved_raw = await self._store.call(read)
        total, period, reserved = counts(total_h), counts(period_h), int(reserved_raw or 0)
        budget = key.budget_nano
        left = None if budget is None else max(budget - period["cost"] - reserved, 0)
        return {
            "key_id": key.id, "budget_period": key.budget_period, "period": pid, "period_label": period_label(pid),
            "budget_nano": budget, "budget_usd": None if budget is None else nano_to_usd(budget),
            "spend_nano": period["cost"], "spend_usd": nano_to_usd(period["cost"]),
            "reserved_nano": reserved, "budget_left_nano": left,
            "budget_left_usd": None if left is None else nano_to_usd(left),
            "total_spend_nano": total["cost"], "total_spend_usd": nano_to_usd(total["cost"]),
            "limits": {"rpm": key.rpm, "tpm": key.tpm,
                       "models": {m: {"rpm": r, "tpm": t} for m, (r, t) in key.model_limits.items()}},
            "requests": total["requests"], "tokens": _tokens(total),
            "period_requests": period["requests"], "period_tokens": _tokens(period),
        }

    async def key_detail(self, key: KeyRecord) -> dict[str, Any]:
        """The summary plus spend per period (total, this UTC day, this UTC month) and when it was last used."""
        await self._settled()
        lay, now = self._layout, self._clock()
        day, month = day_id(now), month_id(now)

        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hgetall(lay.per(key.id, "d:" + day))
                pipe.hgetall(lay.per(key.id, "m:" + month))
                return list(await pipe.execute())

        out = await self.key_summary(key)
        day_h, month_h = await self._store.call(read)
        total = {"cost": out["total_spend_nano"], "requests": out["requests"],
                 **{f"{t}_tokens": n for t, n in out["tokens"].items()}}
        out["spend"] = {
            "total": _spend(total),
            "day": {"period": f"{day[:4]}-{day[4:6]}-{day[6:]}", **_spend(counts(day_h))},
            "month": {"period": f"{month[:4]}-{month[4:]}", **_spend(counts(month_h))},
        }
        out["last_used_at"] = (await self.last_used([key.id]))[key.id]
        return out

    async def last_used(self, key_ids: list[str]) -> dict[str, int | None]:
        """When each key's newest request was settled (unix seconds, from its usage stream's last entry id: no
        write on the request path), or None if it has none."""
        await self._settled()
        if not key_ids:
            return {}
        lay = self._layout

        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for kid in key_ids:
                    pipe.xrevrange(lay.stream(kid), "+", "-", count=1)
                return list(await pipe.execute())

        last = await self._store.call(read)
        return {kid: int(entries[0][0].split("-", 1)[0]) // 1000 if entries else None
                for kid, entries in zip(key_ids, last, strict=True)}

    async def usage(self, q: UsageQuery) -> dict[str, Any]:
        """The grouped report of usage.py: ``{object, group_by, from, to, data: [rows], total}``."""
        await self._settled()
        r, lay = self._r, self._layout
        ids = [q.key_id] if q.key_id else sorted(await self._store.call(lambda: r.smembers(lay.keyset())))
        cells = [(kid, d) for d in q.days() for kid in ids]
        hashes: list[dict[str, str]] = []
        for i in range(0, len(cells), _BATCH):
            batch = cells[i:i + _BATCH]

            async def read(batch: list[tuple[str, str]] = batch) -> list[Any]:
                async with r.pipeline(transaction=False) as pipe:
                    for kid, d in batch:
                        pipe.hgetall(lay.named(kid, f"{q.source}:{d}"))
                    return list(await pipe.execute())

            hashes += await self._store.call(read)
        grouped = group(q, ((kid, d, h) for (kid, d), h in zip(cells, hashes, strict=True)))
        names: dict[str, str] = {}
        if "key" in q.group_by:
            found = await self._store.keys_by_ids(sorted({g.values["key"] for g in grouped}))
            names = {kid: rec.name for kid, rec in found.items()}
        return {"object": "list", "group_by": list(q.group_by), "from": q.first.isoformat(),
                "to": q.last.isoformat(), "data": [row(g, names) for g in grouped], "total": totals(grouped)}

    async def usage_rows(self, key_id: str | None = None, days: int = 7) -> list[dict[str, Any]]:
        """One row per key, model and UTC day, newest day first, for the last ``days`` days (today included)."""
        await self._settled()
        r, lay = self._r, self._layout
        ids = [key_id] if key_id else sorted(await self._store.call(lambda: r.smembers(lay.keyset())))
        now = self._clock()
        day_list = [day_id(now - i * DAY) for i in range(max(days, 1))]
        pairs = [(kid, d) for d in day_list for kid in ids]

        async def read() -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for kid, d in pairs:
                    pipe.hgetall(lay.bymodel(kid, d))
                return list(await pipe.execute())

        rows = []
        for (kid, d), h in zip(pairs, await self._store.call(read) if pairs else [], strict=True):
            models = sorted({f.rsplit("|", 1)[0] for f in h})
            for model in models:
                c = counts(h, model + "|")
                rows.append({"key_id": kid, "model": model, "day": f"{d[:4]}-{d[4:6]}-{d[6:]}",
                             **{k: v for k, v in c.items() if k != "cost"},
                             "cost_nano": c["cost"], "cost_usd": nano_to_usd(c["cost"])})
        return rows

    async def rebuild_totals(self, key_id: str, attempts: int = 5) -> dict[str, Any]:
        await self._settled()
        report: dict[str, Any] = {}
        for _ in range(attempts):
            report = await self._rebuild_once(key_id)
            if report["written"] or not report["complete"]:
                return report
        return report

    async def _rebuild_once(self, key_id: str) -> dict[str, Any]:
        lay, stream = self._layout, self._layout.stream(key_id)
        complete = await self._stream_complete(stream)
        records, last_id, after = await self._recompute(key_id, stream)
        names = list(after)
        before = await self._read_counters(key_id, names)
        report = {"key_id": key_id, "records": records, "complete": complete, "written": False,
                  "match": all(before.get(n) == after[n] for n in names if before.get(n) is not None),
                  "before": before, "after": after}
        if complete:
            spec = [{"fields": {f: str(v) for f, v in after[n].items()}, "always": n == "per:total"}
                    for n in names]
            keys = [stream] + [lay.named(key_id, n) for n in names]
            written = await self._scripts.run("rebuild", keys, [last_id, orjson.dumps(spec).decode()])
            report["written"] = int(written) == 1
        return report

    async def _stream_complete(self, stream: str) -> bool:
        r = self._r
        if not await self._store.call(lambda: r.exists(stream)):
            return True
        info = await self._store.call(lambda: r.xinfo_stream(stream))
        return int(info.get("entries-added", info["length"])) == int(info["length"])

    async def _recompute(self, key_id: str, stream: str) -> tuple[int, str, dict[str, Counts]]:
        """Sum the stream's records into every counter hash they touch, named like the layout (per:..., bymodel:...)."""
        r = self._r
        acc: dict[str, Counts] = defaultdict(lambda: defaultdict(int))
        acc["per:total"] = defaultdict(int)
        n, last_id, start = 0, "0-0", "-"
        while True:
            page = await self._store.call(partial(r.xrange, stream, min=start, max="+", count=_PAGE))
            for entry_id, fields in page:
                rec = GenerationRecord.from_dict(orjson.loads(fields["rec"]))
                c = rec.counters()
                for name in ("per:total", "per:d:" + fields["d"], "per:m:" + fields["m"]):
                    for f, v in c.items():
                        acc[name][f] += v
                for f, v in c.items():
                    acc["bymodel:" + fields["d"]][f"{rec.model}|{f}"] += v
                    acc["byprov:" + fields["d"]][f"{rec.provider}|{f}"] += v
                n, last_id = n + 1, entry_id
            if len(page) < _PAGE:
                break
            start = "(" + last_id
        out = {name: dict(v) for name, v in acc.items()}
        if not n:
            out["per:total"] = {f: 0 for f in COUNTER_FIELDS}
        return n, last_id, out

    async def _read_counters(self, key_id: str, names: list[str]) -> dict[str, Counts | None]:
        r, lay = self._r, self._layout

        async def read() -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for n in names:
                    pipe.hgetall(lay.named(key_id, n))
                return list(await pipe.execute())

        out: dict[str, Counts | None] = {}
        for n, h in zip(names, await self._store.call(read), strict=True):
            if not h:
                out[n] = None if n != "per:total" else {f: 0 for f in COUNTER_FIELDS}
            else:
                out[n] = {k: int(v) for k, v in h.items()}
        return out


def _spend(c: Counts) -> dict[str, Any]:
    return {"cost_nano": c["cost"], "cost_usd": nano_to_usd(c["cost"]), "requests": c["requests"],
            "tokens": _tokens(c)}


def _tokens(c: Counts) -> dict[str, int]:
    return {"prompt": c["prompt_tokens"], "completion": c["completion_tokens"], "cached": c["cached_tokens"],
            "reasoning": c["reasoning_tokens"]}

