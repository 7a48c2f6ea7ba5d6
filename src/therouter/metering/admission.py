"""What admission hands to the rest of the request, and the meter's tunables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from therouter.config import Settings
from therouter.metering.prices import PriceVersion
from therouter.metering.ratelimit import WINDOW_MS

DAY = 86_400


@dataclass(frozen=True, slots=True)
class MeterOptions:
    reservation_ttl: int | None = None  # s; default: max(900, longest provider `timeouts.total` + 60)
    settled_ttl: int = 2 * DAY  # settle-once markers (Stripe: >= 24 h)
    record_ttl: int = 30 * DAY  # generation records readable by id
    day_ttl: int = 40 * DAY  # per-day counters (usage_rows can look back this far)
    month_ttl: int = 400 * DAY  # per-month counters
    stream_maxlen: int = 1_000_000  # per key, approximate: rebuild_totals is exact while nothing was trimmed
    feed_maxlen: int = 100_000  # the global usage feed, approximate
    window_ms: int = WINDOW_MS  # rate-limit window: RPM/TPM are per minute
    # while Redis is down each process enforces limit // divisor (fail-open share): the workers of this instance
    local_limit_divisor: int = 1
    tick: float = 1.0  # s between background passes (journal replay, orphan releases, price reload)
    price_refresh: float = 5.0  # s between price-table refreshes from Redis
    heartbeat_interval: float = 5.0  # s between this instance's heartbeats (and reaper passes)
    checkpoint_interval: float = 2.0  # s between checkpoints of the requests in flight
    instance_lost_after: float = 15.0  # s without a heartbeat after which an instance is lost and reaped

    @classmethod
    def from_settings(cls, settings: Settings) -> MeterOptions:
        m = settings.metering
        return cls(heartbeat_interval=m.heartbeat_interval, checkpoint_interval=m.checkpoint_interval,
                   instance_lost_after=m.instance_lost_after, local_limit_divisor=settings.server.workers)

    def reservation_ttl_for(self, settings: Settings) -> int:
        if self.reservation_ttl is not None:
            return self.reservation_ttl
        longest = max((p.timeouts.total for p in settings.providers.values()), default=0.0)
        return max(900, int(longest) + 60)


@dataclass(slots=True)
class Admission:
    """An admitted request. ``headers`` are the ``x-ratelimit-*`` headers for the answer (only for the dimensions
    the key limits). ``tracked``: a reservation exists in Redis (settle/release must clear it). ``local``: admitted
    by the in-process limiter while Redis was unreachable."""

    gen_id: str
    key_id: str
    model: str
    price: PriceVersion
    reserved_nano: int
    reserved_tokens: int
    admitted_at: float  # the meter's clock at admission: the request settles into this time's day and month
    window: int  # the rate-limit window the tokens were charged to (for reconciling TPM at settle)
    tracked: bool = False
    local: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # prices of the request's `models` fallbacks (captured at admission, like `price`): a fallback that serves is
    # settled at its own model's price
    fallback_prices: dict[str, PriceVersion] = field(default_factory=dict)
    # the most tokens this request can be billed for (0: no bound); the reservation covers exactly these at the
    # dearest price of every model it may be served by, and settlement clamps what an upstream reports to them
    max_prompt_tokens: int = 0
    max_completion_tokens: int = 0

    @property
    def price_version(self) -> int:
        return self.price.version

    def price_for(self, model: str) -> PriceVersion:
        """The price a record served by ``model`` is settled at."""
        if model == self.model:
            return self.price
        return self.fallback_prices.get(model, self.price)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gen_id": self.gen_id, "key_id": self.key_id, "model": self.model, "price": self.price.to_dict(),
            "reserved_nano": self.reserved_nano, "reserved_tokens": self.reserved_tokens,
            "admitted_at": self.admitted_at, "window": self.window, "tracked": self.tracked, "local": self.local,
            "fallback_prices": {m: p.to_dict() for m, p in self.fallback_prices.items()},
            "max_prompt_tokens": self.max_prompt_tokens, "max_completion_tokens": self.max_completion_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Admission:
        return cls(
            gen_id=str(d["gen_id"]), key_id=str(d["key_id"]), model=str(d["model"]),
            price=PriceVersion.from_dict(d["price"]), reserved_nano=int(d["reserved_nano"]),
            reserved_tokens=int(d["reserved_tokens"]), admitted_at=float(d["admitted_at"]), window=int(d["window"]),
            tracked=bool(d.get("tracked")), local=bool(d.get("local")),
            fallback_prices={str(m): PriceVersion.from_dict(p) for m, p in (d.get("fallback_prices") or {}).items()},
            max_prompt_tokens=int(d.get("max_prompt_tokens") or 0),
            max_completion_tokens=int(d.get("max_completion_tokens") or 0),
        )
