"""Misbehaving upstreams are faults, not crashes (issue 7, point 8), against real processes with the OpenAI SDK.

Wrong-shaped events and bodies, oversized lines and bodies, gzip bombs: before the first byte reached the client the
attempt is a provider fault and the next deployment serves; after it, the client gets one SSE error event and the
record says ``upstream_error``. The gateway's memory stays bounded: its peak resident size (VmHWM) is read before
and after, with generous slack (the limits here are 256 KiB per event and 4 MiB per body, the bombs inflate to
256 MiB).
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.integration.conftest import Fake, Gateway
from tests.integration.upstream_helpers import (
    BODY_LIMIT,
    EVENT_LIMIT,
    MODEL,
    error_event,
    module_fixtures,
    peak_rss_kib,
    provider_report,
    record,
    stream_raw,
)
from therouter.fakeupstream import config as fake_config

HELLO = [{"role": "user", "content": "hello there"}]
SHAPES = list(fake_config.SHAPES)  # choices 5, a choice / delta / tool call that is not an object, tool_calls 5,
# content 5, usage 5, chunks that are 5, "x" or [] (non-stream: the same on message and the body)
SLACK_KIB = 48 * 1024  # ~10x what bounded reads take here, far below inflating a bomb or buffering a 64 MiB line


gw, _fresh_routing, key = module_fixtures("upstream-misbehaving")


def sdk(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=60)


def served_by_fallback(gw: Gateway, key: str, stream: bool) -> dict:
    """One request that deepseek (misbehaving) cannot serve: vllm-local must, and the record says why deepseek
    did not."""
    client = sdk(gw, key)
    if stream:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, stream=True)
        chunks = list(raw.parse())
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert {c.model_extra["provider"] for c in chunks} == {"vllm-local"}
    else:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        assert raw.parse().choices[0].message.content
    assert raw.headers["x-therouter-provider"] == "vllm-local"
    rec = record(gw, key, raw.headers["x-therouter-generation-id"])
    assert rec["outcome"] == "completed" and rec["provider"] == "vllm-local"
    first = rec["attempts"][0]
    assert first["provider"] == "deepseek" and first["outcome"] == "error", rec["attempts"]
    return first  # type: ignore[no-any-return]


# ---- wrong shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_a_wrong_shaped_first_event_falls_back(gw: Gateway, key: str, fakes: dict[str, Fake], shape: str) -> None:
    fakes["deepseek"].configure(error_kind="bad_shape", shape=shape, fault_at=0)
    first = served_by_fallback(gw, key, stream=True)
    assert first["code"] == "bad_upstream_response" and first["error"]  # what was wrong, for the operator


@pytest.mark.parametrize("shape", SHAPES)
def test_a_wrong_shaped_body_falls_back(gw: Gateway, key: str, fakes: dict[str, Fake], shape: str) -> None:
    fakes["deepseek"].configure(error_kind="bad_shape", shape=shape)
    first = served_by_fallback(gw, key, stream=False)
    assert first["code"] == "bad_upstream_response"


@pytest.mark.parametrize("shape", ["choices_int", "delta_not_object", "tool_calls_int", "tool_call_not_object",
                                   "chunk_int", "chunk_list"])
def test_a_wrong_shaped_later_event_ends_the_stream_with_an_error_event(gw: Gateway, key: str,
                                                                        fakes: dict[str, Fake], shape: str) -> None:
    fakes["deepseek"].configure(error_kind="bad_shape", shape=shape, fault_at=2)
    failed_before = provider_report(gw, "deepseek")["deployments"][0]["recent"]["failed"]
    r, events = stream_raw(gw, key, {"model": MODEL, "messages": HELLO})
    assert r.status_code == 200 and r.headers["x-therouter-provider"] == "deepseek"
    err = error_event(events)
    assert err["code"] == "bad_upstream_response" and err["type"] == "server_error"
    assert [json.loads(e)["provider"] for e in events[:-1]] == ["deepseek"] * (len(events) - 1)  # it had started

    rec = record(gw, key, r.headers["x-therouter-generation-id"])
    assert rec["outcome"] == "upstream_error"
    assert rec["attempts"][-1]["stream_error"]["code"] == "bad_upstream_response"
    report = provider_report(gw, "deepseek")["deployments"][0]
    assert report["recent"]["failed"] == failed_before + 1  # fed to the deployment's error window and breaker
    assert "bad_upstream_response" in report["last_error"]
    assert "stream " + rec["id"] in gw.logs()  # logged


def test_a_wrong_shaped_later_event_raises_in_the_sdk(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_kind="bad_shape", shape="tool_calls_int", fault_at=2)
    with pytest.raises(openai.APIError) as ei:
        for _ in sdk(gw, key).chat.completions.create(model=MODEL, messages=HELLO, stream=True):
            pass
    assert "wrong shape" in str(ei.value)


# ---- bounded reads ------------------------------------------------------------------------------------------------


def test_an_oversized_line_falls_back_with_memory_bounded(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_kind="huge", fault_at=0, huge_bytes=64 * 1024 * 1024)  # one 64 MiB line
    before = peak_rss_kib(gw.proc.pid)
    first = served_by_fallback(gw, key, stream=True)
    assert first["code"] == "upstream_event_too_large" and str(EVENT_LIMIT) in first["error"]
    assert peak_rss_kib(gw.proc.pid) - before < SLACK_KIB


def test_an_oversized_line_after_the_first_byte_is_an_error_event(gw: Gateway, key: str,
                                                                   fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_kind="huge", fault_at=2, huge_bytes=2 * EVENT_LIMIT)
    r, events = stream_raw(gw, key, {"model": MODEL, "messages": HELLO})
    assert error_event(events)["code"] == "upstream_event_too_large"
    assert record(gw, key, r.headers["x-therouter-generation-id"])["outcome"] == "upstream_error"


def test_an_oversized_body_falls_back_with_memory_bounded(gw: Gateway, key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_kind="huge", huge_bytes=16 * BODY_LIMIT)  # a valid 64 MiB answer
    before = peak_rss_kib(gw.proc.pid)
    first = served_by_fallback(gw, key, stream=False)
    assert first["code"] == "upstream_response_too_large"
    assert peak_rss_kib(gw.proc.pid) - before < SLACK_KIB


@pytest.mark.parametrize("stream", [True, False])
def test_a_gzip_bomb_falls_back_with_memory_bounded(gw: Gateway, key: str, fakes: dict[str, Fake],
                                                    stream: bool) -> None:
    fakes["deepseek"].configure(error_kind="gzip_bomb", bomb_bytes=256 * 1024 * 1024)  # ~256 KB on the wire
    before = peak_rss_kib(gw.proc.pid)
    first = served_by_fallback(gw, key, stream=stream)
    assert first["code"] == ("upstream_event_too_large" if stream else "upstream_response_too_large")
    assert peak_rss_kib(gw.proc.pid) - before < SLACK_KIB


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("stream", [True, False])
def test_compressed_answers_are_served(gw: Gateway, key: str, fakes: dict[str, Fake], encoding: str,
                                       stream: bool) -> None:
    """Decoding is ours now: what upstreams compress still arrives whole, streams event by event."""
    fakes["deepseek"].configure(encoding=encoding)
    client = sdk(gw, key)
    if stream:
        chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
        assert {c.model_extra["provider"] for c in chunks} == {"deepseek"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        assert raw.headers["x-therouter-provider"] == "deepseek" and raw.parse().choices[0].message.content
    assert fakes["deepseek"].last()["headers"]["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("stream", [True, False])
def test_an_encoding_we_never_asked_for_falls_back(gw: Gateway, key: str, fakes: dict[str, Fake],
                                                   stream: bool) -> None:
    fakes["deepseek"].configure(encoding="br")
    first = served_by_fallback(gw, key, stream=stream)
    assert first["code"] == "bad_upstream_response" and "br" in first["error"]
