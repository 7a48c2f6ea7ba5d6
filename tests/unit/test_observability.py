"""Metrics labels stay bounded, the log formats, and the multiprocess bookkeeping (pure parts, no process)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from therouter import logs
from therouter.config import parse_settings
from therouter.errors import BudgetExceeded, GatewayError, RateLimited, UpstreamRequestRejected
from therouter.logs import (
    HANDLER_NAME,
    REQUEST_ID,
    REQUEST_LOGGER,
    JsonFormatter,
    TextFormatter,
    log_request,
    request_fields,
    safe_url,
)
from therouter.observability import LATENCY_BUCKETS, Finished, Metrics, _adder, _observer, forget_dead_workers
from therouter.protocol.usage import Usage

CONFIG = {
    "store": {"redis_url": "redis://127.0.0.1:1/0"},
    "providers": {"ds": {"kind": "deepseek", "base_url": "http://127.0.0.1:1"}},
    "models": {"m/one": {"context_length": 100, "max_output_tokens": 10, "pricing": {"input": 1, "output": 2},
                         "deployments": [{"provider": "ds", "model": "one"}]}},
}


def _metrics() -> Metrics:
    return Metrics(parse_settings(CONFIG, "test", env={}))


def test_labels_are_bounded_to_the_config() -> None:
    m = _metrics()
    m.finish(Finished("r1", 200, "completed", "m/one", "ds", seconds=0.1, ttft=0.05,
                      usage=Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=1), cost_nano=1500,
                      endpoint="chat"))
    m.finish(Finished("r2", 404, "refused", "no/such-model-" + "x" * 50, "evil-provider", seconds=0.01,
                      endpoint="/v1/evil"))
    m.finish(Finished("r5", 200, "completed", "m/one", "ds", endpoint="messages"))
    m.finish(Finished("r3", 402, "refused", "m/one", error=BudgetExceeded("no")))
    m.finish(Finished("r4", 429, "refused", "m/one", error=RateLimited("slow down", limit="tpm")))
    text = generate_latest(m.registry).decode()
    assert 'therouter_requests_total{code="200",endpoint="chat",model="m/one",provider="ds"} 1.0' in text
    assert 'therouter_requests_total{code="200",endpoint="messages",model="m/one",provider="ds"} 1.0' in text
    assert 'therouter_requests_total{code="404",endpoint="",model="",provider=""} 1.0' in text
    assert "no/such-model" not in text and "evil-provider" not in text and "r1" not in text and "evil" not in text
    assert 'therouter_tokens_total{model="m/one",provider="ds",type="cached"} 1.0' in text
    assert 'therouter_spend_usd_total{model="m/one",provider="ds"} 1.5e-06' in text
    assert "therouter_budget_rejections_total 1.0" in text
    assert 'therouter_rate_limited_total{limit="tpm"} 1.0' in text


def test_attempt_outcomes_are_the_error_classes_codes() -> None:
    """An upstream's own error code (free text) never becomes a label: the error class's code does."""
    from therouter.errors import UpstreamRequestRejected

    m = _metrics()
    m.observe_attempt("ds", UpstreamRequestRejected("no", code="some_upstream_code_" + "z" * 40), 0.1)
    text = generate_latest(m.registry).decode()
    assert 'therouter_upstream_attempts_total{outcome="invalid_request_error",provider="ds"} 1.0' in text
    assert "some_upstream_code" not in text


def test_circuit_gauge_follows_the_breaker() -> None:
    m = _metrics()
    m.declare([("ds", "m/one")])
    assert 'therouter_circuit_open{model="m/one",provider="ds"} 0.0' in generate_latest(m.registry).decode()
    m.observe_breaker("ds", "open", ["m/one"])
    assert 'therouter_circuit_open{model="m/one",provider="ds"} 1.0' in generate_latest(m.registry).decode()
    m.observe_breaker("ds", "closed", ["m/one"])
    assert 'therouter_circuit_open{model="m/one",provider="ds"} 0.0' in generate_latest(m.registry).decode()


AMOUNTS = [0, 0.003, 0.005, 0.0050001, 0.25, 1, 299.9, 300, 301, 10**6, float("inf"), -1.5, float("-inf"),
           float("nan"), 7]


def _twins(make: Callable[[CollectorRegistry], Any]) -> tuple[CollectorRegistry, Any, CollectorRegistry, Any]:
    a, b = CollectorRegistry(), CollectorRegistry()
    return a, make(a).labels("x"), b, make(b).labels("x")


def test_the_direct_updates_expose_what_the_public_methods_do() -> None:
    """``_adder`` / ``_observer`` (a request's updates without prometheus_client's checks) leave the same exposition as
    ``inc`` / ``observe``: every bucket boundary, beyond the last bound, negative, infinite and NaN amounts."""
    pub, child, fast, twin = _twins(lambda r: Histogram("h_seconds", "h", ["p"], buckets=LATENCY_BUCKETS, registry=r))
    observe = _observer(twin)
    assert observe != twin.observe  # (the direct way is taken with this prometheus_client)
    for amount in [*AMOUNTS, *LATENCY_BUCKETS, *(b * 1.0000001 for b in LATENCY_BUCKETS)]:
        child.observe(amount)
        observe(amount)
    assert _values(pub) == _values(fast)
    for kind in (Counter, Gauge):
        pub, child, fast, twin = _twins(lambda r, kind=kind: kind("c", "c", ["p"], registry=r))  # type: ignore[misc]
        add = _adder(twin)
        assert add != twin.inc
        for amount in AMOUNTS if kind is Gauge else [0, 1, 2.5, 10**9, float("inf")]:
            child.inc(amount)
            add(amount)
        assert _values(pub) == _values(fast)


def _values(r: CollectorRegistry) -> list[str]:
    """The exposition without the series' creation times."""
    return [ln for ln in generate_latest(r).decode().splitlines() if "_created" not in ln]


def test_the_direct_updates_leave_other_metrics_to_their_methods() -> None:
    class Mine(Counter):
        def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
            super().inc(2 * amount)

    r = CollectorRegistry()
    mine = Mine("mine", "m", ["p"], registry=r).labels("x")
    recent = Gauge("recent", "r", ["p"], multiprocess_mode="mostrecent", registry=r).labels("x")
    assert _adder(mine) == mine.inc and _adder(recent) == recent.inc

    class Elsewhere:  # a prometheus_client that keeps a histogram's values some other way
        def observe(self, amount: float) -> None:
            pass

    other = Elsewhere()
    assert _observer(other) == other.observe


def _record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("therouter.test", logging.INFO, __file__, 1, msg, args or ("world",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_request_id_of_the_context() -> None:
    token = REQUEST_ID.set("req_abc")
    try:
        line = json.loads(JsonFormatter().format(_record(event="request", status=200)))
    finally:
        REQUEST_ID.reset(token)
    assert line["msg"] == "hello world" and line["request_id"] == "req_abc" and line["status"] == 200
    assert line["level"] == "info" and line["logger"] == "therouter.test" and line["event"] == "request"
    outside = json.loads(JsonFormatter().format(_record()))
    assert "request_id" not in outside


def test_text_lines_append_the_fields() -> None:
    token = REQUEST_ID.set("req_abc")
    try:
        line = TextFormatter().format(_record(event="request", status=200, model="m one"))
    finally:
        REQUEST_ID.reset(token)
    assert line.endswith('hello world request_id=req_abc status=200 model="m one"')


def test_line_times_are_logging_s_own_across_seconds() -> None:
    """The formatters format a second once and reuse it: the text must still be what logging itself writes."""
    text, js, plain = TextFormatter(), JsonFormatter(), logging.Formatter()
    for created in (1732900000.001, 1732900000.999, 1732900001.5, 1732900000.25, 1764460800.0):
        rec = _record()
        rec.created, rec.msecs = created, (created - int(created)) * 1000
        assert text.format(rec).startswith(plain.formatTime(rec) + " INFO therouter.test: hello world")
        ts = json.loads(js.format(rec))["ts"]
        assert ts == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(rec.msecs):03d}Z"


def test_the_request_line_carries_its_fields() -> None:
    rec = _record(_fields={"event": "request", "status": 499, "request_id": "req_x", "model": None})
    assert json.loads(JsonFormatter().format(rec)) | {"ts": "", "pid": 0} == {
        "ts": "", "pid": 0, "level": "info", "logger": "therouter.test", "msg": "hello world",
        "request_id": "req_x", "event": "request", "status": 499, "model": None}
    assert TextFormatter().format(rec).endswith("hello world request_id=req_x status=499 model=-")


@pytest.fixture
def our_handler() -> Iterator[tuple[logging.StreamHandler[io.StringIO], io.StringIO]]:
    """Our handler, writing to a buffer; the test calls ``_only`` to make it the root's only one (pytest adds its
    own capturing handlers when the test starts); restored after."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.set_name(HANDLER_NAME)
    h.setFormatter(JsonFormatter())
    root.handlers[:] = [h]
    root.setLevel(logging.INFO)
    try:
        yield h, out
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def _only(h: logging.Handler) -> None:
    logging.getLogger().handlers[:] = [h]  # as `serve` sets it up


def _finished(rid: str, fallback_from: str = "") -> Finished:
    return Finished(rid, 200, "completed", "m/one", "ds", seconds=0.1, usage=Usage(prompt_tokens=1,
                    completion_tokens=2), cost_nano=1500, endpoint="chat", fallback_from=fallback_from)


def test_request_lines_are_written_once_per_loop_turn_in_order(
        our_handler: tuple[logging.StreamHandler[io.StringIO], io.StringIO]) -> None:
    h, out = our_handler
    _only(h)

    async def main() -> str:
        log_request(_finished("req_1"))
        log_request(_finished("req_2"))
        before = out.getvalue()  # gathered, not yet written
        await asyncio.sleep(0)
        log_request(_finished("req_3", fallback_from="other"))  # the fallback line goes through logging, after
        await asyncio.sleep(0)
        return before

    assert asyncio.run(main()) == ""
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["request_id"], x["event"]) for x in lines] == [
        ("req_1", "request"), ("req_2", "request"), ("req_3", "request"), ("req_3", "fallback")]
    assert lines[0]["logger"] == "therouter.request" and lines[0]["cost_usd"] == "0.0000015"
    assert lines[0]["prompt_tokens"] == 1 and lines[0]["completion_tokens"] == 2


def test_request_lines_go_through_logging_when_it_is_set_up_otherwise(
        our_handler: tuple[logging.StreamHandler[io.StringIO], io.StringIO]) -> None:
    """Another handler, or a filter on the way, sees every request line as a record, as soon as it is logged."""
    h, out = our_handler
    _only(h)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    async def one(rid: str) -> None:
        log_request(_finished(rid))

    logging.getLogger("therouter").addHandler(keep := Keep())
    try:
        asyncio.run(one("req_a"))
    finally:
        logging.getLogger("therouter").removeHandler(keep)
    h.addFilter(lambda r: True)
    try:
        asyncio.run(one("req_b"))
    finally:
        h.filters.clear()
    assert [r.__dict__["_fields"]["request_id"] for r in seen] == ["req_a"]
    assert [json.loads(x)["request_id"] for x in out.getvalue().splitlines()] == ["req_a", "req_b"]


class _NoCode(GatewayError):
    code = None


REQUEST_LINES = [
    Finished("req_1", 200, "completed", "m/one", "ds", seconds=0.1234, ttft=0.05, generation_id="gen-1", key_id="key_1",
             usage=Usage(prompt_tokens=12, completion_tokens=30, cached_tokens=4), cost_nano=15_960, attempts=1,
             endpoint="chat"),
    Finished("req_2", 402, "refused", "m/one", error=BudgetExceeded("no")),  # no provider, usage, times, ids
    Finished("", 200, "completed", "m one", "p q", seconds=2.5, ttft=None, generation_id="gen x", key_id="key y",
             usage=Usage(prompt_tokens=3), cost_nano=2_500_000_001, attempts=2, endpoint="messages"),
    Finished("req 4", 502, "upstream cut", 'm"\u00f6\n=', "", generation_id="", key_id="",
             error=UpstreamRequestRejected("no", code="some code"), cost_nano=-7, attempts=3),
    Finished("req_5", 499, "", "", "", error=_NoCode("x"), seconds=0.0, ttft=0.0009),
]


def _request_record(f: Finished, created: float) -> logging.LogRecord:
    """The record :func:`log_request` hands to logging when the line does not go past it."""
    rec = logging.LogRecord(REQUEST_LOGGER, logging.INFO, __file__, 1, "request", None, None)
    rec.created, rec.msecs = created, (created - int(created)) * 1000
    rec.__dict__["_fields"] = request_fields(f)
    return rec


@pytest.mark.parametrize("context_id", [None, "req_ctx"])
@pytest.mark.parametrize("f", REQUEST_LINES)
def test_the_request_line_built_from_the_request_is_the_formatters_own_line(f: Finished, context_id: str | None) -> None:
    """``request_line`` (the request line made straight from a Finished, past logging) writes what ``format`` writes
    for the record logging would get: text and json, values with a space, None and empty values, the request id of
    the context when the request has none, the same line again (the text's cached middle)."""
    text, js = TextFormatter(), JsonFormatter()
    token = REQUEST_ID.set(context_id)
    try:
        for created in (1732900000.001, 1732900000.999, 1764460800.0, 1764460800.5):
            for _ in range(2):
                assert text.request_line(f, created) == text.format(_request_record(f, created))
                assert js.request_line(f, created) == js.format(_request_record(f, created))
    finally:
        REQUEST_ID.reset(token)
    text.datefmt = "%H"  # set up another way: no line of its own, logging writes it
    assert text.request_line(f, 1764460800.5) is None


_free_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # (orjson refuses lone surrogates)
_some_text = st.one_of(_free_text, st.sampled_from(["", "a b", "m/one", "-", '"', "x=y"]))
_seconds = st.one_of(st.none(), st.floats(min_value=0, max_value=10**6, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(rid=_some_text, gen=_some_text, key=_some_text, model=_some_text, provider=_some_text, endpoint=_some_text,
       outcome=_some_text, code=st.one_of(st.none(), _some_text), status=st.integers(100, 599),
       tokens=st.one_of(st.none(), st.tuples(st.integers(0, 10**9), st.integers(0, 10**9))),
       cost=st.integers(-(10**12), 10**13), seconds=_seconds, ttft=_seconds, attempts=st.integers(0, 9),
       created=st.floats(min_value=0, max_value=4 * 10**9, allow_nan=False))
def test_any_request_line_is_the_formatters_own_line(
        rid: str, gen: str, key: str, model: str, provider: str, endpoint: str, outcome: str, code: str | None,
        status: int, tokens: tuple[int, int] | None, cost: int, seconds: float | None, ttft: float | None,
        attempts: int, created: float) -> None:
    err = None if code is None else GatewayError("x", code=code or None)
    f = Finished(rid, status, outcome, model, provider, seconds=seconds, ttft=ttft, generation_id=gen, key_id=key,
                 usage=Usage(*tokens) if tokens else None, cost_nano=cost, attempts=attempts, error=err,
                 endpoint=endpoint)
    text, js = TextFormatter(), JsonFormatter()
    assert text.request_line(f, created) == text.format(_request_record(f, created))
    assert js.request_line(f, created) == js.format(_request_record(f, created))


def test_the_text_lines_cached_middles_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_MIDDLES_MAX", 3)
    text = TextFormatter()
    for i in range(10):
        f = Finished(f"req_{i}", 200, "completed", "m/one", "ds", key_id=f"key_{i % 5}", endpoint="chat")
        assert text.request_line(f, 1764460800.5) == text.format(_request_record(f, 1764460800.5))
        assert len(text._middles) <= 3


def test_text_request_lines_past_logging_are_logging_s_lines_in_order(
        our_handler: tuple[logging.StreamHandler[io.StringIO], io.StringIO]) -> None:
    """The text format end to end: the lines gathered past logging are the lines logging writes for the same
    requests (apart from the time), in order, the fallback line after its request line."""
    h, out = our_handler
    h.setFormatter(TextFormatter())
    _only(h)
    requests = [*REQUEST_LINES, _finished("req_6", fallback_from="other")]

    async def main() -> None:
        for f in requests:
            log_request(f)
        await asyncio.sleep(0)

    asyncio.run(main())
    past = _timeless(out.getvalue())
    out.seek(0)
    out.truncate()
    h.addFilter(lambda r: True)  # now every line goes through logging
    try:
        asyncio.run(main())
    finally:
        h.filters.clear()
    assert past == _timeless(out.getvalue())
    lines = past.split("\n")  # one line each: a line break in a value is quoted, never a line of its own
    assert len(lines) == len(requests) + 2 and lines[-1] == ""
    assert any(' model="m\\"\u00f6\\n=" ' in line for line in lines)
    assert lines[-3].startswith("INFO therouter.request: request request_id=req_6 ")
    assert lines[-2].startswith("INFO therouter.request: fallback from other to ds ")
    assert ' model="m one" provider="p q" ' in lines[2] and " ttft_ms=- " in lines[2] and "request_id=" not in lines[2]
    assert lines[1].endswith(" attempts=0 outcome=refused error_code=budget_exceeded")


def _timeless(text: str) -> str:
    return re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", text, flags=re.MULTILINE)


def test_safe_url_hides_the_password() -> None:
    assert safe_url("redis://:s3cret@host:6379/0") == "redis://***@host:6379/0"
    assert safe_url("rediss://user:p@ss@host/0") == "rediss://***@host/0"
    assert safe_url("redis://host:6379/0") == "redis://host:6379/0"


def test_dead_worker_gauges_are_dropped(tmp_path: Path) -> None:
    """A killed worker never ran its shutdown: its live gauges are dropped at the next scrape, its counters kept."""
    for name in ("gauge_livesum_111.db", "gauge_livemax_111.db", "gauge_livesum_222.db", "counter_111.db"):
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_workers(str(tmp_path), alive=lambda pid: pid == 222) == [111]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_111.db", "gauge_livesum_222.db"]
