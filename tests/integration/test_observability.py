"""Metrics and logs as an operator reads them, against a real gateway with two worker processes: every scrape shows the
sums over both workers, and every request is one JSON log line carrying its request id and no secret."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    ADMIN_KEY,
    CANARY,
    Fake,
    Gateway,
    make_key,
    own_config,
    running,
    start_gateway,
)
from therouter.redisproc import RedisProcess

MODEL = "deepseek/deepseek-v3.2"
METRICS_TOKEN = "metrics-" + uuid.uuid4().hex
HI = [{"role": "user", "content": "hi"}]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def gw2(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("obs")
    cfg = own_config(redis_proc.url, fakes, tmp, "obs")
    cfg["server"].update(log_format="json", metrics_token=METRICS_TOKEN)
    with running(start_gateway(cfg, tmp, workers=2)) as gw:
        yield gw


def scrape(gw: Gateway) -> Samples:
    r = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    out: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def log_lines(gw: Gateway) -> list[dict[str, Any]]:
    lines = [ln for ln in gw.logs().splitlines() if ln.strip()]
    parsed = []
    for ln in lines:
        parsed.append(json.loads(ln))  # every line, uvicorn's included, is one JSON object
    return parsed


class Traffic:
    """Requests sent, and what the metrics must say about them."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.codes: Counter[tuple[str, str, str]] = Counter()
        self.rids: dict[str, int] = {}
        self.prompt = self.completion = 0
        self.cost = Decimal(0)
        self.ok = 0
        self.first_token = 0  # answers with a time to first token: streams and assembled non-streams
        self.reached = 0  # requests that reached the gateway (all but the 401)

    def post(self, key: str, body: dict[str, Any], provider: str = "", model: str = MODEL) -> httpx.Response:
        rid = "obs-" + uuid.uuid4().hex[:12]
        r = httpx.post(self.gw.v1 + "/chat/completions", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {key}", "x-request-id": rid})
        self.rids[rid] = r.status_code
        self.codes[(model, provider if r.status_code == 200 else "", str(r.status_code))] += 1
        if r.status_code != 401:
            self.reached += 1
        if r.status_code == 200:
            assert r.headers["x-therouter-provider"] == provider
            self.ok += 1
            # a passthrough JSON answer (the self-hosted kinds by default) arrives whole: it has no first token
            self.first_token += 1 if body.get("stream") or provider == "deepseek" else 0
            if body.get("stream"):
                usage = [json.loads(ln[6:]) for ln in r.text.splitlines()
                         if ln.startswith("data: {") and '"usage":{' in ln][-1]["usage"]
            else:
                usage = r.json()["usage"]
            self.prompt += usage["prompt_tokens"]
            self.completion += usage["completion_tokens"]
            self.cost += Decimal(str(usage["cost"]))
        return r


def test_metrics_sum_over_two_workers_and_logs_are_json_lines(gw2: Gateway, fakes: dict[str, Fake]) -> None:
    key = _key(gw2)
    t = Traffic(gw2)
    # successes until both workers have answered some (each request on a new connection)
    for _ in range(60):
        t.post(key, {"model": MODEL, "messages": HI}, "deepseek")
        if t.ok >= 6 and len(_pids(gw2)) == 2:
            break
    assert len(_pids(gw2)) == 2, "both workers served requests"
    # a fallback: the hosted upstream fails, the self-hosted one serves (twice: no circuit opens)
    fakes["deepseek"].configure(error_kind="500", error_rate=1)
    for _ in range(2):
        t.post(key, {"model": MODEL, "messages": HI}, "vllm-local")
    fakes["deepseek"].configure(error_rate=0)
    # a stream, with usage
    r = t.post(key, {"model": MODEL, "messages": HI, "stream": True, "stream_options": {"include_usage": True}},
               "deepseek")
    assert r.status_code == 200 and "[DONE]" in r.text
    # 402: a budget smaller than any request
    poor = _key(gw2, budget_nano=1)
    assert t.post(poor, {"model": MODEL, "messages": HI}).status_code == 402
    # 429: one request per minute
    slow = _key(gw2, rpm=1)
    assert t.post(slow, {"model": MODEL, "messages": HI}, "deepseek").status_code == 200
    assert t.post(slow, {"model": MODEL, "messages": HI}).status_code == 429
    # 401: refused before the gateway had it
    assert t.post("tr-not-a-key", {"model": MODEL, "messages": HI}, model="").status_code == 401

    for _ in range(6):  # whichever worker answers the scrape, the numbers are the sums over both
        m = scrape(gw2)
        for (model, provider, code), n in t.codes.items():
            assert value(m, "therouter_requests_total", model=model, provider=provider, code=code,
                         endpoint="chat") == n, \
                (model, provider, code)
        assert total(m, "therouter_requests_total") == len(t.rids)
        assert value(m, "therouter_fallbacks_total", model=MODEL) == 2
        assert value(m, "therouter_upstream_attempts_total", provider="deepseek", outcome="upstream_error") == 2
        assert value(m, "therouter_budget_rejections_total") == 1
        assert value(m, "therouter_rate_limited_total", limit="rpm") == 1
        assert total(m, "therouter_request_duration_seconds_count") == t.reached
        assert total(m, "therouter_time_to_first_token_seconds_count") == t.first_token < t.ok
        assert total(m, "therouter_tokens_total", type="prompt") == t.prompt
        assert total(m, "therouter_tokens_total", type="completion") == t.completion
        assert abs(Decimal(str(total(m, "therouter_spend_usd_total"))) - t.cost) < Decimal("1e-9")
        assert value(m, "therouter_circuit_open", provider="deepseek", model=MODEL) == 0
        assert value(m, "therouter_in_flight_requests", provider="deepseek") == 0
        assert value(m, "therouter_store_up") == 1
        assert value(m, "therouter_journal_backlog") == 0

    lines = log_lines(gw2)
    requests = [ln for ln in lines if ln.get("event") == "request"]
    by_rid = {ln["request_id"]: ln for ln in requests}
    assert set(by_rid) == set(t.rids) and len(requests) == len(t.rids), "one line per request"
    for rid, status in t.rids.items():
        ln = by_rid[rid]
        assert ln["status"] == status and ln["level"] == "info"
        for f in ("generation_id", "key_id", "model", "provider", "prompt_tokens", "completion_tokens", "cost_usd",
                  "latency_ms", "ttft_ms", "attempts", "outcome"):
            assert f in ln, (f, ln)
    fell_back = [ln for ln in requests if ln["provider"] == "vllm-local"]
    assert len(fell_back) == 2 and all(ln["attempts"] == 2 and ln["outcome"] == "completed" for ln in fell_back)
    assert {ln["request_id"] for ln in lines if ln.get("event") == "fallback"} == {ln["request_id"]
                                                                                   for ln in fell_back}
    assert [ln["outcome"] for ln in requests if ln["status"] == 402] == ["refused"]
    # start-up: where it listens, how many workers, which Redis; each worker's providers
    serve = [ln for ln in lines if ln.get("event") == "serve"]
    assert len(serve) == 1 and serve[0]["workers"] == 2 and serve[0]["port"] == int(gw2.url.rsplit(":", 1)[1])
    ready = [ln for ln in lines if ln.get("event") == "worker_ready"]
    assert len(ready) == 2 and all(ln["providers"]["deepseek"] == "ok" for ln in ready)
    assert all(ln["providers"]["nowhere"].startswith("unavailable") for ln in ready)
    blob = gw2.logs()
    for secret in (CANARY, key, poor, slow, ADMIN_KEY, METRICS_TOKEN):
        assert secret not in blob


def test_every_line_of_a_request_carries_its_id(gw2: Gateway, fakes: dict[str, Fake]) -> None:
    """A line written deep inside a request (a stream cut by the upstream) carries the request's id, with no
    prompt or completion text in any line."""
    key = _key(gw2)
    fakes["deepseek"].configure(error_kind="cut", error_rate=1, cut_after=2)
    rid = "cut-" + uuid.uuid4().hex[:12]
    secret_prompt = "PROMPT-" + uuid.uuid4().hex
    r = httpx.post(gw2.v1 + "/chat/completions", timeout=30,
                   headers={"Authorization": f"Bearer {key}", "x-request-id": rid},
                   json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": secret_prompt}]})
    assert r.status_code == 200 and '"error"' in r.text and "[DONE]" not in r.text
    mine = [ln for ln in log_lines(gw2) if ln.get("request_id") == rid]
    broke = [ln for ln in mine if ln["logger"] == "therouter.gateway" and "broke" in ln["msg"]]
    assert broke and broke[0]["level"] == "warning"
    req = [ln for ln in mine if ln.get("event") == "request"]
    assert len(req) == 1 and req[0]["outcome"] == "upstream_cut" and req[0]["status"] == 200
    content = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
                      for ln in r.text.splitlines() if ln.startswith("data: {") and '"choices"' in ln)
    assert content
    assert secret_prompt not in gw2.logs() and content not in gw2.logs()
    m = scrape(gw2)
    assert total(m, "therouter_stream_errors_total", provider="deepseek") >= 1, [k for k in m if "stream_err" in k[0]]


def test_in_flight_is_summed_over_workers(gw2: Gateway, fakes: dict[str, Fake]) -> None:
    """Streams held open: the gauge is their number whichever worker holds them (rounds until a round had streams on
    both workers), and back to 0 when they end."""
    key = _key(gw2)
    fakes["deepseek"].configure(chunk_delay_ms=100, chunks=200)
    spread = False
    for _ in range(10):
        rids = _hold_streams(gw2, key, 6)
        assert value(scrape(gw2), "therouter_in_flight_requests", provider="deepseek") == 0
        lines = [ln for ln in log_lines(gw2) if ln.get("event") == "request" and ln["request_id"] in rids]
        assert len(lines) == len(rids) and {ln["outcome"] for ln in lines} == {"client_cancelled"}
        if len({ln["pid"] for ln in lines}) == 2:
            spread = True
            break
    assert spread, "no round had streams on both workers"


def _hold_streams(gw: Gateway, key: str, n: int) -> set[str]:
    """Open ``n`` streams, check the gauge while all hold their upstream slot, then leave (client disconnect)."""
    clients = [httpx.Client(timeout=30) for _ in range(n)]
    rids = {f"held-{uuid.uuid4().hex[:12]}" for _ in clients}
    streams = []
    try:
        for c, rid in zip(clients, rids, strict=True):
            s = c.stream("POST", gw.v1 + "/chat/completions", json={"model": MODEL, "messages": HI, "stream": True},
                         headers={"Authorization": f"Bearer {key}", "x-request-id": rid})
            lines = s.__enter__().iter_lines()
            streams.append((s, lines))  # a dropped line iterator would close its stream
            while not next(lines).startswith("data: {"):
                pass  # the first chunk: the stream holds its upstream slot now
        assert value(scrape(gw), "therouter_in_flight_requests", provider="deepseek") == n
    finally:
        for s, _ in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the gateway notices each client leaving, settles and logs it
        done = {ln["request_id"] for ln in log_lines(gw) if ln.get("event") == "request"}
        if rids <= done:
            break
        time.sleep(0.05)
    return rids


def test_metrics_token_and_openapi_for_admin_only(gw2: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
        r = httpx.get(gw2.url + "/metrics", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_metrics_token"
        assert "therouter_" not in r.text
    assert httpx.get(gw2.url + "/openapi.json").status_code == 401
    key = _key(gw2)
    assert httpx.get(gw2.url + "/openapi.json", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    r = httpx.get(gw2.url + "/openapi.json", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]


def _pids(gw: Gateway) -> set[int]:
    return {ln["pid"] for ln in log_lines(gw) if ln.get("event") == "request"}


def _key(gw: Gateway, **limits: Any) -> str:
    import asyncio

    return asyncio.run(make_key(gw, "obs", **limits))
