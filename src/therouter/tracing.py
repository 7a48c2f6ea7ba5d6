"""Optional traces (OpenTelemetry), off by default.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (and ``pip install 'therouter[otel]'``), each completion request is one span
(``chat`` / ``completions``) with a child span per upstream attempt: the model, the provider and the attempt's
outcome on each child, the tokens on the attempt that served. Spans go to the OTLP/HTTP endpoint in batches from the
SDK's own thread; the standard ``OTEL_*`` variables (service name, headers, batch delay) apply.

When the variable is unset nothing here imports OpenTelemetry and the request path pays one ``is None`` test. The
current request's trace is a context variable, so an attempt made in a task the request started finds its parent.
Never a prompt, a completion or a secret in a span: names, counts, codes and times.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from therouter.errors import GatewayError
    from therouter.observability import Finished
    from therouter.routing.router import Candidate

log = logging.getLogger("therouter.tracing")


@dataclass(slots=True)
class _RequestTrace:
    root: Any
    serving: Any = None  # the attempt that served: ended with the request, when its tokens are known


_CURRENT: ContextVar[_RequestTrace | None] = ContextVar("therouter_trace", default=None)


class Tracing:
    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.tracer = provider.get_tracer("therouter")
        self._in = trace.set_span_in_context
        self._error = trace.Status(trace.StatusCode.ERROR)

    @classmethod
    def from_endpoint(cls, endpoint: str | None) -> Tracing | None:
        """A tracer exporting to ``endpoint`` over OTLP/HTTP, or None when it is unset or the SDK is missing."""
        if not endpoint:
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.error("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed "
                      "(pip install 'therouter[otel]'): no traces")
            return None
        provider = TracerProvider(resource=Resource.create({"service.name": "therouter"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("traces: OTLP/HTTP to %s", endpoint, extra={"event": "tracing"})
        return cls(provider)

    def begin(self, endpoint: str, request_id: str) -> None:
        span = self.tracer.start_span(endpoint, attributes={"therouter.request_id": request_id})
        _CURRENT.set(_RequestTrace(span))

    def attempt(self, cand: Candidate, err: GatewayError | None, seconds: float) -> None:
        """An attempt ended (an AttemptPolicy observer): a child of the request's span that started ``seconds``
        ago; the serving one stays open until the request ends."""
        trace = _CURRENT.get()
        if trace is None:
            return
        now = time.time_ns()
        span = self.tracer.start_span("upstream", context=self._in(trace.root), start_time=now - int(seconds * 1e9),
                                      attributes={"therouter.provider": cand.name, "therouter.model": cand.model_id,
                                                  "therouter.upstream_model": cand.dep.model,
                                                  "therouter.outcome": "ok" if err is None else str(err.code)})
        if err is None:
            trace.serving = span
            return
        span.set_status(self._error)
        span.end(end_time=now)

    def finish(self, f: Finished) -> None:
        trace = _CURRENT.get()
        if trace is None:
            return
        _CURRENT.set(None)
        attrs: dict[str, Any] = {"http.response.status_code": f.status, "therouter.outcome": f.outcome,
                                 "therouter.attempts": f.attempts}
        if f.model:
            attrs["therouter.model"] = f.model
        if f.provider:
            attrs["therouter.provider"] = f.provider
        if f.generation_id:
            attrs["therouter.generation_id"] = f.generation_id
        u = f.usage
        tokens = {} if u is None else {"therouter.prompt_tokens": u.prompt_tokens,
                                       "therouter.completion_tokens": u.completion_tokens,
                                       "therouter.cached_tokens": u.cached_tokens,
                                       "therouter.reasoning_tokens": u.reasoning_tokens}
        if trace.serving is not None:
            trace.serving.set_attributes(tokens)
            trace.serving.end()
        trace.root.set_attributes({**attrs, **tokens})
        if f.status >= 500:
            trace.root.set_status(self._error)
        trace.root.end()

    def shutdown(self) -> None:
        self.provider.shutdown()
