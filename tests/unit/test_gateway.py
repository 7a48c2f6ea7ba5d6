"""The gateway in-process: fake providers that answer from a script (no sockets), a fake clock and a sleep that only
advances it, and a meter that records what it is asked to settle. Fallback, retry with backoff, the first-chunk gate,
a stream that breaks after its first byte, a client that leaves, and settlement exactly once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest

from therouter.config import ProviderConfig, Settings, parse_settings
from therouter.errors import (
    GatewayError,
    NoDeploymentAvailable,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRequestRejected,
    UpstreamStreamError,
)
from therouter.gateway import Gateway, JSONAnswer, StreamAnswer
from therouter.keys import KeyRecord
from therouter.metering.meter import Meter
from therouter.metering.records import GenerationRecord
from therouter.protocol.usage import Usage
from therouter.providers import (
    Provider,
    Transport,
    UpstreamEvents,
    UpstreamRequest,
    UpstreamResponse,
)
from therouter.routing.attempts import AttemptPolicy
from therouter.routing.options import RoutingOptions
from therouter.routing.router import Router
from therouter.routing.state import RoutingState

MODEL = "m"
HANG = object()  # in a script of chunks: the upstream goes silent until it is closed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Script(UpstreamResponse):
    """An upstream's 200 stream: bytes, an exception (the connection breaks) or HANG."""

    def __init__(self, chunks: list[Any]) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {}
        self.chunks_ = chunks
        self.closed = asyncio.Event()

    async def raw_chunks(self) -> AsyncIterator[bytes]:
        for c in self.chunks_:
            if c is HANG:
                await self.closed.wait()
                return
            if isinstance(c, BaseException):
                raise c
            yield c

    async def close(self) -> None:
        self.closed.set()


class _NoTransport(Transport):
    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        raise AssertionError("a fake provider never uses a transport")

    async def aclose(self) -> None:
        pass


class FakeProvider(Provider):
    """Answers each attempt with the next item of its script: a GatewayError (the attempt fails before any byte),
    a list of stream chunks (``open_stream``) or a JSON answer (``complete``)."""

    def __init__(self, name: str, config: ProviderConfig, script: list[Any]) -> None:
        super().__init__(name, config, _NoTransport())
        self.script = script
        self.sent: list[UpstreamRequest] = []
        self.opened: list[Script] = []

    def _next(self, req: UpstreamRequest) -> Any:
        self.sent.append(req)
        item = self.script.pop(0)
        if isinstance(item, GatewayError):
            raise item
        return item

    async def open_stream(self, req: UpstreamRequest, *, first_token: float, total: float, clock: Any = None,
                          max_event_bytes: int = 1 << 20, max_error_bytes: int = 1 << 20) -> UpstreamEvents:
        resp = Script(self._next(req))
        self.opened.append(resp)
        return UpstreamEvents(resp, first_token=first_token, idle=self.config.timeouts.idle, total=total,
                              clock=clock, max_event_bytes=max_event_bytes)

    async def complete(self, req: UpstreamRequest, *, budget: float,
                       max_body_bytes: int = 1 << 20) -> tuple[dict[str, Any], Usage | None]:
        obj = dict(self._next(req))
        return obj, self.usage(obj["usage"]) if "usage" in obj else None


class FakeMeter:
    """Admits everything; keeps every settlement (a request must be settled exactly once)."""

    def __init__(self) -> None:
        self.settled: list[GenerationRecord] = []
        self.live: dict[str, Any] = {}

    async def admit(self, key: KeyRecord, model: str, prompt_tokens_est: int, max_output_tokens: int,
                    gen_id: str, **kw: Any) -> Any:
        return SimpleNamespace(headers={}, price_version=1)

    def serving(self, gen_id: str, model: str, provider: str, upstream_model: str, stream: bool,
                usage: Any = None) -> None:
        self.live[gen_id] = usage

    async def settle(self, adm: Any, record: GenerationRecord, estimate: Usage | None = None, choices: int = 1,
                     **kw: Any) -> int:
        self.settled.append(record)
        return 1000 * record.usage.total_tokens


def settings(names: list[str]) -> Settings:
    raw = {
        "store": {"redis_url": "redis://127.0.0.1:1"},
        "providers": {n: {"kind": "vllm", "base_url": f"http://{n}.internal/v1",
                          "timeouts": {"first_token": 5, "idle": 5, "total": 60}} for n in names},
        "models": {MODEL: {"context_length": 8192, "max_output_tokens": 1024,
                           "pricing": {"input": 1, "cached_input": 0.5, "output": 2},
                           "deployments": [{"provider": n, "model": "up", "priority": i} for i, n in
                                           enumerate(names)]}},
    }
    return parse_settings(raw, "test", env={})


class Rig:
    def __init__(self, scripts: dict[str, list[Any]], options: RoutingOptions | None = None) -> None:
        self.clock = Clock()
        self.settings = settings(list(scripts))
        self.providers = {n: FakeProvider(n, self.settings.providers[n], s) for n, s in scripts.items()}
        state = RoutingState(options or RoutingOptions(), clock=self.clock)
        self.router = Router(self.settings, cast(dict[str, Provider], self.providers), rng=random.Random(1),
                             state=state)
        self.slept: list[float] = []
        self.policy = AttemptPolicy(self.router, rng=random.Random(1), sleep=self.sleep)
        self.meter = FakeMeter()
        self.gateway = Gateway(self.settings, self.router, cast(Meter, self.meter), self.policy, clock=self.clock)
        self.key = KeyRecord(id="k1", name="test", hint="sk-...")

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += seconds

    async def ask(self, stream: bool, gone: Any = None, **body: Any) -> JSONAnswer | StreamAnswer:
        raw = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                            **body})
        return await self.gateway.handle(self.key, "chat", raw, "req-1", gone)


def sse(*objs: Any) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n\n" for o in objs)


def chunk(content: str | None = None, finish: str | None = None, usage: dict[str, int] | None = None,
          choices: bool = True) -> dict[str, Any]:
    c: dict[str, Any] = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                         "choices": []}
    if choices:
        c["choices"] = [{"index": 0, "delta": {} if content is None else {"content": content},
                         "finish_reason": finish}]
    if usage is not None:
        c["usage"] = usage
    return c


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
GOOD = [sse(chunk("Hel"), chunk("lo"), chunk("!"), chunk(None, "stop"), chunk(usage=USAGE, choices=False)),
        sse(b"[DONE]")]


async def read_all(answer: JSONAnswer | StreamAnswer) -> list[Any]:
    assert isinstance(answer, StreamAnswer)
    out = []
    async for chunk in answer.events:  # a write may carry several events (the usage chunk and [DONE] go together)
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        for b in chunk[:-2].split(b"\n\n"):
            assert b.startswith(b"data: ")
            out.append(b[6:] if b == b"data: [DONE]" else orjson.loads(b[6:]))
    return out


# ---- streams ------------------------------------------------------------------------------------------------------


async def test_a_stream_is_relayed_and_settled_once() -> None:
    rig = Rig({"a": [list(GOOD)]})
    answer = await rig.ask(True, stream_options={"include_usage": True})
    events = await read_all(answer)
    assert events[-1] == b"[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "Hello!"
    assert all(e["id"].startswith("chatcmpl-") and e["model"] == MODEL and e["provider"] == "a"
               for e in events[:-1])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 8
    assert len(rig.meter.settled) == 1
    rec = rig.meter.settled[0]
    assert (rec.outcome, rec.provider, rec.usage.total_tokens, rec.finish_reason) == ("completed", "a", 8, "stop")
    assert isinstance(answer, StreamAnswer)
    await answer.events.aclose()  # type: ignore[attr-defined]
    assert len(rig.meter.settled) == 1 and rig.providers["a"].opened[0].closed.is_set()


async def test_a_failed_attempt_falls_back_to_the_next_deployment() -> None:
    rig = Rig({"a": [UpstreamError("boom", sent=True)], "b": [list(GOOD)]})
    answer = await rig.ask(True)
    assert answer.headers["x-therouter-provider"] == "b" and answer.headers["x-therouter-attempts"] == "2"
    await read_all(answer)
    rec = rig.meter.settled[0]
    assert [(a["provider"], a["outcome"]) for a in rec.attempts] == [("a", "error"), ("b", "ok")]
    assert rec.attempts[0]["possibly_accepted"] is True
    assert len(rig.meter.settled) == 1


async def test_a_request_the_upstream_rejects_does_not_fall_back() -> None:
    rig = Rig({"a": [UpstreamRequestRejected("no such parameter", param="foo")], "b": [list(GOOD)]})
    with pytest.raises(UpstreamRequestRejected):
        await rig.ask(True)
    assert rig.providers["b"].sent == [] and len(rig.meter.settled) == 1
    assert rig.meter.settled[0].outcome == "rejected"


async def test_retries_back_off_on_the_fake_clock() -> None:
    opts = RoutingOptions(max_attempts=3, backoff_base=1.0, backoff_max=8.0)
    rig = Rig({"a": [UpstreamConnectError("refused"), UpstreamConnectError("refused"), list(GOOD)]}, opts)
    answer = await rig.ask(True)
    await read_all(answer)
    assert len(rig.slept) == 2 and 0 < rig.slept[0] and rig.slept[0] <= 1.0 * 2 and rig.slept[1] <= 2.0 * 2
    rec = rig.meter.settled[0]
    assert [a.get("retry", False) for a in rec.attempts] == [False, True, True]
    assert rec.outcome == "completed"


async def test_every_deployment_failing_is_one_answer_naming_them() -> None:
    opts = RoutingOptions(max_attempts=2)
    rig = Rig({"a": [UpstreamConnectError("refused")] * 3, "b": [UpstreamConnectError("refused")] * 3}, opts)
    with pytest.raises(GatewayError) as ei:
        await rig.ask(True)
    assert "a: upstream_connect_error" in ei.value.message and "b: upstream_connect_error" in ei.value.message
    assert ei.value.headers["x-therouter-generation-id"]
    assert len(rig.meter.settled) == 1 and rig.meter.settled[0].outcome == "failed"


async def test_the_first_chunk_gate_holds_until_real_content() -> None:
    """Keep-alives, an empty delta and a usage-only event do not open the answer; an in-band error before any
    content fails the attempt, so the request falls back."""
    error = {"error": {"message": "overloaded", "code": 503}}
    rig = Rig({"a": [[b": keep-alive\n\n", sse(chunk(usage=USAGE, choices=False)), sse(error)]],
               "b": [[b": keep-alive\n\n", sse(chunk(usage=USAGE, choices=False)), *GOOD]]})
    answer = await rig.ask(True)
    assert answer.headers["x-therouter-provider"] == "b"
    events = await read_all(answer)
    assert events[0]["choices"][0]["delta"]["content"] == "Hel"
    assert rig.providers["a"].opened[0].closed.is_set()
    assert rig.meter.settled[0].attempts[0]["status"] == 502


async def test_an_upstream_that_ends_before_content_fails_the_attempt() -> None:
    rig = Rig({"a": [[sse(b"[DONE]")]], "b": [list(GOOD)]})
    answer = await rig.ask(True)
    assert answer.headers["x-therouter-provider"] == "b"
    await read_all(answer)
    assert rig.meter.settled[0].attempts[0]["code"] == "upstream_stream_error"


async def test_a_break_after_the_first_byte_is_one_error_event_and_no_fallback() -> None:
    broken = [sse(chunk("Hel"), chunk("lo")), UpstreamStreamError("connection reset", sent=True)]
    rig = Rig({"a": [broken], "b": [list(GOOD)]})
    events = await read_all(await rig.ask(True))
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == ["Hel", "lo"]
    assert events[-1]["error"]["code"] == "upstream_stream_error" and "`a` failed mid-stream" in \
        events[-1]["error"]["message"]
    assert rig.providers["b"].sent == []
    assert len(rig.meter.settled) == 1
    rec = rig.meter.settled[0]
    assert rec.outcome == "upstream_cut" and rec.usage.estimated and rec.usage.completion_tokens == 2
    assert rec.attempts[-1]["stream_error"]["code"] == "upstream_stream_error"


async def test_an_in_band_error_mid_stream_is_ours_to_word() -> None:
    rig = Rig({"a": [[sse(chunk("Hel"), {"error": {"message": "secret upstream words", "code": 500}})]]})
    events = await read_all(await rig.ask(True))
    assert events[-1]["error"]["code"] == "upstream_in_band_error"
    assert "secret upstream words" not in orjson.dumps(events[-1]).decode()
    assert rig.meter.settled[0].outcome == "upstream_error"


async def test_a_client_that_leaves_at_the_gate_cancels_the_upstream() -> None:
    rig = Rig({"a": [[b": keep-alive\n\n", HANG]]})
    left = asyncio.Event()

    async def gone() -> None:
        await left.wait()

    task = asyncio.ensure_future(rig.ask(True, gone=gone))
    await asyncio.sleep(0.01)
    assert not task.done()
    left.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.providers["a"].opened[0].closed.is_set()
    assert len(rig.meter.settled) == 1
    assert rig.meter.settled[0].outcome == "client_cancelled"
    assert rig.meter.settled[0].attempts[0]["outcome"] == "cancelled"


async def test_a_client_that_leaves_before_the_first_event_is_pulled_is_settled_once() -> None:
    rig = Rig({"a": [list(GOOD)]})
    answer = await rig.ask(True)
    assert isinstance(answer, StreamAnswer)
    await answer.events.aclose()  # type: ignore[attr-defined]
    await answer.events.aclose()  # type: ignore[attr-defined]
    assert rig.providers["a"].opened[0].closed.is_set()
    assert len(rig.meter.settled) == 1 and rig.meter.settled[0].outcome == "client_cancelled"


async def test_a_client_that_leaves_mid_stream_is_billed_what_was_produced_once() -> None:
    rig = Rig({"a": [[sse(chunk("Hel"), chunk("lo")), HANG]]})
    answer = await rig.ask(True)
    assert isinstance(answer, StreamAnswer)
    it = answer.events.__aiter__()
    first = await it.__anext__()  # the gate's event and the one read with it: one write
    assert [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in first.split(b"\n\n") if e] == \
        ["Hel", "lo"]
    pending = asyncio.ensure_future(it.__anext__())  # waiting on a silent upstream
    await asyncio.sleep(0.01)
    pending.cancel()  # the response task is cancelled when the client leaves
    with pytest.raises(asyncio.CancelledError):
        await pending
    await answer.events.aclose()  # type: ignore[attr-defined]
    assert rig.providers["a"].opened[0].closed.is_set()
    assert len(rig.meter.settled) == 1
    rec = rig.meter.settled[0]
    assert rec.outcome == "client_cancelled" and rec.usage.completion_tokens == 2  # "Hello": 5 chars


async def test_the_checkpoint_reads_the_live_stream() -> None:
    """A lost instance's stream is settled from the checkpoint's reading of the stream in flight."""
    rig = Rig({"a": [[sse(chunk("Hello, world")), HANG]]})
    answer = await rig.ask(True)
    assert isinstance(answer, StreamAnswer)
    live = next(iter(rig.meter.live.values()))
    assert live().completion_tokens == 3
    await answer.events.aclose()  # type: ignore[attr-defined]


# ---- non-stream ---------------------------------------------------------------------------------------------------


ANSWER = {"id": "up-1", "object": "chat.completion", "created": 1, "model": "up",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
          "usage": USAGE}


async def test_a_json_answer_falls_back_and_carries_our_identity() -> None:
    rig = Rig({"a": [UpstreamError("boom", sent=True)], "b": [ANSWER]})
    answer = await rig.ask(False)
    assert isinstance(answer, JSONAnswer)
    body = orjson.loads(answer.body)
    assert body["id"].startswith("chatcmpl-") and body["model"] == MODEL and body["provider"] == "b"
    assert body["choices"][0]["message"]["content"] == "Hello!"
    assert body["usage"]["total_tokens"] == 8 and body["usage"]["cost"] == pytest.approx(8000 / 1e9)
    assert len(rig.meter.settled) == 1 and rig.meter.settled[0].outcome == "completed"


async def test_no_deployment_left_is_a_503() -> None:
    rig = Rig({"a": [list(GOOD)]})
    rig.router.state.set_drained("a", True, share=False)
    with pytest.raises(NoDeploymentAvailable) as ei:
        await rig.ask(False)
    assert ei.value.status == 503 and "a: drained" in ei.value.message
    assert rig.meter.settled == []  # refused before admission: nothing to settle
