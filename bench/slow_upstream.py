"""The slow fake upstream of ``bench/run.py slow``: the nginx upstream's 52-event stream (bench/upstream.py), paced
at one event per stream every 20 ms (nginx cannot sleep between events). One timer tick writes the next event of
every open stream, so a thousand streams cost one wake-up per tick, not a thousand sleeps. A minimal HTTP/1.1 server
on asyncio (keep-alive, Content-Length bodies, chunked answers); a non-stream request gets the JSON answer at once.

    python bench/slow_upstream.py --port 9001 [--interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import re

from upstream import json_answer, models_answer, sse_events  # bench/ is the script's folder, first on sys.path

STREAM = re.compile(rb'"stream"\s*:\s*true')
EVENTS = [e.encode() for e in sse_events()]
CHUNKS = [b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS] + [b"0\r\n\r\n"]
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def whole(body: str, ctype: str) -> bytes:
    data = body.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (ctype.encode(), len(data), data)


JSON = whole(json_answer(), "application/json")
MODELS = whole(models_answer(), "application/json")
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class Pacer:
    """The open streams and the next event each one is owed; ``tick`` writes one event to each."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.streams: dict[asyncio.Transport, int] = {}

    def add(self, transport: asyncio.Transport) -> None:
        transport.write(SSE_HEAD)
        self.streams[transport] = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(next_at - loop.time(), 0))
            for t, i in list(self.streams.items()):
                if t.is_closing():
                    del self.streams[t]
                    continue
                t.write(CHUNKS[i])
                if i + 1 == len(CHUNKS):
                    del self.streams[t]
                else:
                    self.streams[t] = i + 1


class Conn(asyncio.Protocol):
    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.buf = b""
        self.head: bytes | None = None
        self.need = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]  # a TCP server's transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head, self.buf = self.buf[:end], self.buf[end + 4:]
                m = re.search(rb"(?im)^content-length:\s*(\d+)", self.head)
                self.need = int(m.group(1)) if m else 0
            if len(self.buf) < self.need:
                return
            body, self.buf = self.buf[:self.need], self.buf[self.need:]
            path = self.head.split(b" ", 2)[1]
            self.head = None
            if path.endswith(b"/chat/completions"):
                if STREAM.search(body):
                    self.pacer.add(self.transport)
                else:
                    self.transport.write(JSON)
            elif path.endswith(b"/models") or path == b"/health":
                self.transport.write(MODELS)
            else:
                self.transport.write(NOT_FOUND)


async def serve(port: int, interval_ms: float) -> None:
    pacer = Pacer(interval_ms / 1000)
    server = await asyncio.get_running_loop().create_server(lambda: Conn(pacer), "127.0.0.1", port, backlog=4096)
    print(f"slow upstream listening on 127.0.0.1:{port}, one event per {interval_ms:g} ms", flush=True)
    async with server:
        await pacer.run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--interval-ms", type=float, default=20.0)
    a = ap.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(a.port, a.interval_ms))
    else:
        uvloop.run(serve(a.port, a.interval_ms))


if __name__ == "__main__":
    main()
