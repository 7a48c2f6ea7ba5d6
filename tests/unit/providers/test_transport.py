"""The transports: foreign exceptions -> GatewayErrors, no redirects, chunks as they come.

HttpxTransport is driven through respx; AiohttpTransport and H1Transport against tiny real servers on 127.0.0.1 (the
same tests for both: ``real_transport``; H1Transport's own pool and framing tests are in test_transport_h1.py).
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import zlib
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
import pytest_asyncio
import respx
from aiohttp import web

from therouter.errors import UpstreamBadResponse, UpstreamConnectError, UpstreamStreamError, UpstreamTimeout
from therouter.providers._h1 import H1Transport
from therouter.providers._http import AiohttpTransport, HttpxTransport, Transport, UpstreamRequest, make_transport

URL = "http://upstream.test/v1/chat/completions"


def req(url: str = URL, body: bytes = b'{"model":"m"}') -> UpstreamRequest:
    return UpstreamRequest("POST", url, {"content-type": "application/json", "authorization": "Bearer sk-ours"}, body)


@pytest_asyncio.fixture(loop_scope="function")  # the loop the test runs in
async def httpx_transport() -> AsyncIterator[HttpxTransport]:
    t = HttpxTransport()
    yield t
    await t.aclose()


@pytest_asyncio.fixture(loop_scope="function", params=["aiohttp", "h1"])
async def real_transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    """The transports that talk to real sockets: one contract."""
    t = make_transport(request.param, 512)
    yield t
    await t.aclose()


# ---- httpx via respx ------------------------------------------------------------------------------------------------


@respx.mock
async def test_httpx_sends_what_it_was_given(httpx_transport: HttpxTransport) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(200, json={"ok": True}))
    resp = await httpx_transport.send(req(), connect=1, headers_timeout=1)
    assert resp.status == 200
    assert await resp.read() == b'{"ok":true}'
    await resp.close()
    sent = route.calls.last.request
    assert sent.content == b'{"model":"m"}'
    assert sent.headers["authorization"] == "Bearer sk-ours"


@respx.mock
async def test_httpx_connect_error(httpx_transport: HttpxTransport) -> None:
    respx.post(URL).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(UpstreamConnectError) as ei:
        await httpx_transport.send(req(), connect=1, headers_timeout=1)
    assert ei.value.sent is False
    assert ei.value.fallback_ok is True


@respx.mock
async def test_httpx_connect_timeout_is_a_connect_error(httpx_transport: HttpxTransport) -> None:
    respx.post(URL).mock(side_effect=httpx.ConnectTimeout("slow"))
    with pytest.raises(UpstreamConnectError) as ei:
        await httpx_transport.send(req(), connect=1, headers_timeout=1)
    assert ei.value.sent is False


@respx.mock
async def test_httpx_read_timeout_before_headers(httpx_transport: HttpxTransport) -> None:
    respx.post(URL).mock(side_effect=httpx.ReadTimeout("no answer"))
    with pytest.raises(UpstreamTimeout) as ei:
        await httpx_transport.send(req(), connect=1, headers_timeout=1)
    assert ei.value.sent is True  # the request went out: the provider may bill it
    assert ei.value.status == 504


@respx.mock
async def test_httpx_headers_timeout_bounds_a_silent_upstream(httpx_transport: HttpxTransport) -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    respx.post(URL).mock(side_effect=never)
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await httpx_transport.send(req(), connect=1, headers_timeout=0.15)
    assert time.monotonic() - t0 < 1.0


@respx.mock
async def test_httpx_redirects_are_not_followed(httpx_transport: HttpxTransport) -> None:
    respx.post(URL).mock(return_value=httpx.Response(302, headers={"location": "http://elsewhere.test/steal"}))
    elsewhere = respx.route(host="elsewhere.test").mock(return_value=httpx.Response(200))
    resp = await httpx_transport.send(req(), connect=1, headers_timeout=1)
    assert resp.status == 302
    assert resp.headers["location"] == "http://elsewhere.test/steal"
    await resp.close()
    assert not elsewhere.called


@respx.mock
async def test_httpx_stream_chunks_are_delivered_as_they_come(httpx_transport: HttpxTransport) -> None:
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await release.wait()  # the second chunk does not exist until the first was seen downstream
        yield b"data: 2\n\n"

    respx.post(URL).mock(return_value=httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                     content=body()))
    resp = await httpx_transport.send(req(), connect=1, headers_timeout=1)
    it = resp.chunks().__aiter__()
    first = await asyncio.wait_for(it.__anext__(), 1)
    assert first == b"data: 1\n\n"
    release.set()
    rest = [c async for c in it]
    assert b"".join(rest) == b"data: 2\n\n"
    await resp.close()


@respx.mock
async def test_httpx_broken_stream_is_a_stream_error(httpx_transport: HttpxTransport) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise httpx.ReadError("connection reset")

    respx.post(URL).mock(return_value=httpx.Response(200, content=body()))
    resp = await httpx_transport.send(req(), connect=1, headers_timeout=1)
    got = []
    with pytest.raises(UpstreamStreamError) as ei:
        async for c in resp.chunks():
            got.append(c)
    assert got == [b"data: 1\n\n"]
    assert ei.value.sent is True
    await resp.close()


def test_make_transport_kinds() -> None:
    assert isinstance(make_transport("aiohttp", 4), AiohttpTransport)
    assert isinstance(make_transport("h1", 4), H1Transport)
    t = make_transport("httpx", 4)
    assert isinstance(t, HttpxTransport)
    asyncio.run(t.aclose())


# ---- aiohttp against real local servers ----------------------------------------------------------------------------


def free_closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_real_connection_refused(real_transport: Transport) -> None:
    port = free_closed_port()
    t0 = time.monotonic()
    with pytest.raises(UpstreamConnectError) as ei:
        await real_transport.send(req(f"http://127.0.0.1:{port}/v1/chat/completions"), connect=1,
                                     headers_timeout=2)
    assert ei.value.sent is False
    assert time.monotonic() - t0 < 1.0


async def test_real_silent_server_times_out_within_headers_timeout(real_transport: Transport) -> None:
    accepted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()
        await reader.read(65536)  # read the request, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout) as ei:
            await real_transport.send(req(f"http://127.0.0.1:{port}/v1/chat/completions"), connect=1,
                                         headers_timeout=0.3)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 1.0
        assert accepted.is_set()
        assert ei.value.sent is True
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_real_connect_timeout_is_a_connect_error(real_transport: Transport) -> None:
    """A host that never completes the TCP handshake: nothing was sent, so sent is False (not an UpstreamTimeout).

    The listener's accept queue is filled and never drained: Linux then drops further SYNs, so connect() hangs.
    """
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except (TimeoutError, OSError):
            pass
        else:
            pytest.fail("the accept queue did not fill, so no hanging connect could be staged")
        finally:
            probe.close()
        t0 = time.monotonic()
        with pytest.raises(UpstreamConnectError) as ei:
            await real_transport.send(req(f"http://127.0.0.1:{port}/v1/chat/completions"), connect=0.2,
                                         headers_timeout=3)
        assert ei.value.sent is False
        assert time.monotonic() - t0 < 1.5
    finally:
        for s in fillers:
            s.close()
        srv.close()


async def test_aiohttp_connect_timeout_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as above without relying on the kernel: aiohttp's connect timeout is also a TimeoutError subclass."""

    class Session:
        async def request(self, *a: object, **kw: object) -> None:
            raise aiohttp.ServerTimeoutError("Connection timeout to host")

    t = AiohttpTransport()
    monkeypatch.setattr(t, "_get", lambda: Session())
    with pytest.raises(UpstreamConnectError) as ei:
        await t.send(req(), connect=0.1, headers_timeout=1)
    assert ei.value.sent is False


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


async def test_real_redirect_not_followed_and_stream_incremental(real_transport: Transport) -> None:
    release = asyncio.Event()
    seen: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        seen.append("redirect")
        raise web.HTTPFound("/v1/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append("elsewhere")
        return web.Response(text="followed")

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("authorization", ""))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.wait_for(release.wait(), 5)
        await resp.write(b"data: 2\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/redirect", redirect)
    app.router.add_route("*", "/v1/elsewhere", elsewhere)
    app.router.add_post("/v1/stream", stream)
    runner, port = await _serve(app)
    try:
        resp = await real_transport.send(req(f"http://127.0.0.1:{port}/v1/redirect"), connect=1, headers_timeout=2)
        assert resp.status == 302
        assert resp.headers["location"].endswith("/v1/elsewhere")
        await resp.close()
        assert seen == ["redirect"]

        resp = await real_transport.send(req(f"http://127.0.0.1:{port}/v1/stream"), connect=1, headers_timeout=2)
        assert resp.status == 200
        assert seen[-1] == "Bearer sk-ours"
        it = resp.chunks().__aiter__()
        assert await asyncio.wait_for(it.__anext__(), 2) == b"data: 1\n\n"
        release.set()
        assert b"".join([c async for c in it]) == b"data: 2\n\n"
        await resp.close()
    finally:
        await runner.cleanup()


# ---- content-encoding: asked for only what we decode, decoded by us with the body bounded -------------------------


def _gzip_bomb(size: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"0" * (1024 * 1024)
    return b"".join([c.compress(b'{"choices": "'), *(c.compress(block) for _ in range(size // len(block))),
                     c.flush()])


@respx.mock
async def test_httpx_asks_only_for_what_we_decode_and_decodes_it(httpx_transport: HttpxTransport) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(
        200, headers={"content-encoding": "gzip"}, content=gzip.compress(b'{"ok": true}')))
    resp = await httpx_transport.send(req(), connect=1, headers_timeout=1)
    assert await resp.read() == b'{"ok": true}'
    await resp.close()
    assert route.calls.last.request.headers["accept-encoding"] == "gzip, deflate"


@respx.mock
async def test_httpx_gzip_bomb_stops_at_the_limit(httpx_transport: HttpxTransport) -> None:
    respx.post(URL).mock(return_value=httpx.Response(200, headers={"content-encoding": "gzip"},
                                                     content=_gzip_bomb(64 * 1024 * 1024)))
    resp = await httpx_transport.send(req(), connect=1, headers_timeout=1)
    with pytest.raises(UpstreamBadResponse) as ei:
        await resp.read(1024 * 1024)
    assert ei.value.code == "upstream_response_too_large"
    await resp.close()


@respx.mock
async def test_httpx_unknown_encoding_is_a_provider_fault(httpx_transport: HttpxTransport) -> None:
    respx.post(URL).mock(return_value=httpx.Response(200, headers={"content-encoding": "br"}, content=b"\x0b\x02"))
    resp = await httpx_transport.send(req(), connect=1, headers_timeout=1)
    with pytest.raises(UpstreamBadResponse):
        await resp.read()
    await resp.close()


async def test_real_leaves_decoding_to_us(real_transport: Transport) -> None:
    seen: list[str] = []
    body = gzip.compress(b"data: 1\n\n" * 1000)

    async def gz(request: web.Request) -> web.Response:
        seen.append(request.headers.get("accept-encoding", ""))
        return web.Response(body=body, headers={"content-encoding": "gzip", "content-type": "text/event-stream"})

    async def bomb(request: web.Request) -> web.Response:
        return web.Response(body=_gzip_bomb(64 * 1024 * 1024),
                            headers={"content-encoding": "gzip", "content-type": "application/json"})

    app = web.Application()
    app.router.add_post("/v1/gz", gz)
    app.router.add_post("/v1/bomb", bomb)
    runner, port = await _serve(app)
    try:
        r = req(f"http://127.0.0.1:{port}/v1/gz")
        r.headers["accept-encoding"] = "br, zstd"  # whatever a caller put there, we only ask for what we decode
        resp = await real_transport.send(r, connect=1, headers_timeout=2)
        got = [c async for c in resp.chunks()]
        assert b"".join(got) == b"data: 1\n\n" * 1000
        await resp.close()
        assert seen == ["gzip, deflate"]

        resp = await real_transport.send(req(f"http://127.0.0.1:{port}/v1/bomb"), connect=1, headers_timeout=2)
        with pytest.raises(UpstreamBadResponse) as ei:
            await resp.read(1024 * 1024)
        assert ei.value.code == "upstream_response_too_large"
        await resp.close()
    finally:
        await runner.cleanup()


async def test_transport_errors_keep_foreign_text_out_of_the_message(real_transport: Transport) -> None:
    """An OS error names the address it failed on: that goes to detail (log, record), never to message."""
    port = free_closed_port()
    with pytest.raises(UpstreamConnectError) as ei:
        await real_transport.send(req(f"http://127.0.0.1:{port}/v1/chat/completions"), connect=1,
                                     headers_timeout=2)
    assert "127.0.0.1" not in ei.value.message and str(port) not in ei.value.message
    assert ei.value.detail
