"""CPU cost of one upstream read of a stream, in-process: the benchmark's own 52-event stream (bench/upstream.py's
bytes, which the gateway receives in ONE read) through the gateway's per-read work.

    nice -n 19 .venv/bin/python bench/stream_read.py [--rounds 7] [--number 2000]

- ``stream``: the whole answer as one read: :class:`UpstreamEvents` cuts it (``SSEDecoder.feed_list``), the first-chunk
  gate relays the role chunk, then ``take_ready`` + ``ChunkRewriter.relay_many`` the rest (the first content chunk
  teaches the template, the 49 after it and the finish chunk follow);
- ``read``: a read of 50 content events for a rewriter that knows the template (a later read of a long stream):
  ``feed_list`` + ``relay_many``.

Only interfaces that predate the per-read rewrite are used, so ``PYTHONPATH=<an older checkout>/src`` times the code
before it. Prints the best of ``--rounds`` in microseconds per read.
"""

from __future__ import annotations

import argparse
import asyncio
import timeit
from collections.abc import AsyncIterator, Mapping

import upstream  # bench/upstream.py (this script's folder is the first on sys.path): the fake upstream's bytes
from therouter.config import ProviderConfig
from therouter.providers import Provider, Transport, UpstreamRequest, UpstreamResponse, build_provider
from therouter.sse import SSEDecoder
from therouter.streaming import ChunkRewriter, UpstreamEvents


class _NoTransport(Transport):
    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        pass


class _Once:
    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        body, self.body = self.body, None
        if body is None:
            raise StopAsyncIteration
        return body


class _OneRead(UpstreamResponse):
    def __init__(self, body: bytes) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {}
        self.body = body

    def raw_chunks(self) -> AsyncIterator[bytes]:
        return _Once(self.body)  # (not an async generator: none is left for the loop to finalise)

    async def close(self) -> None:
        pass


def rewriter(p: Provider) -> ChunkRewriter:
    return ChunkRewriter(p, gen_id="gen-0123456789abcdef", model="deepseek/deepseek-v3.2", created=1764316800,
                         object_="chat.completion.chunk", include_usage=True)


async def stream(p: Provider, body: bytes) -> bytes:
    events = UpstreamEvents(_OneRead(body), first_token=30, idle=30, total=600)
    rw = rewriter(p)
    first = rw.relay(await events.next_payload())  # the gate: the role chunk
    assert first is not None
    out = [first]
    rw.relay_many(events.take_ready(), out)
    assert events.saw_done
    await events._chunks.aclose()  # type: ignore[attr-defined]  # (the body generator, left at [DONE])
    return b"".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=2000)
    a = ap.parse_args()
    p = build_provider("deepseek", ProviderConfig(kind="deepseek", base_url="http://up.test/v1"), _NoTransport())
    body = upstream.sse_answer().encode()
    payloads = SSEDecoder().feed_list(body)
    learnt = rewriter(p)
    learnt.relay(payloads[1])
    read = b"".join(b"data: " + e + b"\n\n" for e in payloads[1:51])

    def one_read() -> list[bytes]:
        out: list[bytes] = []
        learnt.relay_many(SSEDecoder(1 << 20).feed_list(read), out)
        return out

    loop = asyncio.new_event_loop()

    async def streams() -> None:
        for _ in range(a.number):
            await stream(p, body)

    results = {
        "stream": min(timeit.repeat(lambda: loop.run_until_complete(streams()), number=1, repeat=a.rounds)),
        "read": min(timeit.repeat(one_read, number=a.number, repeat=a.rounds)),
    }
    loop.close()
    print(f"{len(body)}-byte stream of 52 events + [DONE] in one read; a {len(read)}-byte read of 50 content events")
    for name, s in results.items():
        print(f"{name:<7} {s / a.number * 1e6:7.1f} us/read")


if __name__ == "__main__":
    main()
