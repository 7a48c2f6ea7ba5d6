"""Logging: one format for every line (ours and uvicorn's), the request id on every line of a request, and the
request line itself.

* ``--log-format json`` (or ``server.log_format: json``): one JSON object per line (``ts``, ``level``, ``logger``,
  ``msg``, ``pid``, ``request_id`` when the line was written during a request, and the event's own fields);
  ``text``: ``time LEVEL logger: message key=value ...``.
* The request id lives in a context variable set by the request-id middleware, so every line written while a request
  is handled -- in its task or in tasks it started -- carries it without being passed around.
* Event lines carry ``event`` (``request``, ``fallback``, ``circuit``, ``drain``, ``undrain``, ``provider_reset``,
  ``journal_replay``, ``price_change``, ``serve``, ``worker_ready``) and their fields as ``extra``.
* Never a prompt, a completion, a key or a provider secret: the request line holds ids, names, counts and times.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Any, Literal

import orjson

from therouter.metering.prices import nano_to_usd
from therouter.observability import Finished

LogFormat = Literal["text", "json"]
REQUEST_ID: ContextVar[str | None] = ContextVar("therouter_request_id", default=None)
HANDLER_NAME = "therouter"
REQUEST_LOGGER = "therouter.request"
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName",
                                                                                  "color_message"}
request_log = logging.getLogger(REQUEST_LOGGER)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    given = record.__dict__.get("_fields")  # the request line hands its fields over whole (log_request)
    if given is not None:
        return _given(given)
    out = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
    rid = out.pop("request_id", None) or REQUEST_ID.get()
    return {"request_id": rid, **out} if rid else out


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    rid = out.pop("request_id", None) or REQUEST_ID.get()
    return {"request_id": rid, **out} if rid else out


_MSECS = tuple(f"{ms:03d}" for ms in range(1001))  # a line's milliseconds as logging writes them (%03d; 1000: a
# fraction a hair under 1 can round up to it)
_MIDDLES_MAX = 1024  # TextFormatter.request_line's cached middles: cleared when full


class _Pid:
    """This process's id, read once (and again in a forked child): the json request line's ``pid``."""

    value = os.getpid()

    @classmethod
    def forked(cls) -> None:
        cls.value = os.getpid()


os.register_at_fork(after_in_child=_Pid.forked)


class _Clock:
    """The wall-clock part of a line's time, formatted once per second (a line per request made it a hot path)."""

    __slots__ = ("fmt", "second", "text")

    def __init__(self, fmt: str) -> None:
        self.fmt, self.second, self.text = fmt, -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.fmt, time.gmtime(second))
        return self.text


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock("%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": f"{self._clock(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
            "pid": record.process,
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()

    def request_line(self, f: Finished, created: float) -> str:
        """What :meth:`format` makes of :func:`log_request`'s record for ``f`` (its fields: :func:`request_fields`),
        built in one go: the request line's way past logging's record, see :class:`_Lines`."""
        u, err, s, t = f.usage, f.error, f.seconds, f.ttft
        rid = f.request_id or REQUEST_ID.get()
        out: dict[str, Any] = {
            "ts": f"{self._clock(created)}.{_MSECS[int((created - int(created)) * 1000)]}Z",
            "level": "info", "logger": REQUEST_LOGGER, "msg": "request", "pid": _Pid.value,
            "request_id": rid, "event": "request", "generation_id": f.generation_id or None,
            "endpoint": f.endpoint or None, "key_id": f.key_id or None, "model": f.model or None,
            "provider": f.provider or None, "status": f.status,
            "prompt_tokens": u.prompt_tokens if u else 0, "completion_tokens": u.completion_tokens if u else 0,
            "cost_usd": nano_to_usd(f.cost_nano), "latency_ms": None if s is None else int(s * 1000),
            "ttft_ms": None if t is None else int(t * 1000), "attempts": f.attempts, "outcome": f.outcome,
            "error_code": err.code if err is not None else None,
        }
        if not rid:
            del out["request_id"]
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    _default_fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self) -> None:
        super().__init__(self._default_fmt)
        self._local = _Clock(self.default_time_format)
        self._middles: dict[tuple[str, str, str, str, int], str] = {}

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        return f"{self._second(record.created)},{int(record.msecs):03d}"

    def _second(self, created: float) -> str:
        second = int(created)
        if second != self._local.second:  # local time, as logging's default
            self._local.second = second
            self._local.text = time.strftime(self.default_time_format, time.localtime(second))
        return self._local.text

    def _as_made(self) -> bool:
        """Whether this formatter writes what :func:`formatter` made it write (its lines can be made past logging)."""
        return self._fmt == self._default_fmt and self.datefmt is None and self.converter is time.localtime

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the line
        extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items() if k != "event")
        return f"{head} {extra}{sep}{tail}" if extra else line

    def request_line(self, f: Finished, created: float) -> str | None:
        """What :meth:`format` makes of :func:`log_request`'s record for ``f`` (its fields: :func:`request_fields`),
        built in one go (None when this formatter is not as :func:`formatter` made it: logging writes it). Only
        the fields that are free text go through :func:`_text`'s quoting; numbers are written as they are."""
        if not self._as_made():
            return None
        u, err, s, t, g = f.usage, f.error, f.seconds, f.ttft, f.generation_id
        rid = f.request_id or REQUEST_ID.get()
        key = (f.endpoint, f.key_id, f.model, f.provider, f.status)
        mid = self._middles.get(key)  # the fields that repeat from request to request, written once
        if mid is None:
            if len(self._middles) >= _MIDDLES_MAX:
                self._middles.clear()
            mid = self._middles[key] = (f" endpoint={_opt(f.endpoint)} key_id={_opt(f.key_id)} model={_opt(f.model)}"
                                        f" provider={_opt(f.provider)} status={f.status}")
        return (f"{self._second(created)},{_MSECS[int((created - int(created)) * 1000)]} INFO {REQUEST_LOGGER}: request"
                f"{(' request_id=' + _word(rid)) if rid else ''}"
                f" generation_id={_opt(g)}{mid}"
                f" prompt_tokens={u.prompt_tokens if u else 0} completion_tokens={u.completion_tokens if u else 0}"
                f" cost_usd={nano_to_usd(f.cost_nano)} latency_ms={'-' if s is None else int(s * 1000)}"
                f" ttft_ms={'-' if t is None else int(t * 1000)} attempts={f.attempts} outcome={_word(f.outcome)}"
                f" error_code={'-' if err is None else _text(err.code)}")


def _word(s: str) -> str:
    """A text as one word of the text format: as it is, or JSON-quoted when it is empty, holds a space or anything
    not printable (a line break in an upstream's error code must not start a line of its own in the log)."""
    return s if s and " " not in s and s.isprintable() else orjson.dumps(s).decode()


def _text(v: Any) -> str:
    """A field's value as one word (None: ``-``)."""
    return "-" if v is None else _word(str(v))


def _opt(s: str) -> str:
    """:func:`_text` of ``s or None``."""
    return _word(s) if s else "-"


def lean_records() -> None:
    """What the formats never show is not collected per record (the logging cookbook's "Optimization"): the caller's
    file and line (a stack walk per line), thread and multiprocessing names. The pid stays."""
    logging._srcfile = None  # documented: None skips sys._getframe per record
    logging.logThreads = False
    logging.logMultiprocessing = False


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def dict_config(fmt: LogFormat, level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` (also uvicorn's ``log_config``, so each worker applies it): every logger,
    uvicorn's included, writes through one stderr handler in the chosen format."""
    lean_records()  # (`serve` builds it; each worker runs setup_logging in its lifespan too)
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {HANDLER_NAME: {"()": f"therouter.logs.{'Json' if fmt == 'json' else 'Text'}Formatter"}},
        "handlers": {HANDLER_NAME: {"class": "logging.StreamHandler", "formatter": HANDLER_NAME,
                                    "stream": "ext://sys.stderr"}},
        "root": {"handlers": [HANDLER_NAME], "level": lvl},
        "loggers": {name: {"handlers": [], "propagate": True, "level": lvl}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")},
    }


def setup_logging(fmt: LogFormat = "text", level: str = "INFO") -> None:
    """For an app started without ``serve`` (the demo, tests): a stderr handler, unless one is already set up."""
    lean_records()
    root = logging.getLogger()
    if any(h.get_name() == HANDLER_NAME for h in root.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h.set_name(HANDLER_NAME)
    h.setFormatter(formatter(fmt))
    root.addHandler(h)
    root.setLevel(level.upper())


class _Lines:
    """The request line, one per request, written past logging's record machinery when logging is set up the way
    :func:`dict_config` / :func:`setup_logging` set it up -- the request logger and its parents without handlers or
    filters of their own, the root's one handler ours (a plain ``StreamHandler``, no filter) with one of our
    formatters as they made it. The line is the one that formatter would write. Lines are gathered and written (and
    flushed) once per turn of the event loop, under the handler's lock; anything else -- another handler, a filter,
    a custom format, no running loop -- goes through ``logging`` as before. (Per request, logging's record, its
    handler calls and a write + flush were ~5 % of a JSON request's CPU in bench/profile.sh.) The line is made
    straight from the :class:`Finished` by the formatter's ``request_line`` (no fields dict, no copies of it): ~10 us
    per request went to ~4.5 us (a loop turn per line) / ~3 us (four lines a turn) in the text format."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._handler: logging.StreamHandler[Any] | None = None

    def _ours(self) -> logging.StreamHandler[Any] | None:
        c: logging.Logger | None = request_log
        root = logging.root
        while c is not None and c is not root:
            if c.handlers or c.filters:
                return None
            c = c.parent if c.propagate else None
        if c is None or root.filters or len(root.handlers) != 1:
            return None
        h = root.handlers[0]
        if type(h) is not logging.StreamHandler or h.name != HANDLER_NAME or h.filters or h.level > logging.INFO:
            return None
        return h

    def request(self, f: Finished) -> bool:
        """Whether the request line of ``f`` was taken (else the caller logs it through ``logging``)."""
        h = self._ours()
        if h is None:
            return False
        fmt = h.formatter
        if type(fmt) is TextFormatter:
            line = fmt.request_line(f, time.time())
            if line is None:
                return False
        elif type(fmt) is JsonFormatter:
            line = fmt.request_line(f, time.time())
        else:
            return False
        if not self._pending:  # the turn's first line: its flush
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                return False
        self._pending.append(line)
        self._handler = h
        return True

    def flush(self) -> None:
        """Write what is gathered (also before a line that goes through logging, to keep the order)."""
        lines, self._pending = self._pending, []
        h = self._handler
        if not lines or h is None:
            return
        try:
            with h.lock:  # type: ignore[union-attr]
                stream = h.stream
                stream.write("\n".join(lines) + "\n")
                if stream and hasattr(stream, "flush"):  # StreamHandler.flush's own body (its lock is held)
                    stream.flush()
        except Exception:  # noqa: BLE001 - as logging does: a failed write never breaks a request
            if logging.raiseExceptions:
                sys.stderr.write("therouter: the request log could not be written\n")


_lines = _Lines()
atexit.register(_lines.flush)  # what the last turn of the loop gathered


def log_request(f: Finished) -> None:
    """The one INFO line per request."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    if not _lines.request(f):
        request_log.info("request", extra={"_fields": request_fields(f)})  # one entry for logging to copy
    if f.fallback_from:
        _lines.flush()  # (this one goes through logging: after the request line)
        request_log.info("fallback from %s to %s", f.fallback_from, f.provider, extra={
            "event": "fallback", "request_id": f.request_id, "model": f.requested or f.model,
            "served_model": f.model, "from_provider": f.fallback_from, "to_provider": f.provider,
            "attempts": f.attempts})


def request_fields(f: Finished) -> dict[str, Any]:
    """The request line's fields, in their order (the formatters' ``request_line`` write the same line from ``f``)."""
    u = f.usage
    return {
        "event": "request", "request_id": f.request_id, "generation_id": f.generation_id or None,
        "endpoint": f.endpoint or None, "key_id": f.key_id or None, "model": f.model or None,
        "provider": f.provider or None, "status": f.status,
        "prompt_tokens": u.prompt_tokens if u else 0, "completion_tokens": u.completion_tokens if u else 0,
        "cost_usd": nano_to_usd(f.cost_nano), "latency_ms": _ms(f.seconds), "ttft_ms": _ms(f.ttft),
        "attempts": f.attempts, "outcome": f.outcome,
        "error_code": f.error.code if f.error is not None else None,
    }


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def safe_url(url: str) -> str:
    """A Redis URL without its password (or user)."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
