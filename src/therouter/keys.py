"""API keys: generation, hashing and the record kept for each (only the hash of a key is ever stored)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

KEY_PREFIX = "tr-"
BudgetPeriod = Literal["total", "day", "month"]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def display(key: str) -> str:
    """What lists may show: the prefix and the last four characters."""
    return f"{key[:7]}...{key[-4:]}"


@dataclass(slots=True)
class KeyRecord:
    id: str
    name: str
    hint: str
    created: int = field(default_factory=lambda: int(time.time()))
    revoked: bool = False
    budget_nano: int | None = None  # spend limit in nano-USD
    budget_period: BudgetPeriod = "total"
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] = ()  # empty: every model
    # per-model overrides: model id -> (rpm, tpm), enforced in addition to the key's own rpm / tpm
    model_limits: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)

    def limits_for(self, model: str) -> tuple[int | None, int | None]:
        return self.model_limits.get(model, (None, None))

    def to_redis(self) -> dict[str, str]:
        d = asdict(self)
        return {
            "id": self.id, "name": self.name, "hint": self.hint, "created": str(self.created),
            "revoked": "1" if self.revoked else "0",
            "budget_nano": "" if self.budget_nano is None else str(self.budget_nano),
            "budget_period": d["budget_period"],
            "rpm": "" if self.rpm is None else str(self.rpm),
            "tpm": "" if self.tpm is None else str(self.tpm),
            "models": ",".join(self.models),
            "model_limits": json.dumps({m: list(v) for m, v in self.model_limits.items()}) if self.model_limits else "",
        }

    @classmethod
    def from_redis(cls, h: dict[str, str]) -> KeyRecord:
        def opt(k: str) -> int | None:
            v = h.get(k) or ""
            return int(v) if v else None

        period = h.get("budget_period") or "total"
        return cls(
            id=h["id"], name=h.get("name", ""), hint=h.get("hint", ""), created=int(h.get("created") or 0),
            revoked=h.get("revoked") == "1", budget_nano=opt("budget_nano"),
            budget_period=period if period in ("total", "day", "month") else "total",  # type: ignore[arg-type]
            rpm=opt("rpm"), tpm=opt("tpm"),
            models=tuple(m for m in (h.get("models") or "").split(",") if m),
            model_limits={m: (v[0], v[1]) for m, v in json.loads(h.get("model_limits") or "{}").items()},
        )

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        d["model_limits"] = {m: {"rpm": r, "tpm": t} for m, (r, t) in self.model_limits.items()}
        return d
