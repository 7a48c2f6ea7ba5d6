"""H1Transport's own behaviour against raw asyncio servers on 127.0.0.1: keep-alive reuse, the pool limit, stale
connections, framing (chunked, close-delimited, Connection: close), a response not fully read, garbage, flow control.

(The contract it shares with AiohttpTransport is tested for both in test_transport.py.)
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Self

import pytest
import pytest_asyncio

from therouter.errors import UpstreamBadResponse, UpstreamConnectError, UpstreamStreamError
from therouter.providers._h1 import H1Transport
from therouter.providers._http import UpstreamRequest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A raw HTTP/1.1 server: ``handler`` runs per connection; what arrived is recorded."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection number, head, body)
        self.closed_by_client = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._writers:
            w.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        """One request into ``requests``; False at EOF (the client closed the connection)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client += 1
            return False
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append((self.connections, head, body))
        return True

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"


def ok(body: bytes = b'{"ok":true}', extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
    while await srv.read_request(reader):
        writer.write(ok())
        await writer.drain()


def req(url: str, body: bytes = b'{"model":"m"}', method: str = "POST") -> UpstreamRequest:
    return UpstreamRequest(method, url, {"content-type": "application/json", "authorization": "Bearer sk-ours"}, body)


@pytest_asyncio.fixture(loop_scope="function")
async def h1() -> AsyncIterator[H1Transport]:
    t = H1Transport(8)
    yield t
    await t.aclose()


async def roundtrip(t: H1Transport, url: str, body: bytes = b'{"model":"m"}') -> tuple[int, bytes]:
    resp = await t.send(req(url, body), connect=1, headers_timeout=2)
    try:
        return resp.status, await resp.read()
    finally:
        await resp.close()


async def test_what_goes_on_the_wire(h1: H1Transport) -> None:
    async with Server(keep_alive) as srv:
        assert await roundtrip(h1, srv.url("/v1/chat/completions?x=1&y=2")) == (200, b'{"ok":true}')
        resp = await h1.send(UpstreamRequest("POST", srv.url("/v1/empty"), {}), connect=1, headers_timeout=2)
        await resp.read()
        await resp.close()
    head = srv.requests[0][1].decode().lower()
    assert head.startswith("post /v1/chat/completions?x=1&y=2 http/1.1\r\n")
    assert f"host: 127.0.0.1:{srv.port}\r\n" in head
    assert "authorization: bearer sk-ours\r\n" in head
    assert "accept-encoding: gzip, deflate\r\n" in head
    assert "content-length: 13\r\n" in head
    assert "user-agent" not in head
    assert srv.requests[0][2] == b'{"model":"m"}'
    assert b"content-length: 0\r\n" in srv.requests[1][1].lower()  # a POST without a body still says so


async def test_keep_alive_reuses_one_connection(h1: H1Transport) -> None:
    async with Server(keep_alive) as srv:
        for _ in range(5):
            assert await roundtrip(h1, srv.url()) == (200, b'{"ok":true}')
    assert srv.connections == 1
    assert [c for c, _, _ in srv.requests] == [1] * 5


async def test_headers_are_a_lowercase_mapping_and_redirects_are_not_followed(h1: H1Transport) -> None:
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/\r\nRetry-After: 3\r\n"
                         b"X-Twice: a\r\nX-Twice: b\r\nContent-Length: 0\r\n\r\n")

    async with Server(redirect) as srv:
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        assert resp.status == 302
        assert resp.headers["location"] == "http://elsewhere.test/"
        assert resp.headers.get("retry-after") == "3"
        assert resp.headers.get("x-twice") == "a, b"
        assert await resp.read() == b""
        await resp.close()
    assert srv.connections == 1 and len(srv.requests) == 1


async def test_pool_limit_makes_the_next_caller_wait() -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            await release.wait()
            writer.write(ok())

    t = H1Transport(2)
    try:
        async with Server(held) as srv:
            tasks = [asyncio.create_task(roundtrip(t, srv.url())) for _ in range(3)]
            for _ in range(50):
                await asyncio.sleep(0.01)
                if len(srv.requests) == 2:
                    break
            await asyncio.sleep(0.1)
            assert srv.connections == 2 and len(srv.requests) == 2  # the third waits for a slot
            assert not any(task.done() for task in tasks)
            release.set()
            assert await asyncio.gather(*tasks) == [(200, b'{"ok":true}')] * 3
        assert srv.connections == 2  # the third reused a released connection
    finally:
        await t.aclose()


async def test_a_waiter_gets_the_slot_of_a_closed_connection() -> None:
    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        await asyncio.sleep(0.1)
        writer.write(ok(extra="connection: close\r\n"))
        await writer.drain()

    t = H1Transport(1)
    try:
        async with Server(close_after_one) as srv:
            results = await asyncio.gather(*(roundtrip(t, srv.url()) for _ in range(3)))
        assert results == [(200, b'{"ok":true}')] * 3
        assert srv.connections == 3
    finally:
        await t.aclose()


async def test_a_timed_out_request_gives_its_slot_back() -> None:
    async def silent_then_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        if srv.connections == 1:
            await reader.read()  # never answer the first
            return
        writer.write(ok())
        await writer.drain()

    t = H1Transport(1)
    try:
        async with Server(silent_then_ok) as srv:
            with pytest.raises(Exception) as ei:
                await t.send(req(srv.url()), connect=1, headers_timeout=0.2)
            assert type(ei.value).__name__ == "UpstreamTimeout"
            assert await roundtrip(t, srv.url()) == (200, b'{"ok":true}')
    finally:
        await t.aclose()


async def test_idle_connection_closed_by_the_server_is_not_reused(h1: H1Transport) -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(ok())  # keep-alive by default in HTTP/1.1 ... then the server drops it while idle
        await writer.drain()

    async with Server(one_then_close) as srv:
        assert await roundtrip(h1, srv.url()) == (200, b'{"ok":true}')
        await asyncio.sleep(0.1)
        assert await roundtrip(h1, srv.url()) == (200, b'{"ok":true}')
    assert srv.connections == 2


async def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(h1: H1Transport) -> None:
    """The race every client meets: the server closes a kept-alive connection just as the next request is written
    on it. Nothing was answered, so the request is sent again on a fresh connection."""

    async def stale_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(ok())
        await writer.drain()
        if srv.connections == 1:
            await srv.read_request(reader)  # the reused connection's request: closed without a byte
            return
        while await srv.read_request(reader):
            writer.write(ok())
            await writer.drain()

    async with Server(stale_second) as srv:
        assert await roundtrip(h1, srv.url()) == (200, b'{"ok":true}')
        assert await roundtrip(h1, srv.url()) == (200, b'{"ok":true}')
    assert srv.connections == 2
    assert [c for c, _, _ in srv.requests] == [1, 1, 2]


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(h1: H1Transport) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)

    async with Server(rude) as srv:
        with pytest.raises(UpstreamConnectError) as ei:
            await h1.send(req(srv.url()), connect=1, headers_timeout=2)
    assert ei.value.sent is True  # it may have been processed: the caller decides, never a silent resend
    assert ei.value.message == "The provider closed the connection."
    assert srv.connections == 1


async def test_closed_before_headers_were_complete(h1: H1Transport) -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        await writer.drain()

    async with Server(half) as srv:
        with pytest.raises(UpstreamConnectError) as ei:
            await h1.send(req(srv.url()), connect=1, headers_timeout=2)
    assert ei.value.sent is True
    assert srv.connections == 1  # bytes had arrived: no retry


async def test_chunked_body_is_decoded_and_streamed(h1: H1Transport) -> None:
    release = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"9\r\ndata: 1\n\n\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
            await writer.drain()

    async with Server(chunked) as srv:
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        it = resp.raw_chunks().__aiter__()
        assert await asyncio.wait_for(it.__anext__(), 2) == b"data: 1\n\n"
        assert not resp.ready()  # nothing more yet: a reader needs its timer
        release.set()
        for _ in range(100):
            if resp.ready():
                break
            await asyncio.sleep(0.01)
        assert resp.ready()  # the next read will not wait
        assert b"".join([c async for c in it]) == b"data: 2\n\n"
        await resp.close()
        assert await roundtrip(h1, srv.url()) == (200, b"data: 1\n\ndata: 2\n\n")
    assert srv.connections == 1  # a complete chunked response leaves the connection reusable


async def test_a_body_that_came_with_its_headers_is_buffered_and_one_still_coming_is_not(h1: H1Transport) -> None:
    """``buffered()`` lets a caller skip its read timer: True only once the whole body is here."""
    release = asyncio.Event()

    async def whole_then_split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(ok())  # headers and body in one write
        await writer.drain()
        await srv.read_request(reader)
        writer.write(ok(b'{"ok":"late"}')[:-5])
        await writer.drain()
        await release.wait()
        writer.write(b'ate"}')
        await writer.drain()

    async with Server(whole_then_split) as srv:
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        for _ in range(50):  # the body may come in a read of its own, just after the headers
            if resp.buffered():
                break
            await asyncio.sleep(0.01)
        assert resp.buffered() and await resp.read() == b'{"ok":true}'
        await resp.close()
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        await asyncio.sleep(0.05)
        assert not resp.buffered()
        release.set()
        assert await resp.read() == b'{"ok":"late"}' and resp.buffered()
        await resp.close()


async def test_close_delimited_body(h1: H1Transport) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b" 1}")
        await writer.drain()

    async with Server(until_close) as srv:
        assert await roundtrip(h1, srv.url()) == (200, b'{"a": 1}')
        assert await roundtrip(h1, srv.url()) == (200, b'{"a": 1}')
    assert srv.connections == 2


async def test_http_1_0_and_connection_close_are_honoured(h1: H1Transport) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            if srv.connections == 1:
                writer.write(ok(extra="connection: close\r\n"))
            else:
                writer.write(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async with Server(closing) as srv:
        assert await roundtrip(h1, srv.url()) == (200, b'{"ok":true}')
        assert await roundtrip(h1, srv.url()) == (200, b"ok")
        assert await roundtrip(h1, srv.url()) == (200, b"ok")
    assert srv.connections == 3


async def test_a_response_not_fully_read_closes_its_connection(h1: H1Transport) -> None:
    async def long_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            if srv.connections == 1:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10)
            else:
                writer.write(ok())
            await writer.drain()

    async with Server(long_body) as srv:
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        assert await resp.raw_chunks().__anext__() == b"x" * 10
        await resp.close()  # the upstream's work is cancelled by closing the connection
        assert await roundtrip(h1, srv.url()) == (200, b'{"ok":true}')
        await asyncio.sleep(0.05)
    assert srv.connections == 2
    assert srv.closed_by_client == 1


async def test_a_body_cut_short_is_a_stream_error(h1: H1Transport) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()

    async with Server(short) as srv:
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        got = []
        with pytest.raises(UpstreamStreamError) as ei:
            async for c in resp.raw_chunks():
                got.append(c)
        await resp.close()
    assert got == [b"x" * 10]
    assert ei.value.sent is True


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"\x00\x01\x02" * 100])
async def test_a_server_that_sends_garbage(h1: H1Transport, garbage: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(garbage)
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(bad) as srv:
        with pytest.raises(UpstreamBadResponse) as ei:
            await h1.send(req(srv.url()), connect=1, headers_timeout=2)
    assert ei.value.sent is True
    assert ei.value.message == "The provider sent a malformed HTTP response."
    assert ei.value.detail


async def test_garbage_in_a_chunked_body_is_a_stream_error(h1: H1Transport) -> None:
    async def bad_chunk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(bad_chunk) as srv:
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        with pytest.raises(UpstreamStreamError):
            await resp.read()
        await resp.close()


async def test_a_large_stream_read_slowly_is_not_buffered_without_bound(h1: H1Transport) -> None:
    size = 5 * 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode())
        block = b"y" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    async with Server(big) as srv:
        resp = await h1.send(req(srv.url()), connect=1, headers_timeout=2)
        conn = resp._conn  # type: ignore[attr-defined]
        total = 0
        most = 0
        paused = 0
        async for chunk in resp.raw_chunks():
            most = max(most, len(chunk))
            total += len(chunk)
            await asyncio.sleep(0.02)  # a slow reader
            most = max(most, conn.buffered)
            paused += conn.paused
        await resp.close()
    assert total == size
    assert most <= 1024 * 1024
    assert paused  # the socket was not read while the reader lagged (the kernel's buffers then hold the server)


async def test_gzip_body_is_decoded_by_chunks(h1: H1Transport) -> None:
    import gzip

    payload = b'{"choices": []}' * 100

    async def gz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            body = gzip.compress(payload)
            writer.write(f"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: {len(body)}\r\n\r\n"
                         .encode() + body)
            await writer.drain()

    async with Server(gz) as srv:
        assert await roundtrip(h1, srv.url()) == (200, payload)


async def test_connect_refused_and_a_bad_url(h1: H1Transport) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(UpstreamConnectError) as ei:
        await h1.send(req(f"http://127.0.0.1:{port}/v1"), connect=1, headers_timeout=2)
    assert ei.value.sent is False and ei.value.detail and str(port) not in ei.value.message
    with pytest.raises(UpstreamConnectError) as ei:
        await h1.send(req("ftp://example.test/v1"), connect=1, headers_timeout=2)
    assert ei.value.sent is False
    assert h1._pool is not None and h1._pool.open == 0  # no slot leaked


def test_under_uvloop() -> None:
    """The gateway runs on uvloop (whose transports are not asyncio.Transport instances): reuse, chunked bodies,
    pausing and a stale connection there too."""
    uvloop = pytest.importorskip("uvloop")

    async def chunked_big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(32):
                writer.write(b"10000\r\n" + b"z" * 65536 + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            if len(srv.requests) == 2:
                await srv.read_request(reader)  # the third request, on the reused connection: dropped unanswered
                return

    async def main() -> None:
        t = H1Transport(4)
        try:
            async with Server(chunked_big) as srv:
                for _ in range(3):
                    resp = await t.send(req(srv.url()), connect=1, headers_timeout=2)
                    total = 0
                    async for c in resp.raw_chunks():
                        total += len(c)
                        await asyncio.sleep(0.005)
                    await resp.close()
                    assert total == 32 * 65536
            assert srv.connections == 2
            assert [c for c, _, _ in srv.requests] == [1, 1, 1, 2]
        finally:
            await t.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def test_waiting_for_a_slot_is_bounded_by_the_headers_timeout() -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader):
            await release.wait()
            writer.write(ok())

    t = H1Transport(1)
    try:
        async with Server(held) as srv:
            first = asyncio.create_task(roundtrip(t, srv.url()))
            await asyncio.sleep(0.05)
            with pytest.raises(UpstreamConnectError) as ei:
                await t.send(req(srv.url()), connect=1, headers_timeout=0.2)
            assert ei.value.sent is False  # it never left: another deployment may take it
            assert t._pool is not None and not t._pool.waiters
            release.set()
            assert await first == (200, b'{"ok":true}')
            assert await roundtrip(t, srv.url()) == (200, b'{"ok":true}')
        assert srv.connections == 1 and len(srv.requests) == 2
    finally:
        await t.aclose()


def _certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl, which the test command installs)."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_https_verifies_the_server_and_keeps_the_connection_alive(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    async with Server(keep_alive, tls=server_tls) as srv:
        trusting = H1Transport(4, ssl_context=ssl.create_default_context(cafile=str(cert)))
        try:
            assert await roundtrip(trusting, srv.url()) == (200, b'{"ok":true}')
            assert await roundtrip(trusting, srv.url()) == (200, b'{"ok":true}')
            assert srv.connections == 1 and len(srv.requests) == 2
            assert srv.requests[0][1].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        finally:
            await trusting.aclose()
        system = H1Transport(4)  # the system's trust store does not know a self-signed certificate
        try:
            with pytest.raises(UpstreamConnectError) as e:
                await roundtrip(system, srv.url())
            assert "CERTIFICATE_VERIFY_FAILED" in (e.value.detail or "") and not e.value.sent
        finally:
            await system.aclose()
