"""Traces, when OTEL_EXPORTER_OTLP_ENDPOINT is set: a real gateway exports over OTLP/HTTP to a receiver in this test;
one span per request, a child per upstream attempt. Off by default: no tracer is built and the SDK is not loaded."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from tests.integration.conftest import (
    Fake,
    Gateway,
    make_key,
    own_config,
    running,
    start_gateway,
)
from therouter.redisproc import RedisProcess

MODEL = "deepseek/deepseek-v3.2"


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces (protobuf) -> spans kept as dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            attrs = {a.key: _value(a.value) for a in s.attributes}
                            spans.append({"name": s.name, "id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                                          "trace": s.trace_id.hex(), "attrs": attrs, "service": service,
                                          "error": s.status.code == 2})
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture(scope="module")
def traced(redis_proc: RedisProcess, fakes: dict[str, Fake],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Receiver]]:
    rx = Receiver()
    tmp = tmp_path_factory.mktemp("otel")
    cfg = own_config(redis_proc.url, fakes, tmp, "otel")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with running(start_gateway(cfg, tmp, extra_env=env)) as gw:
        yield gw, rx
    rx.close()


def test_one_span_per_request_and_one_child_per_attempt(traced: tuple[Gateway, Receiver],
                                                        fakes: dict[str, Fake]) -> None:
    import asyncio

    gw, rx = traced
    key = asyncio.run(make_key(gw, "otel"))
    fakes["deepseek"].configure(error_kind="500", error_rate=1)  # the first attempt fails, vLLM serves
    rid = "trace-" + uuid.uuid4().hex[:12]
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}", "x-request-id": rid},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "vllm-local"
    usage = r.json()["usage"]
    root = _wait(lambda: [s for s in rx.spans if s["attrs"].get("therouter.request_id") == rid])
    assert len(root) == 1
    root_span = root[0]
    assert root_span["name"] == "chat" and root_span["service"] == "therouter" and not root_span["error"]
    assert root_span["attrs"]["http.response.status_code"] == 200
    assert root_span["attrs"]["therouter.provider"] == "vllm-local"
    assert root_span["attrs"]["therouter.generation_id"] == r.json()["id"]
    children = _wait(lambda: [s for s in rx.spans if s["parent"] == root_span["id"]], n=2)
    assert all(c["name"] == "upstream" and c["trace"] == root_span["trace"] for c in children)
    by_provider = {c["attrs"]["therouter.provider"]: c for c in children}
    assert set(by_provider) == {"deepseek", "vllm-local"}
    failed, served = by_provider["deepseek"], by_provider["vllm-local"]
    assert failed["error"] and failed["attrs"]["therouter.outcome"] == "upstream_error"
    assert served["attrs"]["therouter.outcome"] == "ok" and served["attrs"]["therouter.model"] == MODEL
    assert served["attrs"]["therouter.completion_tokens"] == usage["completion_tokens"]
    assert served["attrs"]["therouter.prompt_tokens"] == usage["prompt_tokens"]
    assert "hi" not in str(rx.spans) and key not in str(rx.spans)


def test_refused_request_is_one_span(traced: tuple[Gateway, Receiver]) -> None:
    """A request refused before routing (here a bad key) is one span, with its status and no attempt."""
    gw, rx = traced
    rid = "trace-" + uuid.uuid4().hex[:12]
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": "Bearer tr-nope", "x-request-id": rid},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401
    spans = _wait(lambda: [s for s in rx.spans if s["attrs"].get("therouter.request_id") == rid])
    assert len(spans) == 1 and spans[0]["attrs"]["http.response.status_code"] == 401
    assert spans[0]["attrs"]["therouter.outcome"] == "refused"
    time.sleep(0.3)
    assert not [s for s in rx.spans if s["parent"] == spans[0]["id"]]


def test_off_by_default_loads_no_tracing_sdk() -> None:
    code = (
        "import asyncio, sys\n"
        "from therouter.config import parse_settings\n"
        "from therouter.services import build_services\n"
        "cfg = {'store': {'redis_url': 'redis://127.0.0.1:1/0'},\n"
        "       'providers': {'ds': {'kind': 'vllm', 'base_url': 'http://127.0.0.1:1/v1'}},\n"
        "       'models': {'m/one': {'context_length': 100, 'max_output_tokens': 10,\n"
        "                            'pricing': {'input': 1, 'output': 2},\n"
        "                            'deployments': [{'provider': 'ds', 'model': 'one'}]}}}\n"
        "svc = asyncio.run(build_services(parse_settings(cfg, 't', env={})))\n"
        "assert svc.gateway.tracing is None\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _wait(find: Any, n: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = find()
        if len(got) >= n:
            return got  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"expected {n} span(s), got {find()}")
