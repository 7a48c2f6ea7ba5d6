"""UpstreamEvents (clocks that count data events only) and ChunkRewriter (what each client chunk looks like)."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
import pytest

from therouter.config import ProviderConfig
from therouter.errors import UpstreamBadResponse, UpstreamTimeout
from therouter.providers import (
    Provider,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    build_provider,
)
from therouter.streaming import ChunkRewriter, InBandError, UpstreamEvents


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
