"""Metrics labels stay bounded, the log formats, and the multiprocess bookkeeping (pure parts, no process)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from therouter.config import parse_settings
from therouter.errors import BudgetExceeded, RateLimited
from therouter.logs import HANDLER_NAME, REQUEST_ID, JsonFormatter, TextFormatter, log_request, safe_url
from therouter.observability import Finished, Metrics, forget_dead_workers
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


FIELDS = {"event": "request", "request_id": "req_x", "status": 200, "model": "m one", "cost_usd": "0.0001",
          "ttft_ms": None}


@pytest.mark.parametrize("created", [1732900000.001, 1732900000.999, 1764460800.0])
def test_the_request_line_past_logging_is_the_formatters_own_line(created: float) -> None:
    """``info_line`` (the request line without a LogRecord) writes what ``format`` writes for the same record."""
    rec = logging.LogRecord("therouter.request", logging.INFO, __file__, 1, "request", None, None)
    rec.created, rec.msecs = created, (created - int(created)) * 1000
    rec.__dict__["_fields"] = FIELDS
    text, js = TextFormatter(), JsonFormatter()
    assert text.info_line("therouter.request", "request", FIELDS, created) == text.format(rec)
    assert js.info_line("therouter.request", "request", FIELDS, created) == js.format(rec)
    text.datefmt = "%H"  # set up another way: no line of its own, logging writes it
    assert text.info_line("therouter.request", "request", FIELDS, created) is None


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
