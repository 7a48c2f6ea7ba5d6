"""Bearer key -> KeyRecord.

Only the SHA-256 of a key is stored; lookups go by hash, so no plaintext comparison happens at all, and the admin key
is compared with ``hmac.compare_digest``. Recently seen keys stay valid from a short local cache while the store is
down (unknown keys then get 503, not 401: we cannot tell). Keys are never logged or echoed. A revoked key, and a key
past its ``expires_at`` (checked on every request, against the wall clock, cached or not), get exactly an unknown
key's answer.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from therouter.errors import AuthenticationFailed, StoreUnavailable
from therouter.keys import KeyRecord, hash_key
from therouter.store import Store

FRESH_SECONDS = 2.0  # served from the cache without asking the store (revocation is seen within this)
INCORRECT_KEY = "Incorrect API key provided."


def bearer(header: str | None) -> str:
    if not header:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("The Authorization header must be 'Bearer YOUR_KEY'.")
    return token


class Authenticator:
    def __init__(self, store: Store, stale_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.store = store
        self.stale_seconds = stale_seconds
        self.clock = clock
        self.wall = wall  # for expires_at (unix seconds)
        self._cache: dict[str, tuple[KeyRecord, float]] = {}

    async def authenticate(self, header: str | None) -> KeyRecord:
        h = hash_key(bearer(header))
        now = self.clock()
        hit = self._cache.get(h)
        if hit and now - hit[1] < FRESH_SECONDS:
            rec = hit[0]
        else:
            try:
                found = await self.store.key_by_hash(h)
            except StoreUnavailable:
                if hit and now - hit[1] < self.stale_seconds:
                    found = hit[0]
                else:
                    raise StoreUnavailable("The key store is unavailable; retry shortly.", retry_after=2) from None
            else:
                if found is None:
                    self._cache.pop(h, None)
                else:
                    if len(self._cache) > 100_000:
                        self._cache.clear()
                    self._cache[h] = (found, now)
            if found is None:
                raise AuthenticationFailed(INCORRECT_KEY)
            rec = found
        if rec.status(self.wall()) != "active":  # revoked or expired: exactly the unknown key's answer
            raise AuthenticationFailed(INCORRECT_KEY)
        return rec


def admin_ok(expected: str | None, header: str | None) -> bool:
    if not expected:
        return False
    try:
        token = bearer(header)
    except AuthenticationFailed:
        return False
    return hmac.compare_digest(token.encode(), expected.encode())
