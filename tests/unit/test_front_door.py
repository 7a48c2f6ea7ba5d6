"""The front door and the completion route it serves, in process (ASGI messages in, ASGI messages out): headers
bounded, the request id, the in-flight limit, the body deadline, and an unexpected exception as a generic 500."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from therouter.api.middleware import FrontDoor
from therouter.api.openai import PATHS, CompletionsRoute
from therouter.gateway import JSONAnswer

Message = dict[str, Any]


class Gateway:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.refused: list[tuple[str, str, Any]] = []
        self.handled: list[bytes] = []

    async def handle(self, key: Any, endpoint: str, raw: bytes, rid: str, gone: Any) -> JSONAnswer:
        self.handled.append(raw)
        if self.fail is not None:
            raise self.fail
        return JSONAnswer(b'{"ok":true}', {"x-therouter-provider": "p"})

    def refuse(self, endpoint: str, rid: str, err: Any) -> None:
        self.refused.append((endpoint, rid, err))


def door(gateway: Gateway, *, limit: int = 10, max_header_bytes: int = 4096,
         body_timeout: float = 5.0) -> tuple[FrontDoor, list[Message]]:
    async def auth(header: str | None) -> Any:
        return SimpleNamespace(id="key_1")

    gw = SimpleNamespace(handle=gateway.handle, refused=gateway.refuse)
    server = SimpleNamespace(body_timeout=body_timeout, max_body_bytes=1024, stream_write_timeout=5.0)
    services = SimpleNamespace(settings=SimpleNamespace(server=server), auth=SimpleNamespace(authenticate=auth),
                               gateway=gw)
    app = SimpleNamespace(state=SimpleNamespace(services=services))
    inner_calls: list[Message] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        inner_calls.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": [(b"x-request-id", b"spoofed")]})
        await send({"type": "http.response.body", "body": b""})

    return FrontDoor(inner, PATHS, CompletionsRoute(app), max_header_bytes=max_header_bytes,
                     limit=limit), inner_calls


async def call(app: FrontDoor, path: str = "/v1/chat/completions", method: str = "POST",
               headers: list[tuple[bytes, bytes]] | None = None,
               body: list[bytes] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    parts = list(body if body is not None else [b'{"model":"m"}'])
    sent: list[Message] = []

    async def receive() -> Message:
        if parts:
            chunk = parts.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
        await asyncio.sleep(3600)  # a client still connected, sending nothing more
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or [], "state": {}}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_bytes = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body_bytes


async def test_an_answer_carries_a_new_request_id_and_the_gateway_s_headers() -> None:
    status, headers, body = await call(door(Gateway())[0])
    assert status == 200 and body == b'{"ok":true}'
    assert headers[b"x-request-id"].startswith(b"req_") and len(headers[b"x-request-id"]) == 36
    assert headers[b"x-therouter-provider"] == b"p" and headers[b"content-length"] == b"11"


async def test_a_sane_client_request_id_is_kept_an_insane_one_replaced() -> None:
    app = door(Gateway())[0]
    _, headers, _ = await call(app, headers=[(b"x-request-id", b"client-42")])
    assert headers[b"x-request-id"] == b"client-42"
    _, headers, _ = await call(app, headers=[(b"x-request-id", b"bad id\n")])
    assert headers[b"x-request-id"].startswith(b"req_")


async def test_an_unexpected_exception_is_a_generic_500_logged_with_its_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="therouter.api"):
        status, headers, body = await call(door(Gateway(fail=RuntimeError("secret detail")))[0])
    err = orjson.loads(body)["error"]
    assert status == 500 and err["type"] == "server_error" and "secret" not in body.decode()
    assert headers[b"x-request-id"].startswith(b"req_")
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


async def test_headers_over_the_limit_are_431_before_anything_runs() -> None:
    gateway = Gateway()
    status, headers, body = await call(door(gateway, max_header_bytes=1024)[0],
                                       headers=[(b"x-big", b"a" * 2000)])
    assert status == 431 and orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert headers[b"connection"] == b"close" and gateway.handled == []


async def test_past_the_in_flight_limit_a_request_gets_503_at_once() -> None:
    status, headers, body = await call(door(Gateway(), limit=0)[0])
    assert status == 503 and orjson.loads(body)["error"]["code"] == "server_overloaded"
    assert headers[b"retry-after"] == b"1"


async def test_a_body_that_stops_arriving_is_408_and_counted_as_refused() -> None:
    gateway = Gateway()
    parts = [b'{"mod']  # one part that promises more, then nothing

    async def receive() -> Message:
        if parts:
            return {"type": "http.request", "body": parts.pop(), "more_body": True}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    app = door(gateway, body_timeout=0.05)[0]
    await asyncio.wait_for(app({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [],
                                "state": {}}, receive, send), 5)
    start = sent[0]
    assert start["status"] == 408 and (b"connection", b"close") in [(k.lower(), v) for k, v in start["headers"]]
    assert [e for _, _, e in gateway.refused][-1].status == 408


async def test_other_paths_go_on_with_the_request_id_set_on_their_answer() -> None:
    app, inner = door(Gateway())
    status, headers, _ = await call(app, path="/v1/models", method="GET")
    assert status == 204 and len(inner) == 1 and inner[0]["state"]["request_id"] == headers[b"x-request-id"].decode()
    assert headers[b"x-request-id"] != b"spoofed"
    status, _, _ = await call(app, path="/v1/chat/completions", method="GET")  # only POST is the hot route
    assert status == 204 and len(inner) == 2
