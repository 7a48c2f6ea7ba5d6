"""API keys in the real store (single node and cluster: creation writes three slots without MULTI): create, list,
look up, update only what changed, revoke; and the authenticator's answer for a revoked or expired key."""

from __future__ import annotations

import asyncio

import pytest

from tests.metering._helpers import FakeClock
from therouter.auth import INCORRECT_KEY, Authenticator
from therouter.errors import AuthenticationFailed
from therouter.keys import hash_key
from therouter.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the shared redis fixtures live in the session loop


async def test_create_list_update_revoke(store: Store) -> None:
    key, rec = await store.create_key("ops", budget_nano=5 * 10**9, budget_period="day", rpm=10,
                                      models=("qwen",), model_limits={"qwen": (5, None)}, expires_at=4_000_000_000,
                                      metadata={"team": "search"})
    assert key.startswith("tr-") and rec.hint == f"{key[:7]}...{key[-4:]}"
    assert [k.id for k in await store.list_keys()] == [rec.id]
    stored = (await store.keys_by_ids([rec.id, "key_missing"]))
    assert list(stored) == [rec.id] and stored[rec.id] == rec  # every field round-trips, unknown ids left out
    assert await store.key_by_hash(hash_key(key)) == rec

    updated = await store.update_key(rec.id, rpm=None, metadata={"team": "ads"}, expires_at=None)
    assert updated is not None and (updated.rpm, updated.metadata, updated.expires_at) == (None, {"team": "ads"}, None)
    again = (await store.keys_by_ids([rec.id]))[rec.id]
    assert again == updated and (again.budget_nano, again.models, again.model_limits) == (
        5 * 10**9, ("qwen",), {"qwen": (5, None)})  # untouched fields kept
    assert await store.update_key("key_missing", rpm=1) is None

    assert await store.revoke_key(rec.id)
    assert (await store.keys_by_ids([rec.id]))[rec.id].revoked


async def test_concurrent_updates_of_different_fields_both_stay(store: Store) -> None:
    _, rec = await store.create_key("racy")
    await asyncio.gather(store.update_key(rec.id, rpm=7), store.update_key(rec.id, tpm=700),
                         store.update_key(rec.id, name="renamed"))
    got = (await store.keys_by_ids([rec.id]))[rec.id]
    assert (got.rpm, got.tpm, got.name) == (7, 700, "renamed")


async def test_revoked_and_expired_keys_get_an_unknown_keys_401(store: Store) -> None:
    wall = FakeClock(1_900_000_000.0)
    auth = Authenticator(store, wall=wall)
    key, rec = await store.create_key("expiring", expires_at=1_900_000_010)
    assert (await auth.authenticate(f"Bearer {key}")).id == rec.id
    wall.advance(10)  # exactly at expires_at: gone, even from the cache (checked on every request)
    answers = []
    for header in (f"Bearer {key}", "Bearer tr-made-up-key"):
        with pytest.raises(AuthenticationFailed) as e:
            await auth.authenticate(header)
        answers.append((e.value.status, e.value.body()))
    assert answers[0] == answers[1] == (401, {"error": {"message": INCORRECT_KEY, "type": "invalid_request_error",
                                                        "param": None, "code": "invalid_api_key"}})
    assert rec.status(wall()) == "expired"
