"""Drain / undrain under a steady stream of SDK requests: traffic moves off and back, no client request fails;
and a drain made on one worker reaches the others through Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import openai
import pytest

from tests.integration.conftest import CANARY, Fake, Gateway, make_key, start_gateway, stop
from tests.integration.routing_helpers import HELLO, admin, ask, config, fake_at, provider, sdk
from therouter.redisproc import RedisProcess

MODEL = "d/chat"


@dataclass
class Shot:
    started: float
    provider: str | None
    error: str | None = None


class Stream:
    """A steady stream of SDK requests from a few threads (alternating stream / non-stream) until stopped."""

    def __init__(self, gw: Gateway, key: str, threads: int = 3, pause: float = 0.02) -> None:
        self.gw, self.key, self.pause = gw, key, pause
        self.shots: list[Shot] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        client = sdk(self.gw, self.key)
        n = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                served, _, _ = ask(client, MODEL, stream=(n + i) % 2 == 0)
                self.shots.append(Shot(t0, served))
            except Exception as e:  # noqa: BLE001 - every failure is a test failure, reported below
                self.shots.append(Shot(t0, None, repr(e)))
            n += 1
            time.sleep(self.pause)

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def between(self, a: float, b: float) -> set[str | None]:
        return {s.provider for s in self.shots if a <= s.started < b}


@pytest.fixture(scope="module")
def fakes2() -> Iterator[tuple[Fake, Fake]]:
    ds, vl = fake_at("deepseek", None, api_key=CANARY), fake_at("vllm")
    ds.configure(latency_ms=150)  # requests are in flight when the drain lands
    yield ds, vl
    for f in (ds, vl):
        stop(f.proc)


def gw_config(redis: RedisProcess, tmp: Path, ds: Fake, vl: Fake) -> dict[str, object]:
    return config(redis.url, tmp / "data", {"deepseek": provider("deepseek", ds.url), "vllm": provider("vllm", vl.url)},
                  {MODEL: [{"provider": "deepseek"}, {"provider": "vllm", "priority": 1}],
                   "d/vllm-only": [{"provider": "vllm"}]})


def test_drain_and_undrain_under_steady_traffic_lose_nothing(redis_proc: RedisProcess, tmp_path: Path,
                                                             fakes2: tuple[Fake, Fake]) -> None:
    ds, vl = fakes2
    gw = start_gateway(gw_config(redis_proc, tmp_path, ds, vl), tmp_path)
    try:
        key = asyncio.run(make_key(gw))
        with Stream(gw, key) as st:
            time.sleep(1.0)
            drain_sent = time.monotonic()
            r = admin(gw, "POST", "/providers/deepseek/drain")
            drained_at = time.monotonic()
            assert r.status_code == 200, r.text
            assert r.json()["drained"] is True and r.json()["shared"] is True
            deadline = time.monotonic() + 5  # requests in flight on deepseek finish there
            while admin(gw, "GET", "/providers").json()["data"][0]["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert admin(gw, "GET", "/providers").json()["data"][0]["deployments"][0]["state"] == "drained"
            time.sleep(1.0)
            undrain_sent = time.monotonic()
            r = admin(gw, "POST", "/providers/deepseek/undrain")
            undrained_at = time.monotonic()
            assert r.status_code == 200 and r.json()["drained"] is False
            time.sleep(1.0)
        failures = [s.error for s in st.shots if s.error]
        assert not failures, failures[:3]
        assert len(st.shots) >= 30
        assert st.between(0, drain_sent) == {"deepseek"}
        assert st.between(drained_at, undrain_sent) == {"vllm"}  # (a request is routed moments after it starts)
        assert st.between(undrained_at, float("inf")) == {"deepseek"}
    finally:
        stop(gw.proc)


def test_drain_that_would_strand_a_model_needs_force(redis_proc: RedisProcess, tmp_path: Path,
                                                    fakes2: tuple[Fake, Fake]) -> None:
    ds, vl = fakes2
    gw = start_gateway(gw_config(redis_proc, tmp_path, ds, vl), tmp_path)
    try:
        r = admin(gw, "POST", "/providers/vllm/drain")
        assert r.status_code == 409 and "d/vllm-only" in r.json()["error"]["message"]
        r = admin(gw, "POST", "/providers/vllm/drain", params={"force": "true"})
        assert r.status_code == 200 and r.json()["models_without_deployment"] == ["d/vllm-only"]
        key = asyncio.run(make_key(gw))
        with pytest.raises(openai.APIStatusError) as e:
            sdk(gw, key).chat.completions.create(model="d/vllm-only", messages=HELLO)
        assert e.value.status_code == 503 and "vllm: drained" in e.value.message
        assert admin(gw, "POST", "/providers/vllm/undrain").status_code == 200
        assert ask(sdk(gw, key), "d/vllm-only")[0] == "vllm"
    finally:
        stop(gw.proc)


def test_drain_reaches_every_worker_through_redis(redis_proc: RedisProcess, tmp_path: Path,
                                                  fakes2: tuple[Fake, Fake]) -> None:
    ds, vl = fakes2
    ds.configure(latency_ms=0)
    gw = start_gateway(gw_config(redis_proc, tmp_path, ds, vl), tmp_path, workers=2)
    try:
        key = asyncio.run(make_key(gw))

        def served(n: int) -> set[str]:
            out = set()
            for _ in range(n):  # a new connection each time, so both workers take some
                with httpx.Client(timeout=10) as c:
                    r = c.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": MODEL, "messages": HELLO})
                    assert r.status_code == 200, r.text
                    out.add(r.headers["x-therouter-provider"])
            return out

        assert served(10) == {"deepseek"}
        assert admin(gw, "POST", "/providers/deepseek/drain").json()["shared"] is True
        time.sleep(1.3)  # every worker refreshes its copy each second
        assert served(20) == {"vllm"}
        assert admin(gw, "POST", "/providers/deepseek/undrain").status_code == 200
        time.sleep(1.3)
        assert served(10) == {"deepseek"}
    finally:
        ds.configure(latency_ms=150)
        stop(gw.proc)
