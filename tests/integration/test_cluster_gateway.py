"""A real gateway whose store is a three-node Redis Cluster (`store.redis_url: redis+cluster://...`): a budgeted key's
requests (admission script with its in-flight registration, settlement, records) and the admin and CLI reads all
work through the cluster."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import openai

from tests.integration.conftest import (
    ADMIN_KEY,
    Fake,
    gateway_config,
    make_key,
    start_gateway,
    stop,
)
from tests.integration.test_cli import therouter
from tests.redis_cluster import RedisClusterProcess

MODEL = "deepseek/deepseek-v3.2"


def test_requests_through_a_gateway_on_a_redis_cluster(redis_cluster: RedisClusterProcess, fakes: dict[str, Fake],
                                                       tmp_path: Path) -> None:
    cfg = gateway_config(redis_cluster.url, f"cl{uuid.uuid4().hex[:8]}:", fakes, tmp_path / "data")
    gw = start_gateway(cfg, tmp_path)
    try:
        assert httpx.get(gw.url + "/ready", timeout=10).json()["store"] == "ok"
        key = asyncio.run(make_key(gw, "on-cluster", budget_nano=10**9, rpm=100))
        client = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)
        r = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        answer = r.parse()
        assert answer.choices[0].message.content and r.headers["x-ratelimit-limit-requests"] == "100"
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

        record = httpx.get(gw.v1 + "/generation", params={"id": answer.id}, headers={"Authorization": f"Bearer {key}"},
                           timeout=10).json()["data"]
        assert record["outcome"] == "completed" and record["cost_nano"] > 0
        spend = httpx.get(gw.v1 + "/key", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["data"]
        assert (spend["requests"], spend["reserved_nano"]) == (2, 0) and spend["spend_nano"] > 0

        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        keys = httpx.get(gw.url + "/admin/keys", headers=admin, timeout=10).json()["data"]
        row = next(k for k in keys if k["name"] == "on-cluster")
        assert row["last_used_at"] is not None
        usage = httpx.get(gw.url + "/admin/usage", params={"group_by": "key,provider"}, headers=admin,
                          timeout=10).json()
        assert [(u["key_name"], u["provider"], u["requests"]) for u in usage["data"]] == [
            ("on-cluster", "deepseek", 2)]

        listing = therouter("keys", "--config", str(gw.config_path), "list", env=gw.env)
        assert listing.returncode == 0 and "on-cluster" in listing.stdout, listing.stderr
        shown = therouter("keys", "--config", str(gw.config_path), "show", row["id"], env=gw.env)
        assert json.loads(shown.stdout)["spend"]["total"]["requests"] == 2
    finally:
        stop(gw.proc)
    assert "Traceback" not in gw.logs()
