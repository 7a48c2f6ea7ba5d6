"""Slow clients against a real gateway: a slowloris client trickling its headers (or its body) a byte at a time is cut
off by the deadline while normal requests keep succeeding, and a worker at `server.max_concurrency` answers 503 with
Retry-After at once instead of queueing."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

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
HELLO = [{"role": "user", "content": "hi"}]
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONCURRENCY = 1.0, 2.0, 3


@pytest.fixture(scope="module")
def slow_gw(redis_proc: RedisProcess, fakes: dict[str, Fake],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("slow")
    cfg = own_config(redis_proc.url, fakes, tmp, "sc")
    cfg["server"].update(header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, max_concurrency=MAX_CONCURRENCY)
    cfg["providers"]["deepseek"]["timeouts"] = {"connect": 1, "first_token": 20, "idle": 20, "total": 30}
    with running(start_gateway(cfg, tmp)) as gw:
        yield gw


@pytest.fixture(scope="module")
def slow_key(slow_gw: Gateway) -> str:
    return asyncio.run(make_key(slow_gw, "slow-clients"))


def port(gw: Gateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def trickle(gw: Gateway, head: bytes, tail: bytes, gap: float = 0.1) -> tuple[bool, bytes]:
    """Send ``head`` at once, then ``tail`` one byte every ``gap`` seconds. Returns whether the server closed the
    connection before the whole tail was sent, and what it answered."""
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=30) as s:
        s.sendall(head)
        got = b""
        for i in range(len(tail)):
            readable, _, _ = select.select([s], [], [], gap)
            if readable:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    return True, got
                if not chunk:
                    return True, got
                got += chunk
            try:
                s.send(tail[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True, got
        return False, got


def silent(gw: Gateway, wait: float = 10.0) -> tuple[bool, bytes]:
    """Connect and say nothing for up to ``wait`` seconds: whether the server closed, and what it answered."""
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=30) as s:
        got, deadline = b"", time.monotonic() + wait
        while time.monotonic() < deadline:
            readable, _, _ = select.select([s], [], [], 0.1)
            if readable:
                chunk = s.recv(65536)
                if not chunk:
                    return True, got
                got += chunk
        return False, got


def normal(gw: Gateway, key: str) -> int:
    r = httpx.post(gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": MODEL, "messages": HELLO}, timeout=30)
    return r.status_code


def test_slowloris_headers_are_cut_off_while_normal_requests_succeed(slow_gw: Gateway, slow_key: str) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    tail = b"X-Padding: " + b"a" * 100  # 10+ s at one byte per 0.1 s: ten times the header deadline
    with ThreadPoolExecutor(24) as pool:
        lorises = [pool.submit(trickle, slow_gw, head, tail) for _ in range(20)]
        lorises.append(pool.submit(silent, slow_gw))  # connects and never speaks
        statuses = []
        while not all(f.done() for f in lorises):
            statuses.append(normal(slow_gw, slow_key))
    assert statuses and set(statuses) == {200}  # served all along
    for f in lorises:
        closed, answer = f.result()
        assert closed, "a slowloris connection was still open after ten header deadlines"
        # the deadline's answer: 408 in OpenAI's shape, then the connection is closed (a trickler whose next byte
        # met the closed socket may see the reset before it reads the answer; the silent one always reads it)
        assert answer or f is not lorises[-1]
        if answer:
            status, _, rest = answer.partition(b"\r\n")
            assert status == b"HTTP/1.1 408 Request Timeout", answer
            assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_pipelined_requests_are_answered_in_order(slow_gw: Gateway, slow_key: str) -> None:
    """Two requests sent back to back on one connection (HTTP/1.1 pipelining): the second waits for the first's
    answer, then is served (the protocol's own on_response_complete starts it)."""
    body = json.dumps({"model": MODEL, "messages": HELLO}).encode()
    chat = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + slow_key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)
    with socket.create_connection(("127.0.0.1", port(slow_gw)), timeout=30) as s:
        s.sendall(chat + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while got.count(b"HTTP/1.1 ") < 2 or not got.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    first, second = got.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200 ") and b'"chat.completion"' in first
    assert second.startswith(b"200 ") and second.endswith(b'{"status":"ok"}')


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(slow_gw: Gateway) -> None:
    """Between requests a kept-alive connection may idle for uvicorn's ``timeout_keep_alive`` (5 s), then it is
    closed (the sweeper's job since it replaced the timer per answer); a request in time keeps it open."""
    with socket.create_connection(("127.0.0.1", port(slow_gw)), timeout=30) as s:
        for _ in range(2):  # the second request, 3 s after the first answer, still finds the connection open
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got or not got.endswith(b"}"):  # the whole answer (a small JSON body)
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 ")
            time.sleep(3)
        started = time.monotonic()
        readable, _, _ = select.select([s], [], [], 10)
        assert readable and s.recv(65536) == b""  # closed by the server, with nothing said
        assert time.monotonic() - started < 4  # 5 s after the last answer (3 of them already slept)


def test_a_trickled_body_gets_408_and_the_connection_closed(slow_gw: Gateway, slow_key: str) -> None:
    body = json.dumps({"model": MODEL, "messages": HELLO, "user": "x" * 200}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + slow_key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    closed, answer = trickle(slow_gw, head, body)  # 25+ s at one byte per 0.1 s
    assert closed and answer.startswith(b"HTTP/1.1 408 "), answer
    headers, _, payload = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    err = json.loads(payload)["error"]
    assert (err["code"], err["type"]) == ("request_timeout", "invalid_request_error")
    assert normal(slow_gw, slow_key) == 200


def test_at_max_concurrency_a_request_gets_503_with_retry_after_at_once(slow_gw: Gateway, slow_key: str,
                                                                        fakes: dict[str, Fake]) -> None:
    upstream = fakes["deepseek"]
    upstream.configure(latency_ms=4000)
    try:
        with ThreadPoolExecutor(MAX_CONCURRENCY) as pool:
            held = [pool.submit(normal, slow_gw, slow_key) for _ in range(MAX_CONCURRENCY)]
            deadline = time.monotonic() + 20
            while upstream.stats()["in_flight"] < MAX_CONCURRENCY and time.monotonic() < deadline:
                time.sleep(0.02)
            assert upstream.stats()["in_flight"] == MAX_CONCURRENCY
            r = httpx.post(slow_gw.v1 + "/chat/completions", headers={"Authorization": f"Bearer {slow_key}"},
                           json={"model": MODEL, "messages": HELLO}, timeout=30)
            still_held = sum(not f.done() for f in held)  # answered while the others were still being served
            assert httpx.get(slow_gw.url + "/health", timeout=5).status_code == 200  # not counted
            assert [f.result() for f in held] == [200] * MAX_CONCURRENCY
    finally:
        upstream.configure(latency_ms=0)
    assert r.status_code == 503 and still_held == MAX_CONCURRENCY
    assert r.headers["retry-after"] == "1" and r.headers["x-request-id"]
    err = r.json()["error"]
    assert (err["code"], err["type"]) == ("server_overloaded", "server_error") and str(MAX_CONCURRENCY) in err["message"]
    assert normal(slow_gw, slow_key) == 200  # capacity is back


def test_the_limits_are_configurable(slow_gw: Gateway) -> None:
    """The test gateway runs with the values above, not the defaults (10 s, 60 s, 1024)."""
    cfg = Path(slow_gw.config_path).read_text()
    assert f"header_timeout: {HEADER_TIMEOUT}" in cfg and f"max_concurrency: {MAX_CONCURRENCY}" in cfg
