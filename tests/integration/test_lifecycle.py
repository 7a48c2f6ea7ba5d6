"""Restarts and shutdown: SIGTERM lets streams in flight finish and meters them; a restarted gateway replays the
journal that a Redis outage left behind."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.integration.conftest import Fake, gateway_config, make_key, post_raw, start_gateway, stop
from therouter.config import StoreConfig, load_settings
from therouter.metering.meter import Meter
from therouter.redisproc import RedisProcess
from therouter.store import Store

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hello"}]


async def _generation(cfg_path: Path, gen_id: str) -> dict[str, Any] | None:
    settings = load_settings(cfg_path, env={})
    store = Store(StoreConfig(redis_url=settings.store.redis_url, key_prefix=settings.store.key_prefix))
    try:
        return await Meter(store, settings, cfg_path.parent / "unused-journal").generation(gen_id)
    finally:
        await store.aclose()


def test_sigterm_lets_streams_finish_and_meters_them(redis_proc: RedisProcess, fakes: dict[str, Fake],
                                                     tmp_path: Path) -> None:
    cfg = gateway_config(redis_proc.url, f"lc{uuid.uuid4().hex[:6]}:", fakes, tmp_path / "data")
    gw = start_gateway(cfg, tmp_path)
    try:
        key = asyncio.run(make_key(gw, "shutdown"))
        fakes["deepseek"].configure(chunks=20, chunk_delay_ms=100)
        events: list[bytes] = []
        with httpx.stream("POST", gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": MODEL, "messages": HELLO, "stream": True}, timeout=30) as r:
            it = r.iter_raw()
            events.append(next(it))
            gw.proc.send_signal(signal.SIGTERM)  # shutdown starts with the stream in flight
            events.extend(it)
        body = b"".join(events).decode()
        assert body.endswith("data: [DONE]\n\n"), body[-300:]
        assert gw.proc.wait(20) in (0, -signal.SIGTERM)  # a clean stop (uvicorn re-raises the signal it caught)
        gen_id = json.loads(body.split("\n\n")[0][6:])["id"]
        rec = asyncio.run(_generation(gw.config_path, gen_id))
        assert rec and rec["outcome"] == "completed" and rec["usage"]["completion_tokens"] == 20
    finally:
        stop(gw.proc)


def test_restarted_gateway_replays_the_journal(fakes: dict[str, Fake], tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis", appendonly=True).start()
    cfg = gateway_config(redis.url, f"jr{uuid.uuid4().hex[:6]}:", fakes, tmp_path / "data")
    gw = start_gateway(cfg, tmp_path)
    try:
        key = asyncio.run(make_key(gw, "journal"))
        c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
        first = c.chat.completions.create(model=MODEL, messages=HELLO).id  # the key is now in the gateway's cache
        # its record is written after the answer: read through the gateway (which waits for it) before Redis goes
        r = httpx.get(gw.v1 + "/generation", params={"id": first}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        redis.stop(kill=True)
        ids = [c.chat.completions.create(model=MODEL, messages=HELLO).id for _ in range(2)]
        stop(gw.proc)  # the gateway goes away before Redis is back: only the journal on disk has these records
        journal = list((tmp_path / "data" / "journal").glob("*.jsonl"))
        assert journal and sum(len(p.read_text().splitlines()) for p in journal) == 2
        redis.start()
        gw = start_gateway(cfg, tmp_path)  # same data_dir: replays at start-up

        def replayed() -> bool:
            return all(asyncio.run(_generation(gw.config_path, i)) for i in ids)

        deadline = time.monotonic() + 10
        while not replayed() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert replayed()
        info = httpx.get(gw.v1 + "/key", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        assert info["requests"] == 3
        assert not any(p.read_text().strip() for p in (tmp_path / "data" / "journal").glob("*.jsonl"))
    finally:
        stop(gw.proc)
        redis.stop()



def test_client_that_stops_reading_is_cut_off_and_metered(redis_proc: RedisProcess, fakes: dict[str, Fake],
                                                          tmp_path: Path) -> None:
    """A slow reader never pins an upstream slot: past server.stream_write_timeout the stream is closed, the
    upstream cancelled, and the key pays for what was produced."""
    cfg = gateway_config(redis_proc.url, f"sr{uuid.uuid4().hex[:6]}:", fakes, tmp_path / "data")
    cfg["server"]["stream_write_timeout"] = 1
    gw = start_gateway(cfg, tmp_path)
    try:
        key = asyncio.run(make_key(gw, "slow-reader"))
        # about 12 MB of events: far more than the kernel buffers between a client that never reads and the gateway
        fakes["deepseek"].configure(chunks=600, tokens_per_chunk=4000, max_model_len=10_000_000)
        fakes["deepseek"].reset()
        body = {"model": MODEL, "messages": HELLO, "stream": True}
        with post_raw(gw, key, body) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                log = fakes["deepseek"].stats()["log"]
                if log and log[-1].get("t_end"):
                    break
                time.sleep(0.1)
            last = fakes["deepseek"].stats()["log"][-1]
            assert last.get("closed_by") == "client", last  # the gateway let go of the upstream
        info = httpx.get(gw.v1 + "/key", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        assert info["requests"] == 1 and 0 < info["tokens"]["completion"] < 600 * 4000
    finally:
        stop(gw.proc)
