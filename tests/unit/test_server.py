"""The server's view of a completion request's connection: the response head leaves with the first body."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from unittest.mock import MagicMock

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from therouter.server import HeadWithBody, _respond


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def test_the_head_leaves_with_the_first_body_and_later_writes_go_as_they_come() -> None:
    t = Transport()
    w = HeadWithBody(t)  # type: ignore[arg-type]
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert t.writes == []
    w.write(b"{}")
    w.write(b"more")
    assert t.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"more"]
    assert w.get_extra_info("peername") == ("127.0.0.1", 1) and not w.is_closing()


def test_an_interim_100_continue_is_not_held() -> None:
    t = Transport()
    w = HeadWithBody(t)  # type: ignore[arg-type]
    w.write(HeadWithBody.CONTINUE)
    w.write(b"HTTP/1.1 200 OK\r\n\r\n")
    w.write(b"body")
    assert t.writes == [HeadWithBody.CONTINUE, b"HTTP/1.1 200 OK\r\n\r\nbody"]


def test_a_close_after_the_head_sends_it_first() -> None:
    t = Transport()
    w = HeadWithBody(t)  # type: ignore[arg-type]
    w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    w.close()
    assert t.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"] and w.is_closing()


def _cycle(t: Transport, keep_alive: bool = True) -> tuple[Any, list[str]]:
    done: list[str] = []
    flow = MagicMock(write_paused=False)
    cycle = RequestResponseCycle(
        scope={"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []},  # type: ignore[typeddict-item]
        transport=HeadWithBody(t), flow=flow, logger=logging.getLogger("t"),  # type: ignore[arg-type]
        access_logger=logging.getLogger("t"), access_log=False, default_headers=[(b"date", b"today")],
        message_event=asyncio.Event(), expect_100_continue=False, keep_alive=keep_alive,
        on_response=lambda: done.append("complete"))
    return cycle, done


def test_a_whole_answer_leaves_in_one_write_with_uvicorns_bookkeeping() -> None:
    t = Transport()
    cycle, done = _cycle(t)
    assert _respond(cycle, 200, {"Content-Type": "application/json"}, b"{}")  # (names go out in lower case)
    assert t.writes == [(b"HTTP/1.1 200 OK\r\ndate: today\r\ncontent-type: application/json\r\n"
                         b"content-length: 2\r\n\r\n{}")]
    assert cycle.response_started and cycle.response_complete and done == ["complete"] and not t.closed
    assert not _respond(cycle, 200, {}, b"again")  # started: nothing more

    t = Transport()
    cycle, done = _cycle(t, keep_alive=False)  # the client asked to close: said and done
    assert _respond(cycle, 200, {}, b"{}")
    assert b"connection: close\r\n" in t.writes[0] and t.closed and done == ["complete"]


def test_a_whole_answer_is_left_to_asgi_when_it_cannot_go_at_once() -> None:
    t = Transport()
    cycle, done = _cycle(t)
    cycle.flow.write_paused = True  # a client not reading: uvicorn's send waits for it
    assert not _respond(cycle, 200, {}, b"{}")
    cycle.flow.write_paused = False
    assert not _respond(cycle, 200, {"x-bad": "a\r\nb"}, b"{}")  # uvicorn's send refuses it
    assert not _respond(cycle, 200, {"x-bad": "a\nb"}, b"{}")
    assert not _respond(cycle, 200, {"x-bad\r\nx-evil": "b"}, b"{}")
    assert not _respond(cycle, 200, {"x-provider": "caf\u00e9 \u2603"}, b"{}")  # not latin-1: left to ASGI
    cycle.disconnected = True
    assert not _respond(cycle, 200, {}, b"{}")
    assert t.writes == [] and not cycle.response_started and done == []
