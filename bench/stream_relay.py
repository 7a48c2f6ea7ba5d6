"""CPU cost of relaying one upstream stream to a client, in-process (no sockets, no other load to blur it).

    .venv/bin/python bench/stream_relay.py [--events 52] [--streams 2000]

A DeepSeek-shaped stream of ``--events`` data events (a role chunk, content deltas with ASCII and non-ASCII text, a
finish chunk with usage), arriving in network reads of 4 events, goes through the gateway's per-event work (SSE
decoding, then the rewrite) two ways, in one interleaved run:

- ``parse+rewrite``: decoded line by line, every event parsed, in-band-error checked and rewritten in full (how
  every event was handled before);
- ``relay``: decoded a whole event at a time where it can be (:meth:`SSEDecoder.feed`), and
  :meth:`ChunkRewriter.relay`, which passes an event that only changes the text of one already seen through as
  bytes (and parses the rest).

It prints microseconds of CPU per stream and per event for each, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import orjson

from therouter.config import ProviderConfig
from therouter.providers import (
    Provider,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    build_provider,
)
from therouter.sse import SSEDecoder
from therouter.streaming import ChunkRewriter


class _NoTransport(Transport):
    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        pass


def events(n: int) -> list[bytes]:
    def chunk(delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
        return orjson.dumps({"id": "8f3c0b7a-52d1-4e0f-9a77-3c1d2e4f5a6b", "object": "chat.completion.chunk",
                             "created": 1764316800, "model": "deepseek-chat", "system_fingerprint": "fp_1234",
                             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                             "usage": usage})
    words = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " café", " 東京", "."]
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": words[i % len(words)]}) for i in range(n - 2)]
    out.append(chunk({"content": ""}, "stop", {"prompt_tokens": 12, "completion_tokens": n - 2,
                                                "total_tokens": n + 10}))
    return out


def rewriter(p: Provider) -> ChunkRewriter:
    return ChunkRewriter(p, gen_id="chatcmpl-0123456789abcdef", model="deepseek/deepseek-v3.2", created=1764316800,
                         object_="chat.completion.chunk", include_usage=True)


def reads(evs: list[bytes]) -> list[bytes]:
    wire = [b"data: " + e + b"\n\n" for e in evs] + [b"data: [DONE]\n\n"]
    return [b"".join(wire[i:i + 4]) for i in range(0, len(wire), 4)]


def full(p: Provider, wire: list[bytes]) -> int:
    rw, dec, n = rewriter(p), SSEDecoder(1 << 20), 0
    for read in wire:
        for e in dec._lines(read):  # the line-by-line decoder every read went through before
            if e == b"[DONE]":
                break
            obj = orjson.loads(e)
            if p.in_band_error(obj) is None:
                n += len(rw.rewrite(obj) or b"")
    return n


def relay(p: Provider, wire: list[bytes]) -> int:
    rw, dec, n = rewriter(p), SSEDecoder(1 << 20), 0
    for read in wire:
        for e in dec.feed(read):
            if e == b"[DONE]":
                break
            n += len(rw.relay(e) or b"")
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=52)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    p = build_provider("deepseek", ProviderConfig(kind="deepseek", base_url="http://up.test/v1"), _NoTransport())
    evs = reads(events(a.events))
    assert full(p, evs) == relay(p, evs) > 0
    best = {"parse+rewrite": float("inf"), "relay": float("inf")}
    for _ in range(a.rounds):  # interleaved; the best round of each is the least disturbed
        for name, fn in (("parse+rewrite", full), ("relay", relay)):
            t = time.process_time()
            for _ in range(a.streams):
                fn(p, evs)
            best[name] = min(best[name], (time.process_time() - t) / a.streams)
    print(f"{a.events}-event streams, best of {a.rounds} rounds of {a.streams}")
    for name, s in best.items():
        print(f"{name:<14} {s * 1e6:8.1f} us/stream {s * 1e6 / a.events:6.2f} us/event")
    print(f"relay / parse+rewrite: {best['relay'] / best['parse+rewrite']:.2f}")


if __name__ == "__main__":
    main()
