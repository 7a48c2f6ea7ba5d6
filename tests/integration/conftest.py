"""Real processes over real sockets: fake upstreams (DeepSeek, vLLM, SGLang flavours), the gateway (uvicorn), and the
session's private redis-server. Clients are the official OpenAI SDK and raw httpx."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from therouter.config import StoreConfig
from therouter.demo import start_fake_upstream
from therouter.redisproc import RedisProcess, free_port
from therouter.store import Store

CANARY = "sk-CANARY-7f3a9c2e1d4b"  # the hosted provider's API key: must never leak anywhere
ADMIN_KEY = "admin-" + uuid.uuid4().hex
FIM = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]


@dataclass
class Fake:
    flavor: str
    port: int
    proc: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/_fake/stats", timeout=5).json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        httpx.post(self.url + "/_fake/reset", timeout=5).raise_for_status()

    def configure(self, **knobs: Any) -> dict[str, Any]:
        r = httpx.post(self.url + "/_fake/config", json=knobs, timeout=5)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def last(self) -> dict[str, Any]:
        return self.stats()["log"][-1]  # type: ignore[no-any-return]


def start_fake(flavor: str, api_key: str | None = None, *extra: str) -> Fake:
    port = free_port()
    return Fake(flavor, port, start_fake_upstream(flavor, port, api_key, *extra))


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict[str, Fake]]:
    started = {
        "deepseek": start_fake("deepseek", CANARY),
        "vllm": start_fake("vllm"),
        "sglang": start_fake("sglang"),
    }
    yield started
    for f in started.values():
        stop(f.proc)


def gateway_config(redis_url: str, prefix: str, fakes: dict[str, Fake], data_dir: Path) -> dict[str, Any]:
    t = {"connect": 1, "first_token": 2, "idle": 2, "total": 20}
    card: dict[str, Any] = {
        "context_length": 4096, "max_output_tokens": 1024,
        "modalities": {"input": ["text"], "output": ["text"]},
        "supported_parameters": ["temperature", "max_tokens", "top_p", "tools", "tool_choice", "response_format",
                                 "stop"],
        "pricing": {"input": 0.96, "cached_input": 0.24, "output": 2.88},
    }
    return {
        "server": {"host": "127.0.0.1", "port": 0, "request_deadline": 30, "model_check_interval": 0},
        "store": {"redis_url": redis_url, "key_prefix": prefix},
        "data_dir": str(data_dir),
        "providers": {
            "deepseek": {"kind": "deepseek", "base_url": fakes["deepseek"].url, "api_key_env": "TEST_DEEPSEEK_KEY",
                         "timeouts": t},
            "vllm-local": {"kind": "vllm", "base_url": fakes["vllm"].url + "/v1", "timeouts": t},
            "sglang-local": {"kind": "sglang", "base_url": fakes["sglang"].url + "/v1", "timeouts": t},
            "nowhere": {"kind": "vllm", "base_url": f"http://127.0.0.1:{free_port()}/v1", "timeouts": t},
        },
        "models": {
            "deepseek/deepseek-v3.2": {**card, "deployments": [
                {"provider": "deepseek", "model": "deepseek-v3.2", "priority": 0,
                 "capabilities": ["tools", "json_object", "fim"]},
                {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2", "priority": 1,
                 "capabilities": ["tools", "json_object", "json_schema", "fim"], "fim_tokens": FIM},
                {"provider": "sglang-local", "model": "deepseek-ai/DeepSeek-V3.2", "priority": 2,
                 "capabilities": ["tools", "json_object", "json_schema"]},
            ]},
            "selfhost/only-vllm": {**card, "deployments": [
                {"provider": "vllm-local", "model": "deepseek-ai/DeepSeek-V3.2",
                 "capabilities": ["tools", "json_object", "json_schema", "fim"], "fim_tokens": FIM},
            ]},
            "selfhost/only-sglang": {**card, "deployments": [
                {"provider": "sglang-local", "model": "deepseek-ai/DeepSeek-V3.2",
                 "capabilities": ["tools", "json_object", "json_schema"]},
            ]},
            "legacy/deepseek-chat": {**card, "deployments": [  # an id DeepSeek retired: reported at start-up
                {"provider": "deepseek", "model": "deepseek-chat"},
            ]},
            "test/vision-less": {**card, "deployments": [
                {"provider": "deepseek", "model": "deepseek-v3.2", "capabilities": ["tools"]},
            ]},
        },
    }


def own_config(redis_url: str, fakes: dict[str, Fake], tmp: Path, tag: str) -> dict[str, Any]:
    """:func:`gateway_config` for a gateway of a module's own: a fresh key prefix (``tag`` + random), data under
    ``tmp``."""
    return gateway_config(redis_url, f"{tag}{uuid.uuid4().hex[:8]}:", fakes, tmp / "data")


def anthropic_provider(claude: Fake) -> dict[str, Any]:
    """The provider entry of a fake Anthropic upstream (its key in the gateway's ``TEST_ANTHROPIC_KEY``)."""
    return {"kind": "anthropic", "base_url": claude.url, "api_key_env": "TEST_ANTHROPIC_KEY",
            "timeouts": {"connect": 1, "first_token": 2, "idle": 2, "total": 20}}


@dataclass
class Gateway:
    url: str
    prefix: str
    redis_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gateway(config: dict[str, Any], tmp: Path, extra_env: dict[str, str] | None = None,
                  workers: int = 1, launcher: Path | None = None) -> Gateway:
    """``launcher``: a script run instead of ``-m therouter`` (it gets the same arguments, ``serve ...``)."""
    port = free_port()
    cfg_path = tmp / f"gateway-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log_path = tmp / f"gateway-{port}.log"
    env = {**os.environ, "TEST_DEEPSEEK_KEY": CANARY, "THEROUTER_ADMIN_KEY": ADMIN_KEY, **(extra_env or {})}
    args = [sys.executable, *([str(launcher)] if launcher else ["-m", "therouter"]), "serve", "--config",
            str(cfg_path), "--port", str(port), "--log-level", "info", "--workers", str(workers)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                return Gateway(url, config["store"]["key_prefix"], config["store"]["redis_url"], proc, log_path,
                               cfg_path, env)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"gateway did not start: {log_path.read_text()}")


@contextmanager
def running(gw: Gateway, *own_fakes: Fake) -> Iterator[Gateway]:
    """A started gateway (and fake upstreams of its own), stopped when the block ends: a fixture yields inside it."""
    try:
        yield gw
    finally:
        stop(gw.proc)
        for f in own_fakes:
            stop(f.proc)


@pytest.fixture(scope="session")
def gateway(redis_proc: RedisProcess, fakes: dict[str, Fake],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw")
    with running(start_gateway(own_config(redis_proc.url, fakes, tmp, "it"), tmp)) as gw:
        yield gw


async def make_key(gw: Gateway, name: str = "test", **limits: Any) -> str:
    store = Store(StoreConfig(redis_url=gw.redis_url, key_prefix=gw.prefix))
    try:
        key, _ = await store.create_key(name, **limits)
        return key
    finally:
        await store.aclose()


@pytest.fixture
async def api_key(gateway: Gateway) -> str:
    return await make_key(gateway)


@pytest.fixture
def client(gateway: Gateway, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture
def aclient(gateway: Gateway, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def _clean_fakes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Faults set on a shared fake upstream by one test never leak into the next."""
    yield
    if "fakes" in request.fixturenames:
        for f in request.getfixturevalue("fakes").values():
            try:
                httpx.post(f.url + "/_fake/reset", json={"knobs": True}, timeout=5).raise_for_status()
            except httpx.HTTPError:
                pass


@pytest.fixture(scope="session")
def redis_url(redis_proc: RedisProcess) -> str:
    return redis_proc.url


def wait_for(pred: Any, timeout: float = 5.0) -> Any:
    """``pred()``'s first truthy value, polled every 50 ms; its last value once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def post_raw(gw: Gateway, key: str, body: dict[str, Any]) -> socket.socket:
    """POST /v1/chat/completions over a bare socket, so a test can read k events and then vanish like a client."""
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n"
              + raw)
    return s


def read_events(s: socket.socket, n: int) -> bytes:
    got = b""
    while got.count(b"data: ") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got
