"""UpstreamEvents (clocks that count data events only) and ChunkRewriter (what each client chunk looks like)."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Mapping
from itertools import pairwise
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from therouter.config import ProviderConfig
from therouter.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout
from therouter.providers import (
    Provider,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    build_provider,
)
from therouter.sse import SSEDecoder
from therouter.streaming import ChunkRewriter, InBandError, UpstreamEvents, _Template


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedResponse(UpstreamResponse):
    """chunks() yields scripted bytes; each step first advances the fake clock and/or really sleeps."""

    def __init__(self, script: list[tuple[float, bytes]], clock: FakeClock | None = None, real: bool = False,
                 then_hang: bool = False) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {}
        self.script = script
        self.clock = clock
        self.real = real
        self.then_hang = then_hang
        self.closed = False
        self.sent = 0

    async def raw_chunks(self) -> AsyncIterator[bytes]:
        for delay, data in self.script:
            if self.real:
                await asyncio.sleep(delay)
            elif self.clock is not None:
                self.clock.now += delay
            self.sent += 1
            yield data
        if self.then_hang:
            await asyncio.sleep(30)

    async def close(self) -> None:
        self.closed = True


def ev(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNK = {"id": "u1", "object": "chat.completion.chunk", "created": 1, "model": "up",
         "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}


async def drain(events: UpstreamEvents) -> list[dict]:
    return [o async for o in events]


# ---- UpstreamEvents: clocks -----------------------------------------------------------------------------------------


async def test_keepalives_alone_do_not_arm_first_token_clock() -> None:
    clock = FakeClock()
    resp = ScriptedResponse([(10, b": keep-alive\n\n")] * 20, clock)  # 200 s of keep-alives
    events = UpstreamEvents(resp, first_token=25, idle=5, total=1000, clock=clock)
    with pytest.raises(UpstreamTimeout) as ei:
        await drain(events)
    assert ei.value.code == "first_token_timeout"
    assert events.events == 0
    assert clock.now - 1000 <= 40  # it stopped right after the deadline, not after all 200 s
    await events.aclose()
    assert resp.closed


async def test_keepalives_and_blank_lines_alone_time_out_in_real_time() -> None:
    resp = ScriptedResponse([(0.03, b": keep-alive\n\n\n\n")] * 40, real=True)  # 1.2 s of keep-alives
    events = UpstreamEvents(resp, first_token=0.2, idle=5, total=30)
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout) as ei:
        await drain(events)
    assert ei.value.code == "first_token_timeout"
    assert 0.15 <= time.monotonic() - t0 < 0.6


async def test_data_after_keepalives_within_the_deadline_is_fine() -> None:
    clock = FakeClock()
    resp = ScriptedResponse([(10, b": keep-alive\n\n"), (10, b": keep-alive\n\n"), (4, ev(CHUNK)),
                             (1, b"data: [DONE]\n\n")], clock)
    events = UpstreamEvents(resp, first_token=25, idle=5, total=1000, clock=clock)
    got = await drain(events)
    assert got == [CHUNK]
    assert events.saw_done is True and events.events == 1


async def test_idle_timeout_after_content() -> None:
    clock = FakeClock()
    resp = ScriptedResponse([(1, ev(CHUNK))] + [(2, b": keep-alive\n\n")] * 10, clock)
    events = UpstreamEvents(resp, first_token=25, idle=5, total=1000, clock=clock)
    got = []
    with pytest.raises(UpstreamTimeout) as ei:
        async for o in events:
            got.append(o)
    assert got == [CHUNK]
    assert ei.value.code == "stream_idle_timeout"
    assert clock.now - 1000 <= 1 + 5 + 2  # the keep-alives did not extend it


async def test_idle_timeout_after_content_in_real_time() -> None:
    resp = ScriptedResponse([(0, ev(CHUNK))], real=True, then_hang=True)
    events = UpstreamEvents(resp, first_token=5, idle=0.2, total=30)
    assert await events.__anext__() == CHUNK
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout) as ei:
        await events.__anext__()
    assert ei.value.code == "stream_idle_timeout"
    assert 0.15 <= time.monotonic() - t0 < 0.6


async def test_each_data_event_re_arms_the_idle_clock() -> None:
    clock = FakeClock()
    resp = ScriptedResponse([(4, ev(CHUNK))] * 10 + [(0, b"data: [DONE]\n\n")], clock)
    events = UpstreamEvents(resp, first_token=5, idle=5, total=1000, clock=clock)
    assert len(await drain(events)) == 10  # 40 s in total, never 5 s without data
    assert events.saw_done


async def test_total_cap() -> None:
    clock = FakeClock()
    resp = ScriptedResponse([(1, ev(CHUNK))] * 100, clock)
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10, clock=clock)
    got = []
    with pytest.raises(UpstreamTimeout) as ei:
        async for o in events:
            got.append(o)
    assert ei.value.code == "stream_time_cap"
    assert 8 <= len(got) <= 10
    assert clock.now - 1000 <= 11


async def test_total_cap_shorter_than_first_token() -> None:
    clock = FakeClock()
    resp = ScriptedResponse([(3, b": keep-alive\n\n")] * 10, clock)
    events = UpstreamEvents(resp, first_token=60, idle=60, total=5, clock=clock)
    with pytest.raises(UpstreamTimeout) as ei:
        await drain(events)
    assert ei.value.code == "stream_time_cap"


# ---- UpstreamEvents: content ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,code", [
    (b"data: {\"choices\": [\n\n", "malformed_stream_event"),
    (b"data: not json\n\n", "malformed_stream_event"),
    (b"data:\n\n", "malformed_stream_event"),
    (b"data: [1, 2]\n\n", "bad_upstream_response"),  # JSON, but not an object: the wrong shape
    (b"data: []\n\n", "bad_upstream_response"),
    (b"data: \"str\"\n\n", "bad_upstream_response"),
    (b"data: 5\n\n", "bad_upstream_response"),
    (b"data: null\n\n", "bad_upstream_response"),
])
async def test_malformed_event(bad: bytes, code: str) -> None:
    """What is not a usable event is the provider's fault (falls back before the first byte, recorded as
    upstream_error after it), never a TypeError downstream."""
    resp = ScriptedResponse([(0, ev(CHUNK)), (0, bad), (0, b"data: [DONE]\n\n")])
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10)
    assert await events.__anext__() == CHUNK
    with pytest.raises(UpstreamBadResponse) as ei:
        await events.__anext__()
    assert ei.value.code == code
    assert ei.value.sent is True and ei.value.fallback_ok is True


async def test_eof_without_done() -> None:
    resp = ScriptedResponse([(0, ev(CHUNK)), (0, ev(CHUNK))])
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10)
    assert await drain(events) == [CHUNK, CHUNK]
    assert events.saw_done is False


async def test_eof_flushes_a_last_event_without_blank_line() -> None:
    resp = ScriptedResponse([(0, ev(CHUNK)), (0, b"data: " + orjson.dumps({"choices": [], "n": 2}))])
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10)
    assert await drain(events) == [CHUNK, {"choices": [], "n": 2}]
    assert events.saw_done is False


async def test_done_ends_the_stream_and_later_data_is_ignored() -> None:
    raw = ev(CHUNK) + b"data: [DONE]\n\n" + ev({"late": True})
    resp = ScriptedResponse([(0, raw[:7]), (0, raw[7:50]), (0, raw[50:])])  # events split across reads
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10)
    assert await drain(events) == [CHUNK]
    assert events.saw_done is True
    with pytest.raises(StopAsyncIteration):
        await events.__anext__()


async def test_crlf_stream_with_comments() -> None:
    raw = (b": keep-alive\r\n\r\n" + ev(CHUNK).replace(b"\n", b"\r\n") + b"\r\n" + b"data: [DONE]\r\n\r\n")
    resp = ScriptedResponse([(0, raw[i:i + 5]) for i in range(0, len(raw), 5)])
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10)
    assert await drain(events) == [CHUNK]
    assert events.saw_done


# ---- ChunkRewriter --------------------------------------------------------------------------------------------------


class _NoTransport(Transport):
    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        pass


def provider(kind: str = "deepseek", name: str = "ds-main") -> Provider:
    return build_provider(name, ProviderConfig(kind=kind, base_url="http://up.test"), _NoTransport())


def rewriter(kind: str = "deepseek", include_usage: bool = False, object_: str = "chat.completion.chunk",
             name: str = "ds-main") -> ChunkRewriter:
    return ChunkRewriter(provider(kind, name), gen_id="gen-abc", model="public-model", created=1764316800,
                         object_=object_, include_usage=include_usage)


def chunk(delta: dict, finish: str | None = None, **kw: Any) -> dict:
    obj = {"id": "6f1c2b9e-uuid", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-v4-flash",
           "system_fingerprint": "fp_x", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}]}
    obj.update(kw)
    return obj


def parse(out: bytes | None) -> dict:
    assert out is not None
    assert out.startswith(b"data: ") and out.endswith(b"\n\n") and out.count(b"\n") == 2
    return orjson.loads(out[6:])


DS_USAGE = {"prompt_tokens": 11, "completion_tokens": 42, "total_tokens": 53, "prompt_tokens_details":
            {"cached_tokens": 0}, "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 11,
            "completion_tokens_details": {"reasoning_tokens": 38}}


@pytest.mark.parametrize("include_usage", [False, True])
def test_deepseek_usage_on_last_choice_chunk_is_captured_and_removed(include_usage: bool) -> None:
    rw = rewriter(include_usage=include_usage)
    out = parse(rw.rewrite(chunk({"content": ""}, "stop", usage=dict(DS_USAGE))))
    assert out["choices"][0]["finish_reason"] == "stop"  # the choice itself still goes out
    assert rw.usage_raw == DS_USAGE
    assert rw.finish_reason == "stop"
    if include_usage:
        assert out["usage"] is None  # usage only in the final choices:[] chunk
    else:
        assert "usage" not in out
    u = rw.final_usage(prompt_estimate=999)
    assert (u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.estimated) == (11, 42, 38, False)


def test_usage_only_chunk_returns_none_and_is_kept() -> None:
    rw = rewriter(kind="vllm", include_usage=True)
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert rw.rewrite({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": usage}) is None
    assert rw.rewrite({"usage": usage}) is None  # DeepSeek harness style: no choices key at all
    assert rw.usage_raw == usage


def test_last_non_null_usage_wins() -> None:
    rw = rewriter(kind="vllm")
    rw.rewrite(chunk({"content": "a"}, usage={"prompt_tokens": 5, "completion_tokens": 1}))
    rw.rewrite(chunk({"content": "b"}, usage=None))
    rw.rewrite({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert rw.final_usage(0).completion_tokens == 2


def test_identity_rewritten_on_every_chunk() -> None:
    rw = rewriter(name="deepseek-eu")
    outs = [parse(rw.rewrite(chunk({"role": "assistant", "content": ""}))),
            parse(rw.rewrite(chunk({"content": "Paris"}, id="other-id", model="other", created=5))),
            parse(rw.rewrite(chunk({}, "stop")))]
    for o in outs:
        assert o["id"] == "gen-abc"
        assert o["model"] == "public-model"
        assert o["created"] == 1764316800
        assert o["object"] == "chat.completion.chunk"
        assert o["provider"] == "deepseek-eu"
        assert "usage" not in o
    assert outs[1]["choices"][0]["delta"] == {"content": "Paris"}
    assert outs[0]["system_fingerprint"] == "fp_x"  # other fields pass


def test_usage_null_only_when_include_usage() -> None:
    on, off = rewriter(include_usage=True), rewriter(include_usage=False)
    for c in (chunk({"content": "a"}), chunk({"content": "b"}, usage=None)):
        assert parse(on.rewrite(dict(c)))["usage"] is None
        assert "usage" not in parse(off.rewrite(dict(c)))


def test_vllm_reasoning_reaches_the_client_as_reasoning_content() -> None:
    rw = rewriter(kind="vllm")
    out = parse(rw.rewrite(chunk({"reasoning": "thinking..."})))
    assert out["choices"][0]["delta"] == {"reasoning_content": "thinking..."}
    assert rw.chars == len("thinking...")


def test_final_usage_estimates_from_produced_chars() -> None:
    rw = rewriter()
    rw.rewrite(chunk({"reasoning_content": "abcd"}))  # 4
    rw.rewrite(chunk({"content": "efghij"}))  # 6
    rw.rewrite(chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                       "function": {"name": "fn", "arguments": ""}}]}))  # 2
    rw.rewrite(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":1}"}}]}))  # 7
    assert rw.chars == 19
    u = rw.final_usage(prompt_estimate=123)
    assert u.estimated is True
    assert u.prompt_tokens == 123
    assert u.completion_tokens == 5  # ceil(19 / 4)
    assert u.to_openai()["estimated"] is True


def test_final_usage_with_nothing_produced() -> None:
    u = rewriter().final_usage(prompt_estimate=7)
    assert (u.prompt_tokens, u.completion_tokens, u.estimated) == (7, 0, True)


def test_text_completion_chunks() -> None:
    rw = rewriter(kind="vllm", object_="text_completion", include_usage=True)
    out = parse(rw.rewrite({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                            "choices": [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": None}]}))
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "hello" and "delta" not in out["choices"][0]
    assert rw.chars == 5


def test_usage_event_is_openai_shaped() -> None:
    rw = rewriter(include_usage=True)
    rw.rewrite(chunk({"content": ""}, "stop", usage=dict(DS_USAGE)))
    u = rw.final_usage(0)
    obj = parse(rw.usage_event(u, {"cost": {"total": "0.0001"}}))
    assert obj["choices"] == []
    assert obj["id"] == "gen-abc" and obj["model"] == "public-model" and obj["provider"] == "ds-main"
    usage = obj["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] == 53
    assert usage["prompt_cache_miss_tokens"] == 11  # DeepSeek originals kept
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 38
    assert usage["cost"] == {"total": "0.0001"}


# ---- UpstreamEvents: bounded events ---------------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1000, 65536])
async def test_an_oversized_event_is_a_provider_fault(piece: int) -> None:
    huge = b"data: " + orjson.dumps({"choices": [{"delta": {"content": "A" * 300_000}}]}) + b"\n\n"
    resp = ScriptedResponse([(0, ev(CHUNK))] + [(0, huge[i:i + piece]) for i in range(0, len(huge), piece)])
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10, max_event_bytes=100_000)
    assert await events.__anext__() == CHUNK
    with pytest.raises(UpstreamBadResponse) as ei:
        await events.__anext__()
    assert ei.value.code == "upstream_event_too_large" and ei.value.fallback_ok
    assert resp.sent * piece <= 100_000 + 2 * piece + len(ev(CHUNK))  # it stopped reading at the limit


async def test_a_gzip_stream_is_decoded_and_its_events_bounded() -> None:
    raw = gzip.compress(ev(CHUNK) + b"data: [DONE]\n\n")
    resp = ScriptedResponse([(0, raw[:10]), (0, raw[10:])])
    resp.headers = {"content-encoding": "gzip"}
    events = UpstreamEvents(resp, first_token=5, idle=5, total=10)
    assert await drain(events) == [CHUNK] and events.saw_done
    line = gzip.compress(b"data: " + b"x" * 5_000_000)  # a compressed line that inflates past the limit
    resp = ScriptedResponse([(0, line)])
    resp.headers = {"content-encoding": "gzip"}
    with pytest.raises(UpstreamBadResponse) as ei:
        await drain(UpstreamEvents(resp, first_token=5, idle=5, total=10, max_event_bytes=1024 * 1024))
    assert ei.value.code == "upstream_event_too_large"


# ---- ChunkRewriter.relay: plain chunks relayed as bytes -------------------------------------------------------------

TEXTS = ["Hello", " wor\"ld", "\n\ttab", " café", " 東京", " emoji 🎉", "", "back\\slash", " \u2028sep", "</script>"]


def both(kind: str = "deepseek", include_usage: bool = False, exclude: bool = False,
         object_: str = "chat.completion.chunk") -> tuple[ChunkRewriter, ChunkRewriter]:
    def one() -> ChunkRewriter:
        return ChunkRewriter(provider(kind), gen_id="gen-abc", model="public-model", created=1764316800,
                             object_=object_, include_usage=include_usage, exclude_reasoning=exclude)
    return one(), one()


def relay_equals_rewrite(events: list[bytes], **kw: Any) -> ChunkRewriter:
    """Every event relayed (bytes) is the event the full rewrite makes, and the metering state is the same."""
    fast, full = both(**kw)
    for e in events:
        a, b = fast.relay(e), full.rewrite(orjson.loads(e))
        assert (a is None) == (b is None), e
        if a is not None:
            assert b is not None and parse(a) == parse(b), e
    assert (fast.chars, fast.usage_raw, fast.finish_reason) == (full.chars, full.usage_raw, full.finish_reason)
    return fast


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("kind", ["deepseek", "vllm", "sglang", "openai"])
def test_relay_sends_what_the_full_rewrite_sends(kind: str, include_usage: bool) -> None:
    events = [orjson.dumps(chunk({"role": "assistant", "content": ""}))]
    events += [orjson.dumps(chunk({"reasoning_content": t})) for t in TEXTS[:3]]
    events += [orjson.dumps(chunk({"content": t})) for t in TEXTS]
    events += [orjson.dumps(chunk({"content": ""}, "stop", usage=dict(DS_USAGE)))]
    rw = relay_equals_rewrite(events, kind=kind, include_usage=include_usage)
    assert set(rw._templates) == {"content", "reasoning_content"}  # the plain events went through as bytes


def test_relay_of_text_completion_chunks() -> None:
    def ev(text: str, finish: str | None = None) -> bytes:
        return orjson.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})
    rw = relay_equals_rewrite([ev(t) for t in TEXTS] + [ev("", "length")], kind="vllm", object_="text_completion")
    assert "text" in rw._templates


def test_relay_with_reasoning_excluded_still_counts_it() -> None:
    events = [orjson.dumps(chunk({"reasoning_content": t})) for t in TEXTS]
    events += [orjson.dumps(chunk({"content": t})) for t in TEXTS]
    rw = relay_equals_rewrite(events, exclude=True)
    assert set(rw._templates) == {"content"}


def test_relay_with_vllm_reasoning_translates_it() -> None:
    events = [orjson.dumps(chunk({"reasoning": t})) for t in TEXTS] + [orjson.dumps(chunk({"content": "x"}))] * 3
    relay_equals_rewrite(events, kind="vllm")


def test_relay_of_events_that_differ_elsewhere() -> None:
    """An event that matches a template's head and tail but is not one JSON string in between is parsed: extra keys
    spliced in, another id or model, logprobs, a tool call: all get the full rewrite."""
    base = orjson.dumps(chunk({"content": "seed"}))
    head, tail = base.split(b'"seed"')
    events = [base, head + b'"a","refusal":null' + tail,
              orjson.dumps(chunk({"content": "x"}, id="other")), orjson.dumps(chunk({"content": "x"}, model="o")),
              orjson.dumps({**chunk({"content": "lp"}), "choices": [{"index": 0, "delta": {"content": "lp"},
                                                                      "logprobs": {"content": []},
                                                                      "finish_reason": None}]}),
              orjson.dumps(chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                                  "function": {"name": "f", "arguments": "{}"}}]})),
              base]
    relay_equals_rewrite(events)


@pytest.mark.parametrize("middle", [b'bad\\', b'a"b', b"\x01", b'\\x41'])
def test_relay_never_forwards_an_event_that_is_not_json(middle: bytes) -> None:
    rw = rewriter()
    base = orjson.dumps(chunk({"content": "seed"}))
    assert rw.relay(base) is not None and rw._templates
    head, tail = base.split(b"seed")
    with pytest.raises(UpstreamBadResponse):
        rw.relay(head + middle + tail)


def test_relay_of_an_in_band_error() -> None:
    rw = rewriter()
    rw.relay(orjson.dumps(chunk({"content": "seed"})))
    with pytest.raises(InBandError) as ei:
        rw.relay(orjson.dumps({"error": {"message": "overloaded", "code": 503}}))
    assert ei.value.error.status == 502 and "overloaded" in (ei.value.error.detail or "")


def many_equals_one_by_one(events: list[bytes], reads: int = 1, **kw: Any) -> ChunkRewriter:
    """relay_many over the events cut into ``reads`` upstream reads sends the same bytes, and keeps the same metering
    state, as relay() one event at a time."""
    fast, slow = both(**kw)
    out: list[bytes] = []
    size = max(len(events) // reads, 1)
    for k in range(0, len(events), size):
        fast.relay_many(events[k:k + size], out)
    one = [b for b in (slow.relay(e) for e in events) if b]
    assert b"".join(out) == b"".join(one)
    assert (fast.chars, fast.usage_raw, fast.finish_reason) == (slow.chars, slow.usage_raw, slow.finish_reason)
    return fast


@pytest.mark.parametrize("reads", [1, 3, 7])
@pytest.mark.parametrize("kind", ["deepseek", "vllm", "sglang"])
def test_relay_many_sends_what_relay_sends(kind: str, reads: int) -> None:
    events = [orjson.dumps(chunk({"role": "assistant", "content": ""}))]
    events += [orjson.dumps(chunk({"reasoning_content": t})) for t in TEXTS[:3]]
    events += [orjson.dumps(chunk({"content": t})) for t in TEXTS * 3]
    events += [orjson.dumps(chunk({"content": t})) for t in ('say "hi"', "back\\", "tab\there", "é\u2028", "\\\\")]
    events += [orjson.dumps(chunk({"content": t})) for t in TEXTS]
    events += [orjson.dumps(chunk({"content": ""}, "stop", usage=dict(DS_USAGE)))]
    many_equals_one_by_one(events, reads, kind=kind, include_usage=True)


def test_relay_many_never_lets_a_text_splice_json_in() -> None:
    base = orjson.dumps(chunk({"content": "seed"}))
    head, tail = base.split(b'"seed"')
    plain = [orjson.dumps(chunk({"content": t})) for t in TEXTS]
    spliced = [head + b'"a","refusal":null' + tail, head + b'"x\\\\","refusal":"y"' + tail,
               head + b'"a\\""' + tail]
    for bad in spliced:
        many_equals_one_by_one([base, *plain, bad, *plain])
        many_equals_one_by_one([base, bad, *plain])


@pytest.mark.parametrize("middle", [b'bad\\', b"\x01", b'\\x41'])
def test_relay_many_stops_at_an_event_that_is_not_json_with_the_ones_before_it_kept(middle: bytes) -> None:
    rw = rewriter()
    base = orjson.dumps(chunk({"content": "seed"}))
    rw.relay(base)
    head, tail = base.split(b"seed")
    plain = [orjson.dumps(chunk({"content": t})) for t in ("a", "b")]
    out: list[bytes] = []
    with pytest.raises(UpstreamBadResponse):
        rw.relay_many([*plain, head + middle + tail, *plain], out)
    sent = b"".join(out).split(b"\n\n")[:-1]
    assert [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in sent] == ["a", "b"]


def test_relay_many_stops_at_an_in_band_error_with_the_ones_before_it_kept() -> None:
    rw = rewriter()
    rw.relay(orjson.dumps(chunk({"content": "seed"})))
    out: list[bytes] = []
    with pytest.raises(InBandError):
        rw.relay_many([orjson.dumps(chunk({"content": "a"})),
                       orjson.dumps({"error": {"message": "boom", "type": "server_error", "code": None}})], out)
    assert b"".join(out).count(b"data: ") == 1 and b'"a"' in out[0]


# ---- relay_many against relay, randomised: any text, any event among them, any cut into reads ----------------------
# A text's raw bytes are drawn from pieces that can make or break a JSON string (quotes, backslashes at either end,
# escapes valid and not, lone surrogates, control characters, invalid UTF-8, JSON punctuation that could splice
# another value in); whatever the event-by-event path does with it -- relay it, parse it in full, refuse it -- the
# read-at-once path must do too: the same bytes, the same error at the same event, the same metering.

_VALID = [b"a", b" ", "\u00e9".encode(), "\u6771".encode(), "\U0001f389".encode(), b"\\\\", b'\\"', b"\\n",
          b"\\t", b"\\/", b"\\b", b"\\u00e9", b"\\ud83c\\udf89", b"\x7f", b",", b"[", b"]", b"{", b"}", b":", b"null"]
_BAD = [b'"', b"\\", b"\\ud800", b"\\udc00", b"\\uD83C", b"\\u12", b"\\x41", b"\n", b"\x01", b"\xff",
        b"\xed\xa0\x80", b'","', b'"]', b'",\n"', b'","refusal":"y', b',"', b'"],"', b'",["']
_PIECES = _VALID + _BAD
_FIELDS = ["content", "reasoning_content"]


def _split(field: str) -> tuple[bytes, bytes]:
    head, tail = orjson.dumps(chunk({field: "SEED"})).split(b"SEED")
    return head, tail


_OTHERS = [orjson.dumps(chunk({"role": "assistant", "content": ""})),
           orjson.dumps(chunk({"content": ""}, "stop")),
           orjson.dumps(chunk({"content": ""}, "stop", usage=dict(DS_USAGE))),
           orjson.dumps(chunk({"content": "x"}, id="other-id")),
           orjson.dumps(chunk({"content": "x", "refusal": None})),
           orjson.dumps({"error": {"message": "boom", "type": "server_error", "code": None}}),
           b"[1]", b"{}", b"not json"]

_event = st.one_of(
    st.tuples(st.just("raw"), st.sampled_from(_FIELDS), st.lists(st.sampled_from(_PIECES), max_size=5)),
    st.tuples(st.just("text"), st.sampled_from(_FIELDS), st.text(max_size=6)),
    st.tuples(st.just("other"), st.sampled_from(range(len(_OTHERS))), st.just(None)),
    st.tuples(st.just("overlap"), st.sampled_from(_FIELDS), st.just(None)),
)


def _payload(ev: tuple[str, Any, Any]) -> bytes:
    kind, a, b = ev
    if kind == "other":
        return _OTHERS[a]
    head, tail = _split(a)
    if kind == "raw":
        return head + b"".join(b) + tail
    if kind == "text":
        return orjson.dumps(chunk({a: b}))
    return head + tail[1:]  # head and tail overlap: the closing quote is the opening one


def _one_by_one(rw: ChunkRewriter, payloads: list[bytes]) -> tuple[bytes, str | None]:
    out: list[bytes] = []
    try:
        for p in payloads:
            b = rw.relay(p)
            if b:
                out.append(b)
    except (GatewayError, InBandError) as e:  # the error, and everything before it
        return b"".join(out), f"{type(e).__name__}: {e}"
    return b"".join(out), None


def _by_reads(rw: ChunkRewriter, reads: list[list[bytes]]) -> tuple[bytes, str | None]:
    out: list[bytes] = []
    try:
        for read in reads:
            rw.relay_many(read, out)
    except (GatewayError, InBandError) as e:
        return b"".join(out), f"{type(e).__name__}: {e}"
    return b"".join(out), None


def assert_reads_relay_as_one_by_one(payloads: list[bytes], cuts: list[int], **kw: Any) -> None:
    fast, slow = both(**kw)
    bounds = [0, *sorted(min(max(c, 0), len(payloads)) for c in cuts), len(payloads)]
    reads = [payloads[a:b] for a, b in pairwise(bounds)]
    assert _by_reads(fast, reads) == _one_by_one(slow, payloads)
    assert (fast.chars, fast.usage_raw, fast.finish_reason) == (slow.chars, slow.usage_raw, slow.finish_reason)


@settings(max_examples=400, deadline=None, database=None)
@given(events=st.lists(_event, max_size=24), cuts=st.lists(st.integers(0, 26), max_size=4),
       kind=st.sampled_from(["deepseek", "vllm"]), include_usage=st.booleans(), exclude=st.booleans(),
       seeds=st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=2))
def test_relay_many_of_any_reads_sends_what_relay_sends(events, cuts, kind, include_usage, exclude, seeds) -> None:
    learn = [orjson.dumps(chunk({f: "seed"})) for f in seeds]  # templates known before the reads (or taught in one)
    assert_reads_relay_as_one_by_one(learn + [_payload(e) for e in events], cuts, kind=kind,
                                     include_usage=include_usage, exclude=exclude)


@settings(max_examples=200, deadline=None, database=None)
@given(texts=st.lists(st.lists(st.sampled_from(_VALID), max_size=4), min_size=1, max_size=30),
       bad=st.sampled_from(_BAD), at=st.integers(0, 29), cuts=st.lists(st.integers(0, 32), max_size=3))
def test_relay_many_finds_one_bad_text_in_a_long_run(texts, bad, at, cuts) -> None:
    """A run of valid texts with one that is not (a lone surrogate, a control character, a spliced value...)
    anywhere in it: sent up to it, then its error (or its full rewrite), the same as one by one."""
    head, tail = _split("content")
    payloads = [orjson.dumps(chunk({"content": "seed"}))]
    payloads += [head + b"".join(t) + tail for t in texts]
    payloads.insert(1 + min(at, len(texts)), head + bad + tail)
    assert_reads_relay_as_one_by_one(payloads, cuts)


def test_relay_many_of_alternating_templates_and_others() -> None:
    """Runs that end at every kind of boundary: another template, a finish, an overlap, an error -- at the start,
    in the middle and at the end of a read."""
    head, tail = _split("content")
    rhead, rtail = _split("reasoning_content")
    c = [head + t + tail for t in (b"a", b"\\\\", b'\\"x', b"\\u00e9", b"")]
    r = [rhead + t + rtail for t in (b"r", b"\\n")]
    finish, overlap = _OTHERS[1], head + tail[1:]
    seqs = [c + r + c, r + c + r, c * 3 + [finish], [finish] + c * 2, c + [overlap] + c, (c[:1] + r[:1]) * 6,
            (c[:2] + [finish]) * 4, c + [_OTHERS[5]] + c]
    for seq in seqs:
        for cut in range(len(seq) + 1):
            assert_reads_relay_as_one_by_one([orjson.dumps(chunk({"content": "seed"})),
                                              orjson.dumps(chunk({"reasoning_content": "seed"})), *seq], [cut + 2])


@pytest.mark.parametrize("texts", [
    [b"a\\", b',"b'],  # a string carried over into the next text: ["a\",","b"] would be two strings
    [b"a\\", b'\n"b'],
    [b'a",["', b"x", b'"],"b'],  # n values again, but one of them an array
    [b'a",{"k":"', b'v"},"b'],
    [b'a","b', b"c\\"],  # one more string in one, one fewer in the next
    [b'a","', b'",\n"b'],
])
def test_relay_many_never_takes_texts_that_only_parse_together(texts: list[bytes]) -> None:
    """Texts that are not valid alone but whose joined run is valid JSON: each goes the one-by-one way (refused or
    parsed in full), whatever read they come in."""
    head, tail = _split("content")
    plain = [head + t + tail for t in (b"x", b"y")]
    payloads = [orjson.dumps(chunk({"content": "seed"})), *plain, *(head + t + tail for t in texts), *plain]
    for cut in range(len(payloads) + 1):
        assert_reads_relay_as_one_by_one(payloads, [cut])


def test_a_read_pays_for_at_most_one_failed_check_of_its_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs cut short again and again (a template event, then another, ... ending with one) cost what they find:
    after one whole-rest check fails, the read's later runs are found event by event (in C), never the rest again."""
    checks: list[int] = []
    whole = _Template.whole

    def counted(self: _Template, run: list[bytes]) -> list[bytes] | None:
        checks.append(len(run))
        return whole(self, run)

    monkeypatch.setattr(_Template, "whole", counted)
    head, tail = _split("content")
    a, finish = head + b"a" + tail, _OTHERS[1]
    rw = rewriter()
    rw.relay(orjson.dumps(chunk({"content": "seed"})))
    out: list[bytes] = []
    rw.relay_many([a, finish] * 200 + [a], out)
    assert len(checks) <= 1 and b"".join(out).count(b"data: ") == 401


# ---- a whole stream, cut into reads anywhere: what the client gets is what one-by-one decoding and relaying gives ----

def _stream_bytes(eol: bytes) -> bytes:
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"reasoning_content": t}) for t in TEXTS[:3]]
    events += [chunk({"content": t}) for t in [*TEXTS, 'say "hi"', "back\\", "\\\\", "é\u2028", "🎉"]]
    events += [chunk({"content": ""}, "stop", usage=dict(DS_USAGE))]
    wire = [b"data: " + orjson.dumps(e) + eol + eol for e in events]
    wire.insert(6, b": keep-alive" + eol + eol)
    return b"".join(wire) + b"data: [DONE]" + eol + eol + b"data: " + orjson.dumps(events[5]) + eol + eol


async def _client_gets(reads: list[bytes]) -> tuple[bytes, int, dict | None]:
    """ClientStream's way: the gate's first event, then each read's events at once (take_ready + relay_many)."""
    events = UpstreamEvents(ScriptedResponse([(0, r) for r in reads]), first_token=30, idle=30, total=600)
    rw = rewriter(include_usage=True)
    out: list[bytes] = []
    try:
        read = [await events.next_payload()]
        while True:
            rw.relay_many([*read, *events.take_ready()], out)
            read = [await events.next_payload()]
    except StopAsyncIteration:
        pass
    assert events.saw_done
    return b"".join(out), rw.chars, rw.usage_raw


def _one_by_one_gets(raw: bytes) -> tuple[bytes, int, dict | None]:
    d = SSEDecoder()
    payloads = [*d.feed(raw), *d.flush()]
    payloads = payloads[:[p.strip() for p in payloads].index(b"[DONE]")]
    rw = rewriter(include_usage=True)
    return b"".join(b for b in map(rw.relay, payloads) if b), rw.chars, rw.usage_raw


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
async def test_a_stream_cut_into_reads_anywhere_gives_the_client_the_same_bytes(eol: bytes) -> None:
    raw = _stream_bytes(eol)
    want = _one_by_one_gets(raw)
    assert await _client_gets([raw]) == want
    step = 1 if eol == b"\n" else 5
    for i in range(0, len(raw) + 1, step):
        assert await _client_gets([raw[:i], raw[i:]]) == want, i
    for i in range(0, len(raw) + 1, 97):
        for j in range(i, len(raw) + 1, 89):
            assert await _client_gets([raw[:i], raw[i:j], raw[j:]]) == want, (i, j)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from([b"{}", b'{"a":1}', b"[DONE]", b" [DONE]", b"[DONE] ", b"\t[DONE]", b"", b"[1]",
                                 b"x", b"|", b"\xff", b"[DONE]x"]), max_size=8))
def test_take_ready_ends_at_the_first_done(payloads: list[bytes]) -> None:
    events = UpstreamEvents(ScriptedResponse([]), first_token=30, idle=30, total=600)
    events._pending.extend(payloads)
    stripped = [p.strip() for p in payloads]
    k = stripped.index(b"[DONE]") if b"[DONE]" in stripped else len(payloads)
    assert events.take_ready() == payloads[:k]
    assert events.saw_done == (k < len(payloads)) and events.events == k
