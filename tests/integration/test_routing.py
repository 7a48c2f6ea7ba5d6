"""Routing with real processes: fallback, cooldowns, timeouts, circuits, weights, affinity, preferences, admin view.

One gateway for the module, with its own fake upstreams. Each scenario routes a model of its own through provider
names of its own (several names may point at one fake), so breakers and cooldowns never leak between tests; the
fakes' knobs are reset after each test.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, CANARY, Fake, Gateway, make_key, running
from tests.integration.routing_helpers import (
    HELLO,
    admin,
    ask,
    config,
    deployment,
    fake_at,
    generation,
    provider,
    sdk,
    start_routed_gateway,
)
from therouter.redisproc import RedisProcess, free_port

OPTIONS = {"breaker": {"base_ejection": 1.0, "consecutive_failures": 3}, "prefix_affinity": ["r/affinity"]}


@dataclass
class Rig:
    gw: Gateway
    key: str
    ds: Fake
    v1: Fake
    v2: Fake
    sg: Fake

    @property
    def client(self) -> openai.OpenAI:
        return sdk(self.gw, self.key)


@pytest.fixture(scope="module")
def rig(redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("routing")
    ds = fake_at("deepseek", None, api_key=CANARY)
    v1, v2, sg = fake_at("vllm"), fake_at("vllm"), fake_at("sglang")
    dead = f"http://127.0.0.1:{free_port()}"
    providers = {
        # one primary / fallback pair per scenario
        **{f"ds-{s}": provider("deepseek", ds.url) for s in ("cool", "breaker", "prefs", "models")},
        **{f"vl-{s}": provider("vllm", v1.url) for s in ("down", "cool", "slow", "breaker", "prefs", "models")},
        "ds-slow": provider("deepseek", ds.url, first_token=1, total=1.5),
        "ds-slow-json": {**provider("deepseek", ds.url, first_token=1, total=1.5), "non_stream": "passthrough"},
        "sg-prefs": provider("sglang", sg.url),
        "dead-1": provider("deepseek", dead), "dead-2": provider("deepseek", dead), "dead-3": provider("openai", dead),
        # replicas
        "w-big": provider("vllm", v1.url), "w-small": provider("vllm", v2.url),
        "aff-1": provider("vllm", v1.url), "aff-2": provider("vllm", v2.url), "aff-3": provider("sglang", sg.url),
    }
    models = {
        "r/down": [{"provider": "dead-1"}, {"provider": "vl-down", "priority": 1}],
        "r/cooldown": [{"provider": "ds-cool"}, {"provider": "vl-cool", "priority": 1}],
        "r/slow": [{"provider": "ds-slow"}, {"provider": "vl-slow", "priority": 1}],
        "r/slow-json": [{"provider": "ds-slow-json"}, {"provider": "vl-slow", "priority": 1}],
        "r/breaker": [{"provider": "ds-breaker"}, {"provider": "vl-breaker", "priority": 1}],
        "r/allfail": [{"provider": "dead-2"}, {"provider": "dead-3", "priority": 1}],
        "r/weights": [{"provider": "w-big", "weight": 3}, {"provider": "w-small", "weight": 1}],
        "r/affinity": [{"provider": "aff-1"}, {"provider": "aff-2"}, {"provider": "aff-3"}],
        "r/prefs": [{"provider": "ds-prefs"}, {"provider": "vl-prefs", "priority": 1},
                    {"provider": "sg-prefs", "priority": 2}],
        "r/first": [{"provider": "ds-models"}],
        "r/second": [{"provider": "vl-models"}],
    }
    with running(start_routed_gateway(config(redis_proc.url, tmp / "data", providers, models), tmp, OPTIONS),
                 ds, v1, v2, sg) as gw:
        yield Rig(gw, asyncio.run(make_key(gw, "routing")), ds, v1, v2, sg)


@pytest.fixture(autouse=True)
def _reset_knobs(rig: Rig) -> Iterator[None]:
    yield
    for f in (rig.ds, rig.v1, rig.v2, rig.sg):
        httpx.post(f.url + "/_fake/reset", json={"knobs": True}, timeout=5)


def requests_seen(f: Fake) -> int:
    return int(f.stats()["requests"])


# ---- fallback, cooldown, timeouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_primary_down_fallback_serves(rig: Rig, stream: bool) -> None:
    served, attempts, gen_id = ask(rig.client, "r/down", stream=stream)
    assert (served, attempts) == ("vl-down", 2)
    rec = generation(rig.gw, rig.key, gen_id)
    assert rec is not None  # the record names every attempt, and the connect failure was never sent
    first, second = rec["attempts"]
    assert first["provider"] == "dead-1" and first["code"] == "upstream_connect_error"
    assert not first.get("possibly_accepted") and second["outcome"] == "ok"


def test_primary_429_retry_after_cooldown_respected(rig: Rig) -> None:
    rig.ds.configure(error_rate=1, error_kind="429", retry_after=2)
    before = requests_seen(rig.ds)
    assert ask(rig.client, "r/cooldown")[:2] == ("vl-cool", 2)
    t_429 = time.monotonic()
    rig.ds.configure(error_rate=0)  # healthy again, but it asked for 2 s
    while time.monotonic() - t_429 < 1.5:
        served, attempts, gen_id = ask(rig.client, "r/cooldown")
        assert (served, attempts) == ("vl-cool", 1)  # skipped, not tried
    assert requests_seen(rig.ds) == before + 1
    rec = generation(rig.gw, rig.key, gen_id)
    assert rec is not None
    assert any(s["provider"] == "ds-cool" and s["reason"].startswith("cooldown") for s in rec["skipped"])
    assert deployment(rig.gw, "ds-cool")["state"] == "cooldown"
    time.sleep(max(0.0, 2.3 - (time.monotonic() - t_429)))
    assert ask(rig.client, "r/cooldown")[:2] == ("ds-cool", 1)


@pytest.mark.parametrize("model,stream,bound", [("r/slow", True, 0.9), ("r/slow", False, 0.9),
                                               ("r/slow-json", False, 1.4)])
def test_primary_slow_times_out_then_falls_back_within_deadline(rig: Rig, model: str, stream: bool,
                                                                bound: float) -> None:
    """Beyond first_token (1 s: streams, and non-stream requests DeepSeek streams) or, for a passthrough non-stream
    request, total (1.5 s)."""
    rig.ds.configure(latency_ms=4000)
    t0 = time.monotonic()
    served, attempts, gen_id = ask(rig.client, model, stream=stream)
    took = time.monotonic() - t0
    assert (served, attempts) == ("vl-slow", 2)
    assert bound < took < 3.5  # one per-try timeout, then the fallback; deadline is 15 s
    rec = generation(rig.gw, rig.key, gen_id)
    assert rec is not None
    assert rec["attempts"][0]["code"] in ("upstream_timeout", "first_token_timeout")
    assert rec["attempts"][0]["possibly_accepted"] is True


# ---- circuit breaking ---------------------------------------------------------------------------------------------


def test_circuit_opens_after_failures_and_closes_after_recovery(rig: Rig) -> None:
    rig.ds.configure(error_rate=1, error_kind="503")
    before = requests_seen(rig.ds)
    for _ in range(3):
        assert ask(rig.client, "r/breaker")[:2] == ("vl-breaker", 2)
    assert deployment(rig.gw, "ds-breaker")["circuit"]["state"] == "open"
    for _ in range(5):  # ejected: skipped without an attempt
        assert ask(rig.client, "r/breaker")[:2] == ("vl-breaker", 1)
    assert requests_seen(rig.ds) == before + 3
    rig.ds.configure(error_rate=0)  # recovery
    time.sleep(1.1)  # base ejection (1 s in this gateway)
    served, attempts, gen_id = ask(rig.client, "r/breaker")
    assert (served, attempts) == ("ds-breaker", 1)  # the half-open probe, a real request, succeeded
    rec = generation(rig.gw, rig.key, gen_id)
    assert rec is not None
    assert rec["attempts"][0].get("probe") is True
    assert deployment(rig.gw, "ds-breaker")["circuit"]["state"] == "closed"
    assert ask(rig.client, "r/breaker")[0] == "ds-breaker"
    metrics = httpx.get(rig.gw.url + "/metrics").text
    assert 'therouter_circuit_state_changes_total{provider="ds-breaker",state="open"} 1.0' in metrics
    assert 'therouter_failovers_total{from_provider="ds-breaker",to_provider="vl-breaker"} 3.0' in metrics


def test_all_circuits_open_gives_a_fast_503(rig: Rig) -> None:
    statuses = []
    for _ in range(5):  # each request tries both (and retries): their circuits open within a few requests
        with pytest.raises(openai.APIStatusError) as e:
            ask(rig.client, "r/allfail")
        statuses.append(e.value.status_code)
        if statuses[-1] == 503:
            break
    assert statuses[0] == 502 and statuses[-1] == 503, statuses
    t0 = time.monotonic()
    r = httpx.post(rig.gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {rig.key}"},
                   json={"model": "r/allfail", "messages": HELLO}, timeout=5)
    assert time.monotonic() - t0 < 0.5  # no wait
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "no_deployment_available" and err["type"] == "server_error"
    assert "dead-2: circuit open" in err["message"] and "dead-3: circuit open" in err["message"]
    assert CANARY not in r.text


# ---- load balancing -----------------------------------------------------------------------------------------------


def test_load_split_by_weight_within_tolerance(rig: Rig) -> None:
    async def run() -> Counter[str]:
        c = openai.AsyncOpenAI(base_url=rig.gw.v1, api_key=rig.key, max_retries=0, timeout=20)
        got: Counter[str] = Counter()

        async def worker() -> None:
            for _ in range(50):
                raw = await c.chat.completions.with_raw_response.create(model="r/weights", messages=HELLO)
                got[raw.headers["x-therouter-provider"]] += 1

        await asyncio.gather(*(worker() for _ in range(4)))
        return got

    got = asyncio.run(run())
    assert sum(got.values()) == 200
    assert 0.62 <= got["w-big"] / 200 <= 0.88, got  # 3:1 -> 75 %


def test_prefix_affinity_keeps_a_prefix_on_one_replica(rig: Rig) -> None:
    owners: dict[str, set[str]] = {}
    for round_ in range(4):
        for i in range(6):
            system = f"You are assistant #{i}. " + "Shared instructions. " * 30  # a long common prefix
            raw = rig.client.chat.completions.with_raw_response.create(
                model="r/affinity", messages=[{"role": "system", "content": system},
                                              {"role": "user", "content": f"question {round_}"}])
            owners.setdefault(system, set()).add(raw.headers["x-therouter-provider"])
    assert all(len(s) == 1 for s in owners.values()), owners  # every prefix stayed on its replica
    assert len({next(iter(s)) for s in owners.values()}) >= 2  # and prefixes are spread over replicas


# ---- preferences --------------------------------------------------------------------------------------------------


def test_provider_preferences_honoured(rig: Rig) -> None:
    c = rig.client
    assert ask(c, "r/prefs")[0] == "ds-prefs"
    assert ask(c, "r/prefs", provider={"order": ["sg-prefs", "vl-prefs"]})[:2] == ("sg-prefs", 1)
    assert ask(c, "r/prefs", provider={"only": ["vl-prefs"]})[0] == "vl-prefs"
    assert ask(c, "r/prefs", provider={"ignore": ["ds-prefs", "vl-prefs"]})[0] == "sg-prefs"
    rig.ds.configure(error_rate=1, error_kind="503")
    assert ask(c, "r/prefs", provider={"order": ["ds-prefs"]})[:2] == ("vl-prefs", 2)
    before = requests_seen(rig.ds)
    with pytest.raises(openai.APIStatusError) as e:  # no fallback allowed: the primary's failure is the answer
        ask(c, "r/prefs", provider={"order": ["ds-prefs"], "allow_fallbacks": False})
    assert e.value.status_code == 502 and "ds-prefs" in e.value.message
    assert requests_seen(rig.ds) - before == 2  # retried once after a backoff (its circuit opened at 3 in a row)


def test_unknown_provider_is_400_on_provider(rig: Rig) -> None:
    r = httpx.post(rig.gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {rig.key}"},
                   json={"model": "r/prefs", "messages": HELLO, "provider": {"only": ["nope"]}}, timeout=5)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "provider" and "nope" in err["message"]


def test_models_fallback_list(rig: Rig) -> None:
    c = rig.client
    rig.ds.configure(error_rate=1, error_kind="500")
    raw = c.chat.completions.with_raw_response.create(model="r/first", messages=HELLO,
                                                       extra_body={"models": ["r/second"]})
    r = raw.parse()
    assert raw.headers["x-therouter-provider"] == "vl-models" and raw.headers["x-therouter-model"] == "r/second"
    assert r.model == "r/second"
    rec = generation(rig.gw, rig.key, r.id)
    assert rec is not None
    assert [a["model_id"] for a in rec["attempts"]][-1] == "r/second"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="r/first", messages=HELLO, extra_body={"models": ["r/missing"]})
    assert e.value.body["param"] == "models"  # type: ignore[index]


def test_preferences_never_reach_the_upstream(rig: Rig) -> None:
    ask(rig.client, "r/prefs", provider={"order": ["vl-prefs"]}, models=["r/second"])
    body = rig.v1.last()["body"]
    assert body["messages"] and "provider" not in body and "models" not in body


# ---- operator view ------------------------------------------------------------------------------------------------


def test_admin_providers_view(rig: Rig) -> None:
    for _ in range(3):
        ask(rig.client, "r/down")
    assert httpx.get(rig.gw.url + "/admin/providers").status_code == 401
    r = admin(rig.gw, "GET", "/providers")
    assert r.status_code == 200
    view = {p["provider"]: p for p in r.json()["data"]}
    dep = view["vl-down"]["deployments"][0]
    assert dep["state"] == "ok" and dep["in_flight"] == 0 and dep["latency_ms"] is not None
    assert dep["recent"]["ok"] >= 3 and dep["recent"]["error_rate"] == 0.0
    assert dep["models"][0]["model"] == "r/down" and view["vl-down"]["hosted"] is False
    dead = view["dead-1"]["deployments"][0]
    assert dead["recent"]["failed"] >= 1 and dead["recent"]["error_rate"] > 0 and dead["last_error"]
    assert "retry_budget" in r.json() and r.json()["shared_state"] == "ok"
    assert CANARY not in r.text and ADMIN_KEY not in r.text
    assert admin(rig.gw, "POST", "/providers/nope/drain").status_code == 404
