"""A gateway process SIGKILLed mid-stream: its request is settled as `gateway_lost` by the surviving instance (or by
the gateway once restarted) at prompt + checkpointed output, and its reservation no longer holds the key's budget."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import orjson

from tests.integration.conftest import Fake, Gateway, gateway_config, make_key, start_gateway, stop
from therouter.config import StoreConfig, load_settings
from therouter.metering.layout import Layout
from therouter.metering.meter import Meter
from therouter.redisproc import RedisProcess
from therouter.store import Store

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hello"}]
T = TypeVar("T")


def crash_config(redis_url: str, prefix: str, fakes: dict[str, Fake], data_dir: Path) -> dict[str, Any]:
    cfg = gateway_config(redis_url, prefix, fakes, data_dir)
    cfg["metering"] = {"heartbeat_interval": 0.5, "checkpoint_interval": 0.5, "instance_lost_after": 3}
    return cfg


async def _registry(gw: Gateway) -> tuple[list[str], dict[str, dict[str, Any]]]:
    store = Store(StoreConfig(redis_url=gw.redis_url, key_prefix=gw.prefix))
    lay = Layout(gw.prefix)
    try:
        ids = list(await store.redis.zrange(lay.instances(), 0, -1))
        entries: dict[str, dict[str, Any]] = {}
        for inst in ids:
            for gen_id, raw in (await store.redis.hgetall(lay.inflight(inst))).items():
                entries[gen_id] = {**orjson.loads(raw), "instance": inst}
        return ids, entries
    finally:
        await store.aclose()


def instances(gw: Gateway) -> list[str]:
    """The gateway instances registered in Redis (by heartbeat)."""
    return asyncio.run(_registry(gw))[0]


def in_flight(gw: Gateway) -> dict[str, dict[str, Any]]:
    """Every instance's in-flight entries by generation id (each names its instance)."""
    return asyncio.run(_registry(gw))[1]


async def _rebuild(gw: Gateway, key_id: str) -> dict[str, Any]:
    settings = load_settings(gw.config_path, env={})
    store = Store(StoreConfig(redis_url=gw.redis_url, key_prefix=gw.prefix))
    try:
        return await Meter(store, settings, gw.config_path.parent / "unused-journal").rebuild_totals(key_id)
    finally:
        await store.aclose()


def wait_for(what: Callable[[], T | None], seconds: float) -> T:
    deadline = time.monotonic() + seconds
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {seconds}s"
        time.sleep(0.1)


def start_stream(gw: Gateway, key: str, chunks: int) -> tuple[str, Any]:
    """Stream through `gw` with the SDK and read `chunks` chunks; returns the generation id and the open stream."""
    client = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    it = iter(stream)
    gen_id = next(it).id
    for _ in range(chunks - 1):
        next(it)
    return gen_id, stream


def checkpointed(gw: Gateway, gen_id: str) -> dict[str, Any] | None:
    e = in_flight(gw).get(gen_id)
    return e if e and e["usage"]["completion"] > 0 and e["provider"] == "deepseek" else None


def kill(gw: Gateway) -> None:
    os.killpg(gw.proc.pid, signal.SIGKILL)  # the whole process group: nothing gets to clean up
    gw.proc.wait(10)


def lost_record(gw: Gateway, key: str, gen_id: str) -> dict[str, Any]:
    def get() -> dict[str, Any] | None:
        r = httpx.get(gw.v1 + "/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {key}"})
        return r.json()["data"] if r.status_code == 200 else None

    return wait_for(get, 30)


def key_info(gw: Gateway, key: str) -> dict[str, Any]:
    r = httpx.get(gw.v1 + "/key", headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return r.json()["data"]  # type: ignore[no-any-return]


def check_settled(gw: Gateway, key: str, gen_id: str, last: dict[str, Any]) -> None:
    rec = lost_record(gw, key, gen_id)
    assert (rec["outcome"], rec["provider"], rec["model"], rec["stream"]) == ("gateway_lost", "deepseek", MODEL, True)
    u = rec["usage"]
    assert u["estimated"] is True
    assert u["completion_tokens"] >= last["usage"]["completion"] > 0
    assert u["prompt_tokens"] == last["usage"]["prompt"] > 0
    assert rec["cost_nano"] > 0
    info = key_info(gw, key)
    assert (info["reserved_nano"], info["spend_nano"], info["requests"]) == (0, rec["cost_nano"], 1)
    assert gen_id not in in_flight(gw)
    report = asyncio.run(_rebuild(gw, info["key_id"]))  # the counters are the sum of the records
    assert (report["records"], report["match"]) == (1, True)


def test_sigkill_mid_stream_is_settled_by_the_surviving_instance(redis_proc: RedisProcess, fakes: dict[str, Fake],
                                                                 tmp_path: Path) -> None:
    prefix = f"cr{uuid.uuid4().hex[:6]}:"
    a = start_gateway(crash_config(redis_proc.url, prefix, fakes, tmp_path / "a"), tmp_path)
    b = start_gateway(crash_config(redis_proc.url, prefix, fakes, tmp_path / "b"), tmp_path)
    stream = None
    try:
        key = asyncio.run(make_key(a, "crash", budget_nano=10**9))
        fakes["deepseek"].configure(chunks=80, chunk_delay_ms=150)  # a 12 s stream
        gen_id, stream = start_stream(a, key, 5)
        wait_for(lambda: checkpointed(a, gen_id), 10)  # the stream's progress reached Redis
        held = key_info(b, key)
        assert held["reserved_nano"] > 0 and held["requests"] == 0
        kill(a)
        last = in_flight(b)[gen_id]  # the last checkpoint before the crash: a can write nothing more
        assert len(instances(b)) == 2
        check_settled(b, key, gen_id, last)
        assert len(instances(b)) == 1 and last["instance"] not in instances(b)  # the lost instance is forgotten
    finally:
        if stream is not None:
            stream.response.close()
        stop(a.proc)
        stop(b.proc)


def test_a_restarted_gateway_settles_what_it_had_in_flight_when_killed(redis_proc: RedisProcess,
                                                                       fakes: dict[str, Fake],
                                                                       tmp_path: Path) -> None:
    cfg = crash_config(redis_proc.url, f"cr{uuid.uuid4().hex[:6]}:", fakes, tmp_path / "data")
    gw = start_gateway(cfg, tmp_path)
    stream = None
    try:
        key = asyncio.run(make_key(gw, "restart", budget_nano=10**9))
        fakes["deepseek"].configure(chunks=80, chunk_delay_ms=150)
        gen_id, stream = start_stream(gw, key, 5)
        wait_for(lambda: checkpointed(gw, gen_id), 10)
        kill(gw)
        last = in_flight(gw)[gen_id]
        gw = start_gateway(cfg, tmp_path)  # the same gateway again: a new process, a new instance id
        check_settled(gw, key, gen_id, last)
        assert len(instances(gw)) == 1 and last["instance"] not in instances(gw)
    finally:
        if stream is not None:
            stream.response.close()
        stop(gw.proc)
