"""The server's view of a completion request's connection: the response head leaves with the first body."""

from __future__ import annotations

from typing import Any

from therouter.server import HeadWithBody


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
