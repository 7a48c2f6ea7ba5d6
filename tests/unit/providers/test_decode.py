"""Content-encoding undone by us, with memory bounded; bodies read up to a limit (UpstreamResponse.read / chunks)."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Mapping

import pytest

from therouter.errors import UpstreamBadResponse
from therouter.providers._decode import PIECE, ContentDecoder
from therouter.providers._http import UpstreamResponse

TEXT = b"".join(b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % i for i in range(2000))


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def bomb(size: int, head: bytes = b"") -> bytes:
    """gzip of ``head`` + ``size`` zero bytes, built without ever holding them: ~1000:1."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [c.compress(head)]
    block = b"0" * (1024 * 1024)
    for _ in range(size // len(block)):
        out.append(c.compress(block))
    out.append(c.flush())
    return b"".join(out)


class Body(UpstreamResponse):
    """An in-memory body delivered in reads of ``piece`` bytes."""

    def __init__(self, raw: bytes, headers: Mapping[str, str], piece: int = 4096) -> None:
        self.status = 200
        self.headers = headers
        self.raw = raw
        self.piece = piece
        self.delivered = 0

    async def raw_chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.raw), self.piece):
            self.delivered += len(self.raw[i:i + self.piece])
            yield self.raw[i:i + self.piece]

    async def close(self) -> None:
        pass


def decode_all(dec: ContentDecoder, raw: bytes, piece: int) -> tuple[bytes, int]:
    out, biggest = [], 0
    for i in range(0, len(raw), piece):
        for p in dec.feed(raw[i:i + piece]):
            out.append(p)
            biggest = max(biggest, len(p))
    for p in dec.flush():
        out.append(p)
        biggest = max(biggest, len(p))
    return b"".join(out), biggest


@pytest.mark.parametrize("enc,raw", [
    ("gzip", gzip.compress(TEXT)), ("x-gzip", gzip.compress(TEXT)), ("GZIP", gzip.compress(TEXT)),
    ("deflate", zlib.compress(TEXT)), ("deflate", deflate_raw(TEXT)),  # deflate with and without its zlib header
    ("identity", TEXT), ("", TEXT), (None, TEXT),
])
@pytest.mark.parametrize("piece", [1, 2, 17, 4096, 10**7])
def test_decodes_split_anywhere(enc: str | None, raw: bytes, piece: int) -> None:
    if piece == 1 and len(raw) > 5000:
        piece = 3  # byte by byte through 100 KB of identity is slow for nothing
    out, _ = decode_all(ContentDecoder(enc), raw, piece)
    assert out == TEXT


@pytest.mark.parametrize("piece", [7, 1024, 10**6])
def test_a_bomb_comes_out_in_bounded_pieces(piece: int) -> None:
    raw = bomb(64 * 1024 * 1024)
    assert len(raw) < 200_000
    total, biggest = 0, 0
    dec = ContentDecoder("gzip")
    for i in range(0, len(raw), piece):
        for p in dec.feed(raw[i:i + piece]):
            total += len(p)
            biggest = max(biggest, len(p))
    assert total == 64 * 1024 * 1024
    assert biggest <= PIECE  # however much one compressed read inflates to


@pytest.mark.parametrize("enc", ["br", "zstd", "compress", "gzip, gzip", "gzip, br", "whatever"])
def test_an_encoding_we_do_not_decode_is_a_provider_fault(enc: str) -> None:
    with pytest.raises(UpstreamBadResponse) as ei:
        ContentDecoder(enc)
    assert ei.value.fallback_ok is True and enc[:10] in (ei.value.detail or "")


@pytest.mark.parametrize("enc,raw", [("gzip", b"\x1f\x8b\x08garbage-not-gzip" * 10), ("deflate", b"\x00\xffnope" * 9)])
def test_a_body_that_does_not_decode_is_a_provider_fault(enc: str, raw: bytes) -> None:
    with pytest.raises(UpstreamBadResponse):
        decode_all(ContentDecoder(enc), raw, 16)


def test_bytes_after_the_end_of_a_gzip_stream_are_never_buffered() -> None:
    dec = ContentDecoder("gzip")
    out, _ = decode_all(dec, gzip.compress(b"hello") + b"\0" * 100_000, 1000)
    assert out == b"hello"
    assert len(dec._z.unused_data) <= 1000  # type: ignore[union-attr]  # at most the read the stream ended in


# ---- UpstreamResponse.read(limit) ----------------------------------------------------------------------------------


async def test_read_returns_the_decoded_body() -> None:
    assert await Body(gzip.compress(TEXT), {"content-encoding": "gzip"}).read(len(TEXT)) == TEXT
    assert await Body(TEXT, {}).read(len(TEXT)) == TEXT


async def test_read_over_the_limit_is_a_provider_fault() -> None:
    body = Body(TEXT, {})
    with pytest.raises(UpstreamBadResponse) as ei:
        await body.read(len(TEXT) - 1)
    assert ei.value.code == "upstream_response_too_large" and ei.value.fallback_ok
    assert body.delivered <= len(TEXT)


async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    body = Body(TEXT, {"content-length": str(len(TEXT))})
    with pytest.raises(UpstreamBadResponse):
        await body.read(100)
    assert body.delivered == 0


async def test_a_gzip_bomb_never_inflates_past_the_limit_in_memory() -> None:
    limit = 2 * 1024 * 1024
    raw = bomb(256 * 1024 * 1024, head=b'{"choices":[{"message":{"content":"')
    body = Body(raw, {"content-encoding": "gzip", "content-length": str(len(raw))}, piece=65536)
    tracemalloc.start()
    try:
        with pytest.raises(UpstreamBadResponse) as ei:
            await body.read(limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ei.value.code == "upstream_response_too_large"
    assert peak < limit + 4 * PIECE + 1024 * 1024  # the limit, a piece, a read, bookkeeping: never 256 MB
    assert body.delivered < len(raw)  # stopped reading at the limit


async def test_chunks_of_a_compressed_stream_are_bounded() -> None:
    raw = bomb(32 * 1024 * 1024, head=b"data: ")
    sizes = [len(c) async for c in Body(raw, {"content-encoding": "gzip"}, piece=len(raw)).chunks()]
    assert sum(sizes) == 32 * 1024 * 1024 + 6 and max(sizes) <= PIECE
