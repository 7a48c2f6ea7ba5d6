"""Metering through the real gateway: exact costs, generation records, budgets under concurrency, rate limits,
cut and cancelled streams, and a Redis restart with the journal replayed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import (
    ADMIN_KEY,
    Fake,
    Gateway,
    gateway_config,
    make_key,
    post_raw,
    read_events,
    start_gateway,
    stop,
    wait_for,
)
from therouter.config import StoreConfig
from therouter.redisproc import RedisProcess
from therouter.store import Store

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hello there, how are you"}]
# test card prices, nano-USD per 1M tokens
P_IN, P_CACHED, P_OUT = 960_000_000, 240_000_000, 2_880_000_000


def expected_cost(prompt: int, cached: int, completion: int) -> int:
    raw = (prompt - cached) * P_IN + cached * P_CACHED + completion * P_OUT
    return (raw + 500_000) // 1_000_000


def worst_case(gw: Gateway, max_tokens: int) -> int:
    """What the gateway reserves for one HELLO request, measured from the outside: a probe key's `reserved_nano`
    while one such request is in flight (the upstream must be slow enough to be seen)."""
    probe = asyncio.run(make_key(gw, "probe", budget_nano=10**12))
    c = openai.OpenAI(base_url=gw.v1, api_key=probe, max_retries=0, timeout=30)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.chat.completions.create, model=MODEL, messages=HELLO, max_tokens=max_tokens)
        deadline = time.monotonic() + 10
        reserved = 0
        while not reserved and time.monotonic() < deadline and not fut.done():
            reserved = key_info(gw, probe)["reserved_nano"]
        fut.result()
    assert reserved > 0, "the probe request was not seen in flight"
    # at least the prompt estimate x input + max_tokens x output
    assert reserved >= -(-((3 + 4 + (len(HELLO[0]["content"]) + 3) // 4) * P_IN + max_tokens * P_OUT) // 10**6)
    return int(reserved)


def burst(gw: Gateway, key: str, n: int, max_tokens: int) -> list[Any]:
    """n requests released together (a barrier); each result is a completion or the APIStatusError it raised."""
    async def run() -> list[Any]:
        c = openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
        barrier = asyncio.Barrier(n)

        async def one() -> Any:
            await barrier.wait()
            try:
                return await c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=max_tokens)
            except openai.APIStatusError as e:
                return e

        return await asyncio.gather(*(one() for _ in range(n)))

    return asyncio.run(run())


def generation(gw: Gateway, key: str, gen_id: str) -> dict[str, Any]:
    r = httpx.get(gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def key_info(gw: Gateway, key: str) -> dict[str, Any]:
    r = httpx.get(gw.v1 + "/key", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def test_generation_record_and_exact_cost(client: openai.OpenAI, gateway: Gateway, api_key: str,
                                          fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(cached_tokens=3, reasoning=2)
    r = client.chat.completions.create(model=MODEL, messages=HELLO)
    assert r.usage is not None
    u = r.usage
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    assert cached == 3
    cost = expected_cost(u.prompt_tokens, cached, u.completion_tokens)
    assert Decimal(str(u.model_extra["cost"])) == Decimal(cost) / Decimal(10**9)
    rec = generation(gateway, api_key, r.id)
    assert rec["cost_nano"] == cost and rec["outcome"] == "completed" and rec["price_version"] >= 1
    assert rec["usage"]["prompt_tokens"] == u.prompt_tokens
    assert rec["usage"]["completion_tokens_details"]["reasoning_tokens"] == \
        u.completion_tokens_details.reasoning_tokens  # type: ignore[union-attr]
    assert rec["provider"] == "deepseek" and rec["model"] == MODEL
    assert rec["attempts"][0]["provider"] == "deepseek"
    # the DeepSeek originals are kept in the response
    assert u.model_extra.get("prompt_cache_hit_tokens") == 3


def test_absurd_upstream_usage_is_bounded_estimated_and_counted(client: openai.OpenAI, gateway: Gateway,
                                                                 api_key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(usage_patch={"prompt_tokens": 10**12, "completion_tokens": "12"})
    r = client.chat.completions.create(model=MODEL, messages=HELLO)
    assert r.usage is not None
    completion = len(r.choices[0].message.content or "") // 4 + 1  # the gateway's own count of the answer
    # clamped to what the request could send (its reserved bound: never past the card's context length)
    prompt = r.usage.prompt_tokens
    assert 0 < prompt <= 4096 and r.usage.completion_tokens == completion
    assert r.usage.model_extra["estimated"] is True
    rec = generation(gateway, api_key, r.id)
    assert rec["usage"]["prompt_tokens"] == prompt and rec["usage"]["completion_tokens"] == completion
    assert rec["usage"]["estimated"] is True and rec["cost_nano"] == expected_cost(prompt, 0, completion)
    assert Decimal(str(r.usage.model_extra["cost"])) * 10**9 == rec["cost_nano"]

    fakes["deepseek"].configure(usage_patch={"prompt_tokens": 20, "completion_tokens": -5})
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (20, (len(text) + 3) // 4)
    assert generation(gateway, api_key, chunks[0].id)["cost_nano"] == expected_cost(20, 0, (len(text) + 3) // 4)
    metrics = httpx.get(gateway.url + "/metrics").text
    for reason in ("prompt_over_context", "not_a_number", "negative"):
        assert f'therouter_usage_anomalies_total{{provider="deepseek",reason="{reason}"}}' in metrics


def test_stream_metered_even_without_include_usage(client: openai.OpenAI, gateway: Gateway, api_key: str,
                                                   fakes: dict[str, Fake]) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert all(c.usage is None for c in chunks)
    sent = fakes["deepseek"].last()["body"]
    assert sent["stream_options"]["include_usage"] is True  # we always ask upstream
    rec = generation(gateway, api_key, chunks[0].id)
    assert rec["outcome"] == "completed" and rec["stream"] is True
    assert rec["usage"]["completion_tokens"] == 8 and rec["usage"]["estimated"] is False
    assert rec["cost_nano"] == expected_cost(rec["usage"]["prompt_tokens"], 0, 8)


def test_stream_usage_chunk_carries_cost(client: openai.OpenAI, gateway: Gateway, api_key: str) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None
    rec = generation(gateway, api_key, chunks[-1].id)
    assert Decimal(str(usage.model_extra["cost"])) * 10**9 == rec["cost_nano"]


def test_cut_stream_metered_as_upstream_cut(gateway: Gateway, api_key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_kind="cut", cut_after=3)
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": HELLO, "stream": True}) as r:
        body = r.read().decode()
    first = json.loads(body.split("\n\n")[0][6:])
    rec = generation(gateway, api_key, first["id"])
    assert rec["outcome"] == "upstream_cut"
    assert rec["usage"]["estimated"] is True and rec["usage"]["completion_tokens"] > 0
    assert rec["cost_nano"] > 0


def test_client_disconnect_metered_as_cancelled(gateway: Gateway, api_key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(chunks=100, chunk_delay_ms=30)
    s = post_raw(gateway, api_key, {"model": MODEL, "messages": HELLO, "stream": True})
    got = read_events(s, 4)
    s.close()
    gen_id = json.loads(got.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])["id"]

    def rec() -> dict[str, Any] | None:
        r = httpx.get(gateway.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {api_key}"})
        return r.json()["data"] if r.status_code == 200 else None

    found = wait_for(rec, 5)
    assert found and found["outcome"] == "client_cancelled"
    assert 0 < found["usage"]["completion_tokens"] < 100
    assert found["cost_nano"] > 0


def test_generation_is_private_to_its_key(client: openai.OpenAI, gateway: Gateway) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO)
    other = asyncio.run(make_key(gateway, "other"))
    resp = httpx.get(gateway.v1 + "/generation", params={"id": r.id}, headers={"Authorization": f"Bearer {other}"})
    assert resp.status_code == 404


def test_generation_found_by_the_clients_request_id(client: openai.OpenAI, gateway: Gateway, api_key: str) -> None:
    rid = "my-req-" + uuid.uuid4().hex
    r = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                         extra_headers={"x-request-id": rid})
    assert r.headers["x-request-id"] == rid
    gen_id = r.parse().id
    auth = {"Authorization": f"Bearer {api_key}"}
    found = httpx.get(gateway.v1 + "/generation", params={"request_id": rid}, headers=auth)
    assert found.status_code == 200, found.text
    assert found.json()["data"]["id"] == gen_id and found.json()["data"]["request_id"] == rid
    assert generation(gateway, api_key, gen_id)["request_id"] == rid
    # a stream is found the same way
    srid = "my-stream-" + uuid.uuid4().hex
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                 extra_headers={"x-request-id": srid}))
    got = httpx.get(gateway.v1 + "/generation", params={"request_id": srid}, headers=auth).json()["data"]
    assert got["id"] == chunks[0].id
    # never another key's record, even with the same request id
    other = asyncio.run(make_key(gateway, "other-rid"))
    miss = httpx.get(gateway.v1 + "/generation", params={"request_id": rid},
                     headers={"Authorization": f"Bearer {other}"})
    assert miss.status_code == 404 and miss.json()["error"]["param"] == "request_id"
    bad = httpx.get(gateway.v1 + "/generation", params={"request_id": "a b"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"


def test_budget_holds_under_concurrency(gateway: Gateway, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(latency_ms=1500)  # all 50 arrive while the admitted ones are still in flight
    # worst case per request: prompt estimate x input + max_tokens x output. Budget fits exactly 10 of them.
    max_tokens = 100
    worst = worst_case(gateway, max_tokens)
    key = asyncio.run(make_key(gateway, "budget", budget_nano=worst * 10 + worst // 2))

    results = burst(gateway, key, 50, max_tokens)
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(ok) == 10, [getattr(r, "status_code", None) for r in results]
    assert len(refused) == 40 and {r.status_code for r in refused} == {402}
    assert "left" in refused[0].message
    info = key_info(gateway, key)
    assert info["spend_nano"] == sum(generation(gateway, key, r.id)["cost_nano"] for r in ok)
    assert info["spend_nano"] <= info["budget_nano"]
    assert info["reserved_nano"] == 0
    fakes["deepseek"].configure(latency_ms=0)
    # actual cost is far below the worst case: the released headroom admits more requests
    c = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    assert c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=max_tokens).id


def test_budget_exceeded_is_402_and_not_retried_by_sdk(gateway: Gateway) -> None:
    key = asyncio.run(make_key(gateway, "poor", budget_nano=10))
    c = openai.OpenAI(base_url=gateway.v1, api_key=key)  # default retries: 402 must not be retried
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO)
    assert e.value.status_code == 402
    assert e.value.response.headers.get("x-should-retry") == "false"


def test_rate_limit_rpm(gateway: Gateway) -> None:
    key = asyncio.run(make_key(gateway, "rpm", rpm=3))
    c = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    for i in range(3):
        raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        assert raw.headers["x-ratelimit-reset-requests"]
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO)
    h = e.value.response.headers
    assert int(h["retry-after"]) >= 1 and h["x-ratelimit-remaining-requests"] == "0"
    assert e.value.code == "rate_limit_exceeded"


def test_rate_limit_tpm(gateway: Gateway) -> None:
    # each request reserves prompt + max_tokens (~57) and settles to its actual tokens (~15)
    key = asyncio.run(make_key(gateway, "tpm", tpm=100))
    c = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    served = 0
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(10):
            raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=50)
            assert raw.headers["x-ratelimit-limit-tokens"] == "100"
            served += 1
    assert served == 3
    assert e.value.response.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_admin_prices_and_price_versions(gateway: Gateway, api_key: str, client: openai.OpenAI) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.put(gateway.url + "/admin/prices/" + MODEL, json={"input": 1, "output": 2}).status_code == 401
    r = httpx.put(gateway.url + "/admin/prices/selfhost/only-sglang", headers=admin,
                  json={"input": "2", "cached_input": "1", "output": "4"})
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    assert version >= 2
    rec_id = client.chat.completions.create(model="selfhost/only-sglang", messages=HELLO).id
    rec = generation(gateway, api_key, rec_id)
    assert rec["price_version"] == version
    u = rec["usage"]
    assert rec["cost_nano"] == (u["prompt_tokens"] * 2_000_000_000 + u["completion_tokens"] * 4_000_000_000
                                + 500_000) // 1_000_000
    listed = httpx.get(gateway.v1 + "/models/selfhost/only-sglang", headers={"Authorization": f"Bearer {api_key}"})
    assert listed.json()["pricing"]["input"] == "2"
    bad = httpx.put(gateway.url + "/admin/prices/" + MODEL, headers=admin, json={"input": -1, "output": 1})
    assert bad.status_code == 400
    bad = httpx.put(gateway.url + "/admin/prices/" + MODEL, headers=admin, json={"input": "0.0000000001", "output": 1})
    assert bad.status_code == 400


@pytest.mark.parametrize("body,param", [
    ({"input": "NaN", "output": 1}, "input"), ({"input": 1, "output": "Infinity"}, "output"),
    ({"input": 1, "output": "-inf"}, "output"), ({"input": -1, "output": 1}, "input"),
    ({"input": 1e30, "output": 1}, "input"), ({"input": 1, "cached_input": -0.01, "output": 1}, "cached_input"),
    ({"input": 1, "output": [2]}, "output"), ({"input": True, "output": 1}, "input"),
    ({"input": 1, "output": 1, "effective_at": -5}, "effective_at"),
    ({"input": 1, "output": 1, "effective_at": 10**15}, "effective_at"),
    ({"input": 1, "output": 1, "effective_at": 253402300800}, "effective_at"),  # year 10000
    ({"input": 1, "output": 1, "effective_at": "tomorrow"}, "effective_at"),
    (b'{"input": NaN, "output": 1}', None), (b'{"input": 1e400, "output": 1}', None),
])
def test_admin_price_input_is_bounded(gateway: Gateway, body: Any, param: str | None) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.put(gateway.url + "/admin/prices/test/vision-less", headers=admin, content=raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["message"]
    prices = httpx.get(gateway.url + "/admin/prices", headers=admin).json()["data"]
    assert all(v["source"] == "config" or v["input"] < 10**16 for row in prices for v in row["versions"])


def test_bad_stored_price_versions_never_break_listings_or_requests(gateway: Gateway, api_key: str,
                                                                    client: openai.OpenAI) -> None:
    model = "selfhost/only-vllm"
    hist = f"{gateway.prefix}pricehist:{{{model}}}"
    garbage = {"not json": 1, '{"model": "selfhost/only-vllm", "version": "x"}': 2,
               json.dumps({"model": model, "version": "9", "effective_at": "0", "input": "NaN",
                           "cached_input": "1", "output": "1", "source": "operator"}): 3,
               json.dumps({"model": model, "version": "10", "effective_at": "-7", "input": "-1",
                           "cached_input": "1", "output": "1", "source": "operator"}): 4}

    async def damage(add: bool) -> None:  # written straight into Redis, as by hand or by an older build
        store = Store(StoreConfig(redis_url=gateway.redis_url, key_prefix=gateway.prefix))
        try:
            await (store.redis.zadd(hist, garbage) if add else store.redis.zrem(hist, *garbage))
        finally:
            await store.aclose()

    asyncio.run(damage(True))
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        r = httpx.get(gateway.url + "/admin/prices", headers=admin)
        assert r.status_code == 200, r.text
        row = next(row for row in r.json()["data"] if row["model"] == model)
        assert row["current"]["input"] == P_IN and len(row["versions"]) == 1
        models = httpx.get(gateway.v1 + "/models", headers={"Authorization": f"Bearer {api_key}"})
        assert models.status_code == 200 and any(m["id"] == model for m in models.json()["data"])
        one = httpx.get(gateway.v1 + "/models/" + model, headers={"Authorization": f"Bearer {api_key}"})
        assert one.status_code == 200 and one.json()["pricing"]["input"] == "0.96"
        assert client.chat.completions.create(model=model, messages=HELLO).id
        assert "stored price version of selfhost/only-vllm is skipped" in gateway.logs()
    finally:
        asyncio.run(damage(False))


def test_redis_restart_journal_replay_totals_exact(fakes: dict[str, Fake], tmp_path: Path) -> None:
    """Parallel requests, a cut stream, Redis killed mid-run, settlements journalled, Redis back, journal replayed:
    the key's totals equal the sum of its generation records to the nano-dollar."""
    redis = RedisProcess(tmp_path / "redis", appendonly=True)
    redis.start()
    cfg = gateway_config(redis.url, f"rr{uuid.uuid4().hex[:6]}:", fakes, tmp_path / "data")
    gw = start_gateway(cfg, tmp_path)
    try:
        key = asyncio.run(make_key(gw, "restart"))
        budgeted = asyncio.run(make_key(gw, "budgeted", budget_nano=10**9))
        cb = openai.OpenAI(base_url=gw.v1, api_key=budgeted, max_retries=0, timeout=30)
        cb.chat.completions.create(model=MODEL, messages=HELLO)
        c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
        ids = [c.chat.completions.create(model=MODEL, messages=HELLO).id for _ in range(3)]
        ids += [next(iter(c.chat.completions.create(model=MODEL, messages=HELLO, stream=True))).id]

        async def parallel() -> list[str]:
            ac = openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
            rs = await asyncio.gather(*(ac.chat.completions.create(model=MODEL, messages=HELLO) for _ in range(10)))
            return [r.id for r in rs]

        ids += asyncio.run(parallel())
        fakes["deepseek"].configure(error_kind="cut", cut_after=3)  # a stream the upstream cuts mid-way
        cut_ids: set[str] = set()
        with pytest.raises(openai.APIError):
            for chunk in c.chat.completions.create(model=MODEL, messages=HELLO, stream=True):
                cut_ids.add(chunk.id)
        ids += sorted(cut_ids)
        fakes["deepseek"].configure(error_rate=0)
        redis.stop(kill=True)  # Redis dies: the key stays valid from the local cache; settlements go to the journal
        during = [c.chat.completions.create(model=MODEL, messages=HELLO).id for _ in range(3)]
        # a budgeted key cannot be admitted without the store: 503 + Retry-After (fail closed), never a 500
        with pytest.raises(openai.InternalServerError) as e:
            cb.chat.completions.create(model=MODEL, messages=HELLO)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
        # an unknown key cannot be told from a valid one while the store is down: 503, not 401
        stranger = openai.OpenAI(base_url=gw.v1, api_key="tr-unknown-key-000000000000", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            stranger.chat.completions.create(model=MODEL, messages=HELLO)
        assert e.value.status_code == 503
        journal = list((tmp_path / "data" / "journal").glob("*.jsonl"))
        assert journal and sum(len(p.read_text().splitlines()) for p in journal) >= 3
        redis.start()
        ids += during

        def replayed() -> bool:
            r = httpx.get(gw.v1 + "/generation", params={"id": during[-1]}, headers={"Authorization": f"Bearer {key}"})
            return r.status_code == 200

        assert wait_for(replayed, 15), "journal not replayed"
        records = [generation(gw, key, i) for i in ids]
        info = key_info(gw, key)
        assert info["requests"] == len(ids)
        assert info["total_spend_nano"] == sum(r["cost_nano"] for r in records)
        assert info["tokens"]["prompt"] == sum(r["usage"]["prompt_tokens"] for r in records)
        assert {r["outcome"] for r in records} == {"completed", "upstream_cut"}
    finally:
        stop(gw.proc)
        redis.stop()


def test_budget_holds_across_two_worker_processes(redis_proc: RedisProcess, fakes: dict[str, Fake],
                                                  tmp_path: Path) -> None:
    """`serve --workers 2`: two processes share one Redis; admission is one atomic script, so the bound holds."""
    cfg = gateway_config(redis_proc.url, f"w2{uuid.uuid4().hex[:6]}:", fakes, tmp_path / "data")
    gw = start_gateway(cfg, tmp_path, workers=2)
    try:
        fakes["deepseek"].configure(latency_ms=1500)
        max_tokens = 100
        key = asyncio.run(make_key(gw, "two-workers", budget_nano=worst_case(gw, max_tokens) * 8))

        results = burst(gw, key, 40, max_tokens)
        ok = [r for r in results if not isinstance(r, Exception)]
        assert len(ok) == 8
        assert {r.status_code for r in results if isinstance(r, openai.APIStatusError)} == {402}
        # each worker writes its records just after its answers: a read served by the other may come first
        info = wait_for(lambda: (i := key_info(gw, key))["requests"] == len(ok) and i)
        assert info, "the records of the answers were never all written"
        assert info["spend_nano"] == sum(generation(gw, key, r.id)["cost_nano"] for r in ok) <= info["budget_nano"]
    finally:
        stop(gw.proc)


@pytest.mark.parametrize("model,flavor,policy", [("selfhost/only-vllm", "vllm", "cancel"),
                                                 (MODEL, "deepseek", "cancel")])
def test_non_stream_disconnect_policy(gateway: Gateway, fakes: dict[str, Fake], model: str, flavor: str,
                                      policy: str) -> None:
    """Self-hosted passthrough (cancel): the upstream is cancelled and the prompt is billed. DeepSeek sends a
    non-stream request as a stream (`non_stream: stream`): a client that leaves before the first chunk closes it
    too. (A hosted passthrough provider's `finish`: test_non_stream_assembly.py.) Either way a record exists."""
    key = asyncio.run(make_key(gateway, f"drop-{policy}"))
    fakes[flavor].configure(latency_ms=1500)
    fakes[flavor].reset()
    with post_raw(gateway, key, {"model": model, "messages": HELLO}):
        time.sleep(0.4)  # the client gives up while the upstream is still working

    def settled() -> dict[str, Any] | None:
        info = key_info(gateway, key)
        return info if info["requests"] == 1 else None

    info = wait_for(settled, 6)
    assert info, "the request was never metered"
    last = wait_for(lambda: [e for e in fakes[flavor].stats()["log"] if e.get("t_end")], 6)[-1]
    if policy == "cancel":
        assert last["closed_by"] == "client"
        assert info["tokens"]["completion"] == 0 and info["tokens"]["prompt"] > 0
    else:
        assert last["closed_by"] == "server"
        assert info["tokens"]["completion"] == 8
    assert info["total_spend_nano"] > 0


def test_per_model_rate_limit_override_from_the_cli(gateway: Gateway) -> None:
    from tests.integration.test_cli import therouter

    r = therouter("keys", "--config", str(gateway.config_path), "create", "--name", "override", "--rpm", "100",
                  "--model-limit", "selfhost/only-sglang=1/-", env=gateway.env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    c = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    c.chat.completions.create(model="selfhost/only-sglang", messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="selfhost/only-sglang", messages=HELLO)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)  # other models: the key's 100
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert key_info(gateway, key)["limits"]["models"] == {"selfhost/only-sglang": {"rpm": 1, "tpm": None}}
    bad = therouter("keys", "--config", str(gateway.config_path), "create", "--name", "x", "--model-limit",
                    "selfhost/only-sglang=ten", env=gateway.env)
    assert bad.returncode == 2 and "MODEL=RPM/TPM" in bad.stderr
