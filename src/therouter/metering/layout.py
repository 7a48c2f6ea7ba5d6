"""Redis key names of the metering package (one place, so the layout can be read and checked at a glance), and,
at the end of the table, the other keys the gateway writes under the same prefix (named in store.py).

``P`` is the store's key prefix (``store.k``). Every key touched by one per-key script carries the hash tag
``{k:KEY_ID}``, so all of them share one Cluster slot; price keys carry ``{MODEL}``. Key ids and model ids are
internal (``key_...``, the config's catalogue), never raw client strings.

Per API key (slot ``{k:ID}``)                     TTL
  P{k:ID}:per:total          hash  spend+counts     none (permanent total)
  P{k:ID}:per:d:YYYYMMDD     hash  spend+counts     day_ttl (40 d)
  P{k:ID}:per:m:YYYYMM       hash  spend+counts     month_ttl (400 d)
  P{k:ID}:bymodel:YYYYMMDD   hash  "MODEL|field"    day_ttl
  P{k:ID}:byprov:YYYYMMDD    hash  "PROVIDER|field" day_ttl   (provider "" when none served)
  P{k:ID}:resv               hash  g:GEN -> reservation, s:PERIOD -> reserved nano   reservation_ttl + 60 s
  P{k:ID}:resvexp            zset  GEN by expiry (ms, injected clock)               reservation_ttl + 60 s
  P{k:ID}:rl:r:WINDOW        str   requests admitted in a window                    2 windows
  P{k:ID}:rl:t:WINDOW        str   tokens admitted in a window                      2 windows
  P{k:ID}:rl:r|MODEL:WINDOW  str   requests, a key's per-model RPM override          2 windows
  P{k:ID}:rl:t|MODEL:WINDOW  str   tokens, a key's per-model TPM override            2 windows
  P{k:ID}:settled:GEN        str   settle-once marker                               settled_ttl (48 h)
  P{k:ID}:gen:GEN            str   generation record JSON                           record_ttl (30 d)
  P{k:ID}:rid:REQUEST_ID     str   the key's newest GEN with that x-request-id       record_ttl
  P{k:ID}:usage              stream the key's records (exactly once; rebuild source)  none, MAXLEN ~ stream_maxlen
Global
  P price:{MODEL}            hash  newest price version (+ source)                  none (catalogue)
  P pricehist:{MODEL}        zset  every version (JSON) by effective_at             none (catalogue)
  P usage                    stream every record (feed for exporters, at-least-once) none, MAXLEN ~ feed_maxlen
  P meter:keys               set   key ids that have usage                          none (index)
  P gen:GEN                  str   GEN -> key id (lets generation(id) find the record) record_ttl
Gateway instances (slot {meter}, see instance.py)
  P{meter}:instances         zset  instance id by last heartbeat (ms, meter clock)   reservation_ttl + 60 s, renewed
  P{meter}:inflight:INST     hash  GEN -> the instance's in-flight request (JSON)     reservation_ttl + 60 s, renewed
Not metering (store.py): API keys and shared routing state
  P keys                     set   every key id                                     none (index)
  P keyid:ID                 str   key id -> hash of the key                        none
  P key:HASH                 hash  the key's record (never the key itself)           none
  P{route}:drain:PROVIDER    str   wall time the provider was drained               routing.drain_ttl
  P{route}:cool:PROVIDER|UPSTREAM_MODEL  str  wall time its Retry-After cooldown ends  the cooldown
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from therouter.keys import BudgetPeriod

_MAX_TAGS = 10_000  # key ids whose tag is kept (cleared when full)


def day_id(at: float) -> str:
    return _day(int(at // 86400))[0]


def month_id(at: float) -> str:
    return _day(int(at // 86400))[1]


@functools.lru_cache(maxsize=64)
def _day(day: int) -> tuple[str, str]:
    """A UTC day (days since the epoch) -> ("YYYYMMDD", "YYYYMM"): formatted once per day, not per request."""
    d = datetime.fromtimestamp(day * 86400, UTC)
    return d.strftime("%Y%m%d"), d.strftime("%Y%m")


def period_id(period: BudgetPeriod, at: float) -> str:
    """The budget period a time falls in: "total", "d:YYYYMMDD" or "m:YYYYMM" (UTC)."""
    if period == "day":
        return "d:" + day_id(at)
    if period == "month":
        return "m:" + month_id(at)
    return "total"


def period_label(pid: str) -> str:
    """Human form for messages: "total budget", "day 2025-01-31 (UTC)", "month 2025-01 (UTC)"."""
    if pid.startswith("d:"):
        d = pid[2:]
        return f"day {d[:4]}-{d[4:6]}-{d[6:]} (UTC)"
    if pid.startswith("m:"):
        m = pid[2:]
        return f"month {m[:4]}-{m[4:]} (UTC)"
    return "total budget"


class Layout:
    """Key names. A key's tag ``P{k:ID}:`` is formatted once per key id (a bounded cache: the request path names
    two dozen keys per request, all under one tag)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._tags: dict[str, str] = {}

    def tag(self, key_id: str) -> str:
        """``P{k:ID}:``, the start of every per-key key name."""
        t = self._tags.get(key_id)
        if t is None:
            if len(self._tags) >= _MAX_TAGS:
                self._tags.clear()
            t = self._tags[key_id] = self.prefix + "{k:" + key_id + "}:"
        return t

    def named(self, key_id: str, name: str) -> str:
        """A per-key key by its short name ("per:total", "bymodel:20250131", ...)."""
        return self.tag(key_id) + name

    def per(self, key_id: str, pid: str) -> str:
        return self.tag(key_id) + "per:" + pid

    def bymodel(self, key_id: str, day: str) -> str:
        return self.tag(key_id) + "bymodel:" + day

    def byprov(self, key_id: str, day: str) -> str:
        return self.tag(key_id) + "byprov:" + day

    def resv(self, key_id: str) -> str:
        return self.tag(key_id) + "resv"

    def resvexp(self, key_id: str) -> str:
        return self.tag(key_id) + "resvexp"

    def rl(self, key_id: str, dim: str, window: int) -> str:
        return f"{self.tag(key_id)}rl:{dim}:{window}"

    def settled(self, key_id: str, gen_id: str) -> str:
        return self.tag(key_id) + "settled:" + gen_id

    def gen(self, key_id: str, gen_id: str) -> str:
        return self.tag(key_id) + "gen:" + gen_id

    def rid(self, key_id: str, request_id: str) -> str:
        return self.tag(key_id) + "rid:" + request_id

    def stream(self, key_id: str) -> str:
        return self.tag(key_id) + "usage"

    def price(self, model: str) -> str:
        return f"{self.prefix}price:{{{model}}}"

    def pricehist(self, model: str) -> str:
        return f"{self.prefix}pricehist:{{{model}}}"

    def feed(self) -> str:
        return self.prefix + "usage"

    def keyset(self) -> str:
        return self.prefix + "meter:keys"

    def gen_index(self, gen_id: str) -> str:
        return self.prefix + "gen:" + gen_id

    def instances(self) -> str:
        return self.prefix + "{meter}:instances"

    def inflight(self, instance_id: str) -> str:
        return self.prefix + "{meter}:inflight:" + instance_id
