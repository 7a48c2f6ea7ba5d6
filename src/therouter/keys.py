"""API keys: generation, hashing and the record kept for each (only the hash of a key is ever stored)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

KEY_PREFIX = "tr-"
KEY_ID = re.compile(r"key_[A-Za-z0-9]{1,64}")  # what a key id looks like (anything else is never echoed back)
BudgetPeriod = Literal["total", "day", "month"]
KeyStatus = Literal["active", "revoked", "expired"]


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
    expires_at: int | None = None  # unix seconds; from then on the key gets exactly an unknown key's 401
    metadata: dict[str, str] = field(default_factory=dict)  # the operator's labels (never used by the gateway)

    def status(self, now: float) -> KeyStatus:
        if self.revoked:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

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
            "expires_at": "" if self.expires_at is None else str(self.expires_at),
            "metadata": json.dumps(self.metadata, sort_keys=True) if self.metadata else "",
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
            expires_at=opt("expires_at"),
            metadata={str(k): str(v) for k, v in json.loads(h.get("metadata") or "{}").items()},
        )

    def public(self, now: float | None = None) -> dict[str, Any]:
        """What admin listings show (never the key itself: only its hint)."""
        d = asdict(self)
        d["models"] = list(self.models)
        d["model_limits"] = {m: {"rpm": r, "tpm": t} for m, (r, t) in self.model_limits.items()}
        d["status"] = self.status(time.time() if now is None else now)
        return d
