"""The native relay (pure parts and its pump over an in-memory event list): id / model rewrite, the first-chunk gate,
usage read from message_start and message_delta, a failure after the first byte as an error event."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from therouter import native
from therouter.errors import GatewayError, UpstreamBadResponse
from therouter.protocol.usage import Usage
from therouter.providers.wire import NativeRequest
from therouter.routing.router import Candidate, Skip
from therouter.streaming import ClientStream

from .providers._helpers import dep, make_provider

START = {"type": "message_start", "message": {
    "id": "msg_up", "type": "message", "role": "assistant", "model": "claude-opus-4-7", "content": [],
    "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 6, "output_tokens": 1,
              "cache_creation": {"ephemeral_5m_input_tokens": 6, "ephemeral_1h_input_tokens": 0}}}}
TEXT = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "", "citations": []}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "The sky "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": {
        "type": "char_location", "cited_text": "green", "document_index": 0, "document_title": None,
        "start_char_index": 0, "end_char_index": 5}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "is green."}},
    {"type": "content_block_stop", "index": 0},
]
END = [{"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 7}},
       {"type": "message_stop"}]


def relay() -> native.MessagesRelay:
    return native.MessagesRelay(make_provider("anthropic"), gen_id="gen-1", model="claude-sonnet-4-5")


def frames(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in raw.decode().split("\n\n"):
        if frame:
            name, data = frame.split("\n")
            obj = json.loads(data.removeprefix("data: "))
            assert name == "event: " + obj["type"]
            out.append(obj)
    return out


def test_events_are_relayed_as_they_came_with_our_id_and_the_clients_model() -> None:
    r = relay()
    assert r.rewrite(START) is None and r.rewrite({"type": "ping"}) is None  # held: the gate is not passed yet
    first = r.rewrite(TEXT[0])
    assert first is not None and r.opened
    held = frames(first)
    assert [e["type"] for e in held] == ["message_start", "ping", "content_block_start"]
    msg = held[0]["message"]
    assert (msg["id"], msg["model"]) == ("gen-1", "claude-sonnet-4-5")
    assert {**held[0], "message": {**msg, "id": "msg_up", "model": "claude-opus-4-7"}} == START  # nothing else changed
    assert START["message"]["id"] == "msg_up"  # the upstream's event itself is left alone
    rest = b"".join(r.rewrite(e) or b"" for e in [*TEXT[1:], *END])
    assert frames(rest) == [*TEXT[1:], *END]  # citations, unknown fields, order: as they came
    assert r.stopped and r.finish_reason == "stop"


def test_usage_is_read_from_message_start_and_message_delta() -> None:
    r = relay()
    for e in [START, *TEXT, *END]:
        r.rewrite(e)
    u = r.final_usage(prompt_estimate=999)
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.completion_tokens) == (20, 4, 6, 7)
    assert not u.estimated and r.usage_raw is not None


def test_a_stream_broken_before_message_delta_bills_the_start_counts_and_an_estimate() -> None:
    r = relay()
    for e in [START, *TEXT[:2]]:
        r.rewrite(e)
    assert r.usage_raw is None  # the gateway marks such usage estimated
    u = r.final_usage(prompt_estimate=999)
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens) == (20, 4, 6)  # the upstream's own input counts
    assert u.completion_tokens == 2 and u.estimated  # "The sky " -> 8 characters / 4
    nothing = relay()
    assert nothing.final_usage(prompt_estimate=42).prompt_tokens == 42  # no message_start: the gateway's estimate


def test_a_known_event_of_the_wrong_shape_is_the_providers_fault() -> None:
    with pytest.raises(UpstreamBadResponse):
        relay().rewrite({"type": "message_start", "message": "not an object"})
    r = relay()
    r.rewrite(START)
    assert r.rewrite({"no": "type"}) is None and r.rewrite({"type": "brand_new_event", "x": 1}) is None
    out = r.rewrite(TEXT[0])
    assert out is not None and [e["type"] for e in frames(out)] == ["message_start", "brand_new_event",
                                                                   "content_block_start"]


class _Events:
    """The upstream's events as :class:`ClientStream` reads them (data payloads; Anthropic sends no [DONE])."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.payloads = [json.dumps(e).encode() for e in events]
        self.saw_done = False
        self.closed = False

    def take_ready(self) -> list[bytes]:
        ready, self.payloads = self.payloads, []
        return ready

    async def next_payload(self) -> bytes:
        if not self.payloads:
            raise StopAsyncIteration
        return self.payloads.pop(0)

    async def aclose(self) -> None:
        self.closed = True


async def _run(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, GatewayError | None]]]:
    """The relay under the gateway's one stream owner, as a native stream is served."""
    r = relay()
    first = [r.rewrite(START), r.rewrite(TEXT[0])]
    finished: list[tuple[str, GatewayError | None]] = []

    async def finish(outcome: str, error: GatewayError | None) -> tuple[Usage, int]:
        finished.append((outcome, error))
        return Usage(), 0

    stream = ClientStream(_Events(events), r, [b for b in first if b], finish,  # type: ignore[arg-type]
                          provider="anthropic-1", cost=str)
    out = b"".join([b async for b in stream])
    return frames(out), finished


async def test_pump_completes_and_settles_once() -> None:
    got, finished = await _run([*TEXT[1:], *END])
    assert [e["type"] for e in got][-2:] == ["message_delta", "message_stop"]
    assert finished == [("completed", None)]


async def test_pump_ends_an_in_band_error_with_an_error_event_of_its_type() -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded at 10.0.0.7"}}
    got, finished = await _run([TEXT[1], overloaded, *END])
    assert got[-1] == {"type": "error", "error": {
        "type": "overloaded_error", "message": "Provider `anthropic-1` failed mid-stream: The provider reported an "
                                               "error in its stream."}}
    assert "10.0.0.7" not in json.dumps(got)  # the upstream's words go to the log and the record only
    assert [e["type"] for e in got].count("message_stop") == 0
    assert finished[0][0] == "upstream_error" and finished[0][1] is not None
    assert finished[0][1].code == "upstream_in_band_error"


async def test_pump_names_a_stream_that_ends_without_message_stop_a_cut() -> None:
    got, finished = await _run(TEXT[1:3])
    assert got[-1]["type"] == "error" and got[-1]["error"]["type"] == "api_error"
    assert finished[0][0] == "upstream_cut"


def test_json_answer_is_the_upstreams_message_with_our_id_and_the_clients_model() -> None:
    message = {"id": "msg_up", "type": "message", "role": "assistant", "model": "claude-opus-4-7",
               "content": [{"type": "text", "text": "Green.", "citations": [{"type": "char_location",
                                                                            "cited_text": "green"}]},
                           {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}],
               "stop_reason": "end_turn", "stop_sequence": None, "container": None,
               "usage": {"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 2,
                         "cache_creation_input_tokens": 1, "server_tool_use": {"web_search_requests": 1}}}
    raw = orjson.dumps(message)
    obj, usage = native.read_message(make_provider("anthropic"), raw, prompt_estimate=99)
    assert obj == message
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.completion_tokens) == (6, 2, 1, 5)
    out = orjson.loads(native.message_answer(obj, "gen-9", "claude-sonnet-4-5"))
    assert out == {**message, "id": "gen-9", "model": "claude-sonnet-4-5"}
    assert native.message_finish(obj) == "stop"
    no_usage = {k: v for k, v in message.items() if k != "usage"}
    _, estimated = native.read_message(make_provider("anthropic"), orjson.dumps(no_usage), prompt_estimate=99)
    assert estimated.estimated and estimated.prompt_tokens == 99
    with pytest.raises(UpstreamBadResponse):
        native.read_message(make_provider("anthropic"), b'{"type": "message"}', prompt_estimate=1)


def test_only_a_provider_that_speaks_the_wire_serves_what_only_it_can() -> None:
    doc = NativeRequest.of("anthropic", {}, "m", {"anthropic-beta": "x", "x-api-key": "client"}, ("document blocks",))
    assert doc.headers == {"anthropic-beta": "x"}
    assert native.serves(make_provider("anthropic"), doc) and not native.serves(make_provider("vllm"), doc)
    assert not native.serves(make_provider("anthropic"), None)


def test_only_native_deployments_stay_candidates_for_what_only_they_take() -> None:
    anth = Candidate("m", dep("anthropic"), make_provider("anthropic"))
    vllm = Candidate("m", dep("vllm"), make_provider("vllm"))
    skipped: list[Skip] = []
    doc = NativeRequest.of("anthropic", {}, "claude-x", native_only=("document blocks",))
    assert native.keep_native(doc, [vllm, anth], skipped, "m") == [anth]
    assert [(s.provider, s.param, s.model) for s in skipped] == [("vllm-1", "document blocks", "m")]
    assert native.keep_native(NativeRequest.of("anthropic", {}, "claude-x"), [vllm, anth], [], "m") == [vllm, anth]
    assert native.keep_native(None, [vllm], [], "m") == [vllm]
