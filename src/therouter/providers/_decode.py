"""Content-encoding, undone by us with memory bounded (a gzip bomb never inflates more than we ask for).

The transports ask upstreams only for what is decoded here (:data:`ACCEPT_ENCODING`) and hand the raw body to a
:class:`ContentDecoder`, which yields the decoded bytes in pieces of at most :data:`PIECE` bytes however small the
compressed input: a caller that stops reading at its limit has never held more than the limit plus one piece.
An encoding we do not decode, or a body that does not decode, is the provider's fault (:class:`UpstreamBadResponse`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from therouter.errors import UpstreamBadResponse

ACCEPT_ENCODING = "gzip, deflate"
PIECE = 64 * 1024
_IDENTITY = ("", "identity")
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def undecodable(what: str) -> UpstreamBadResponse:
    return UpstreamBadResponse("The provider sent a body that could not be decoded.", sent=True, detail=what)


class ContentDecoder:
    """Incremental decoder for one response body: ``feed(raw)`` and, at EOF, ``flush()`` yield decoded pieces."""

    __slots__ = ("_out", "_raw_deflate_tried", "_z", "encoding")

    def __init__(self, content_encoding: str | None) -> None:
        enc = (content_encoding or "").strip().lower()
        if enc not in _IDENTITY and enc not in _WBITS:
            # br, zstd, compress, or stacked codings: we never asked for them (accept-encoding: gzip, deflate)
            raise undecodable(f"unsupported content-encoding {enc[:40]!r}")
        self.encoding = "identity" if enc in _IDENTITY else enc
        self._z = zlib.decompressobj(_WBITS[enc]) if enc in _WBITS else None
        self._raw_deflate_tried = False
        self._out = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._z is None:
            if data:
                yield data
            return
        if self._z.eof:
            return  # bytes after the end of the compressed stream are ignored, never buffered
        while True:
            try:
                out = self._z.decompress(data, PIECE)
            except zlib.error as e:
                if self.encoding == "deflate" and self._out == 0 and not self._raw_deflate_tried:
                    # "deflate" is often sent without its zlib header (raw RFC 1951): try that once, from the start
                    self._raw_deflate_tried = True
                    self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise undecodable(f"{self.encoding} body does not decode: {e}") from None
            self._out += len(out)
            if out:
                yield out
            data = self._z.unconsumed_tail
            if self._z.eof or (not data and len(out) < PIECE):
                return

    def flush(self) -> Iterator[bytes]:
        if self._z is None:
            return
        yield from self.feed(b"")  # output still held back by the piece bound
