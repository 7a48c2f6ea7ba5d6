"""Keys and usage over HTTP (/admin/keys, /admin/usage) and the CLI on the same operations, against a real gateway
with two worker processes: a change made on one is applied by both within the auth cache's 2 s, an expired key gets
exactly an unknown key's 401, and the plaintext of a key is in the answer to its creation only."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis

from tests.integration.conftest import (
    ADMIN_KEY,
    Fake,
    Gateway,
    own_config,
    running,
    start_gateway,
    wait_for,
)
from tests.integration.test_cli import therouter
from therouter.redisproc import RedisProcess

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw2(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with two worker processes."""
    tmp = tmp_path_factory.mktemp("gw2")
    with running(start_gateway(own_config(redis_proc.url, fakes, tmp, "ak"), tmp, workers=2)) as gw:
        yield gw


def admin(gw: Gateway, method: str, path: str, body: Any = None, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gw.url + "/admin" + path, headers=headers, json=body, timeout=10)


def chat(gw: Gateway, key: str) -> httpx.Response:
    """On a new connection each time, so both workers take some."""
    return httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": HELLO}, timeout=20)


def served_by_each_worker(gw: Gateway, key: str, fakes: dict[str, Fake]) -> list[httpx.Response]:
    """Concurrent slow requests until both workers have served some; each answer is matched to the worker that
    served it by its generation id, seen in that worker's in-flight registry in Redis while it was in flight."""
    r = redis.Redis.from_url(gw.redis_url, decode_responses=True)
    fakes["deepseek"].configure(latency_ms=700)
    answers: list[httpx.Response] = []
    owner: dict[str, str] = {}
    try:
        for _ in range(6):
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(chat, gw, key) for _ in range(8)]
                while not all(f.done() for f in futures):
                    for inst in r.zrange(gw.prefix + "{meter}:instances", 0, -1):
                        for gen in r.hkeys(gw.prefix + "{meter}:inflight:" + inst):
                            owner[gen] = inst
                    time.sleep(0.02)
                answers += [f.result() for f in futures]
            if len({owner.get(a.json().get("id", "")) for a in answers} - {None}) == 2:
                return answers
        pytest.fail(f"the two workers did not both serve within 48 requests: {set(owner.values())}")
    finally:
        fakes["deepseek"].configure(latency_ms=0)
        r.close()


def test_key_crud_over_http_and_an_update_seen_by_both_workers(gw2: Gateway, fakes: dict[str, Fake]) -> None:
    made = admin(gw2, "POST", "/keys", {"name": "crud", "budget_usd": "5", "budget_period": "month",
                                        "metadata": {"team": "search"}})
    assert made.status_code == 201, made.text
    body = made.json()
    key, key_id = body["key"], body["id"]
    assert key.startswith("tr-") and body["hint"] == f"{key[:7]}...{key[-4:]}"
    assert (body["status"], body["budget_nano"], body["budget_period"], body["metadata"]) == (
        "active", 5 * 10**9, "month", {"team": "search"})

    before = served_by_each_worker(gw2, key, fakes)  # both workers now hold the key in their cache
    assert all(a.status_code == 200 and "x-ratelimit-limit-requests" not in a.headers for a in before)

    patched = admin(gw2, "PATCH", f"/keys/{key_id}", {"rpm": 1000, "tpm": 10**7})
    assert patched.status_code == 200 and (patched.json()["rpm"], patched.json()["tpm"]) == (1000, 10**7)
    time.sleep(2.2)  # the auth cache's freshness (FRESH_SECONDS = 2)
    after = served_by_each_worker(gw2, key, fakes)
    assert all(a.status_code == 200 and a.headers["x-ratelimit-limit-requests"] == "1000" for a in after)

    # a worker writes a request's record just after its answer: a read served by the other worker may come before
    # it (README: "The answer does not wait for the record"), so wait until both workers' records are in
    served = len(before) + len(after)
    assert wait_for(lambda: admin(gw2, "GET", f"/keys/{key_id}").json()["spend"]["total"]["requests"] == served)
    listing = admin(gw2, "GET", "/keys")
    assert listing.status_code == 200 and key not in listing.text  # the plaintext never again
    row = next(k for k in listing.json()["data"] if k["id"] == key_id)
    assert row["last_used_at"] is not None and row["rpm"] == 1000
    detail = admin(gw2, "GET", f"/keys/{key_id}").json()
    assert key not in json.dumps(detail)
    assert detail["spend"]["total"]["requests"] == served
    assert 0 < detail["spend"]["month"]["cost_nano"] == detail["spend_nano"] <= 5 * 10**9
    assert abs(detail["last_used_at"] - time.time()) < 60 and detail["limits"]["rpm"] == 1000

    assert admin(gw2, "PATCH", f"/keys/{key_id}", {"models": ["selfhost/only-vllm"]}).status_code == 200
    time.sleep(2.2)
    refused = [chat(gw2, key) for _ in range(8)]
    assert {(r.status_code, r.json()["error"]["code"]) for r in refused} == {(403, "model_not_allowed")}

    gone = admin(gw2, "DELETE", f"/keys/{key_id}")
    assert gone.status_code == 200 and gone.json()["revoked"] is True
    assert admin(gw2, "GET", f"/keys/{key_id}").json()["status"] == "revoked"
    conflict = admin(gw2, "PATCH", f"/keys/{key_id}", {"rpm": 5})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "key_revoked"
    time.sleep(2.2)
    assert {chat(gw2, key).status_code for _ in range(6)} == {401}


def test_an_expired_key_gets_exactly_an_unknown_keys_401(gw2: Gateway) -> None:
    expires = int(time.time()) + 3
    made = admin(gw2, "POST", "/keys", {"name": "short-lived",
                                        "expires_at": datetime.fromtimestamp(expires, UTC).isoformat()})
    assert made.status_code == 201 and made.json()["expires_at"] == expires
    key, key_id = made.json()["key"], made.json()["id"]
    assert chat(gw2, key).status_code == 200
    time.sleep(max(expires - time.time(), 0) + 0.3)
    expired, unknown = chat(gw2, key), chat(gw2, "tr-" + uuid.uuid4().hex)
    assert expired.status_code == unknown.status_code == 401
    assert expired.json() == unknown.json()
    same = ("content-type", "x-should-retry", "content-length")
    assert {h: expired.headers.get(h) for h in same} == {h: unknown.headers.get(h) for h in same}
    assert admin(gw2, "GET", f"/keys/{key_id}").json()["status"] == "expired"


@pytest.mark.parametrize("method,path,body,status,param", [
    ("POST", "/keys", {"name": "x", "rpm": 0}, 400, "rpm"),
    ("POST", "/keys", {"name": "x", "tpm": -5}, 400, "tpm"),
    ("POST", "/keys", {"name": "x", "budget_usd": 1e30}, 400, "budget_usd"),
    ("POST", "/keys", {"name": "x", "budget_usd": 0}, 400, "budget_usd"),
    ("POST", "/keys", {"name": "x", "models": ["no/such"]}, 400, "models"),
    ("POST", "/keys", {"name": "x", "expires_at": 1}, 400, "expires_at"),
    ("POST", "/keys", {"name": "x", "api_base": "http://169.254.169.254"}, 400, "api_base"),
    ("POST", "/keys", {"budget_usd": 5}, 400, "name"),
    ("POST", "/keys", ["not", "an", "object"], 400, None),
    ("PATCH", "/keys/key_doesnotexist", {"rpm": 5}, 404, "id"),
    ("GET", "/keys/key_doesnotexist", None, 404, "id"),
    ("DELETE", "/keys/key_doesnotexist", None, 404, "id"),
    ("GET", "/usage?group_by=model,provider", None, 400, "group_by"),
    ("GET", "/usage?from=2025-02-30", None, 400, "from"),
    ("GET", "/usage?key=tr-abc", None, 400, "key"),
])
def test_bad_admin_input_is_a_clear_error(gw2: Gateway, method: str, path: str, body: Any, status: int,
                                          param: str | None) -> None:
    r = admin(gw2, method, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_admin_key_required_and_pasted_keys_never_echoed(gw2: Gateway) -> None:
    made = admin(gw2, "POST", "/keys", {"name": "pasted"}).json()
    for who in (None, made["key"], "wrong"):
        r = admin(gw2, "GET", "/keys", key=who)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    r = admin(gw2, "GET", "/keys/" + made["key"])  # a key pasted where its id goes
    assert r.status_code == 404 and made["key"] not in r.text and made["key"][-8:] not in r.text
    r = httpx.post(gw2.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, content=b"{nope")
    assert r.status_code == 400


def test_usage_over_http_and_from_the_cli(gw2: Gateway) -> None:
    made = admin(gw2, "POST", "/keys", {"name": "reporting"}).json()
    key, key_id = made["key"], made["id"]
    costs = [chat(gw2, key).json()["usage"]["cost"] for _ in range(3)]
    assert all(costs)
    today = datetime.now(UTC).date().isoformat()

    def rows() -> list[dict[str, Any]]:  # (the other worker may answer before the last record is written)
        return [r for r in admin(gw2, "GET", f"/usage?group_by=key&from={today}&to={today}").json()["data"]
                if r["key_id"] == key_id and r["requests"] == 3]

    assert wait_for(rows)

    by_key = admin(gw2, "GET", f"/usage?group_by=key&from={today}&to={today}").json()
    row = next(r for r in by_key["data"] if r["key_id"] == key_id)
    assert (row["key_name"], row["requests"], by_key["from"], by_key["to"]) == ("reporting", 3, today, today)
    by_provider = admin(gw2, "GET", f"/usage?group_by=provider,day&key={key_id}").json()
    assert [(r["provider"], r["day"], r["requests"]) for r in by_provider["data"]] == [("deepseek", today, 3)]
    assert by_provider["total"]["cost_nano"] == row["cost_nano"]

    env, cfg = gw2.env, str(gw2.config_path)
    as_json = therouter("usage", "--config", cfg, "--json", "--group-by", "key", "--key", key_id, env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["data"] == [row]  # the same report as the API's
    as_csv = therouter("usage", "--config", cfg, "--csv", "--group-by", "key,model", "--key", key_id, env=env)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["key_id"], r["key_name"], r["model"], r["requests"]) for r in rows] == [
        (key_id, "reporting", MODEL, "3")]
    table = therouter("usage", "--config", cfg, "--group-by", "key", env=env)
    assert table.returncode == 0 and "reporting" in table.stdout
    bad = therouter("usage", "--config", cfg, "--group-by", "model,provider", env=env)
    assert bad.returncode == 2 and "group" in bad.stderr and "Traceback" not in bad.stderr


def test_keys_update_and_show_from_the_cli(gw2: Gateway) -> None:
    env, cfg = gw2.env, str(gw2.config_path)
    expires = int(time.time()) // 86_400 * 86_400 + 365 * 86_400  # a midnight about a year ahead
    made = therouter("keys", "--config", cfg, "create", "--name", "cli-upd", "--budget", "3", "--rpm", "10",
                     "--metadata", "team=ads", "--expires-at", datetime.fromtimestamp(expires, UTC).strftime(
                         "%Y-%m-%dT%H:%M:%SZ"), env=env)
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.split()[2]
    r = therouter("keys", "--config", cfg, "update", key_id, "--rpm", "20", "--clear", "budget", "--model-limit",
                  f"{MODEL}=5/-", env=env)
    assert r.returncode == 0, r.stderr
    shown = therouter("keys", "--config", cfg, "show", key_id, env=env)
    d = json.loads(shown.stdout)
    assert (d["rpm"], d["budget_nano"], d["metadata"], d["model_limits"]) == (
        20, None, {"team": "ads"}, {MODEL: {"rpm": 5, "tpm": None}})
    assert d["expires_at"] == expires and d["spend"]["total"]["requests"] == 0 and d["last_used_at"] is None
    assert admin(gw2, "GET", f"/keys/{key_id}").json()["rpm"] == 20  # the same store as the API
    for args, needle in ((["--rpm", "0"], "--rpm"), (["--budget", "0"], "--budget must be more than 0"),
                         (["--expires-at", "2001-01-01"], "--expires-at must be in the future"),
                         (["--models", "no/such"], "no/such"), ([], "Nothing to change")):
        bad = therouter("keys", "--config", cfg, "update", key_id, *args, env=env)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    pasted = therouter("keys", "--config", cfg, "update", "tr-" + "x" * 40, "--rpm", "5", env=env)
    assert pasted.returncode == 2 and "x" * 40 not in pasted.stderr
    assert therouter("keys", "--config", cfg, "update", "key_nope", "--rpm", "5", env=env).returncode == 1


def test_keys_created_over_http_work_through_the_sdk_path(gw2: Gateway) -> None:
    """The plaintext a POST answers is a working key right away (no cache to wait for)."""
    made = admin(gw2, "POST", "/keys", {"name": "instant", "models": [MODEL]}).json()
    assert all(chat(gw2, made["key"]).status_code == 200 for _ in range(4))
