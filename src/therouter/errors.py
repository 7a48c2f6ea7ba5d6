"""The GatewayError tree.

Every failure the gateway can report is one of these. Each carries the HTTP status, OpenAI's error `type` and `code`,
the offending `param`, and two routing flags:

- ``retryable``: the same deployment may succeed if tried again (after a backoff);
- ``fallback_ok``: another deployment may succeed (the fault is the provider's, not the request's).

``GatewayError.body()`` is the OpenAI error shape. `api/errors.py` renders a raised error as the HTTP answer (OpenAI's
shape, or Anthropic's on the Messages paths) and as an SSE error event when the ASGI stream fails; a stream that breaks
after its first byte is ended with an error event by the code that owns it (`gateway.py`'s stream pump,
`anthropic_surface.MessageStream.error`), and `server.py` answers 408 itself when request headers never complete.
What reaches the client is ``message`` only: our own words, or an upstream 4xx explanation after
``providers._sanitize.sanitize``. ``detail`` is internal (the full upstream text with secrets redacted): it goes to the
log and the attempt record, never into a response.
"""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"
    retryable: bool = False
    fallback_ok: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
        detail: str | None = None,
        retryable: bool | None = None,
        fallback_ok: bool | None = None,
    ) -> None:
        """``retryable`` / ``fallback_ok`` override the class's flags for this one error: what happens after it is
        decided when it is built, never by changing it afterwards."""
        super().__init__(message)
        self.message = message
        self.detail = detail  # internal only: never rendered (see body())
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self.retry_after = retry_after
        if retryable is not None:
            self.retryable = retryable
        if fallback_ok is not None:
            self.fallback_ok = fallback_ok

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the client's fault (never retried, never falls back) -------------------------------------------------------


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class RequestTimeout(GatewayError):
    """408: the client did not deliver its request (headers or body) in time."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestHeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class BudgetExceeded(GatewayError):
    """402: SDKs do not retry it (they would retry a 429)."""

    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str = "rpm", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.limit = limit  # which of the key's limits refused: rpm | tpm (a metric label)


# ---- our side ------------------------------------------------------------------------------------------------------


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class StoreUnavailable(ServiceUnavailable):
    code = "store_unavailable"


# ---- upstream faults: mapped in providers/_http.py ------------------------------------------------------------------


class UpstreamError(GatewayError):
    """A failure attributed to an upstream deployment."""

    status = 502
    type = "server_error"
    code = "upstream_error"
    retryable = True
    fallback_ok = True

    def __init__(self, message: str, *, sent: bool = False, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        # True once the request body may have reached the provider (it may bill us): recorded as possibly_accepted.
        self.sent = sent


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "requests"
    code = "upstream_rate_limited"


class UpstreamAuthError(UpstreamError):
    """Our credentials or our balance at the provider (401/403/402): the provider's fault, never the client's."""

    status = 502
    code = "upstream_auth_error"
    retryable = False


class UpstreamBadResponse(UpstreamError):
    """An answer we cannot use: wrong shape, not JSON, over a size limit, undecodable content-encoding."""

    code = "bad_upstream_response"


class UpstreamStreamError(UpstreamError):
    """The stream's connection broke or closed early after it started."""

    code = "upstream_stream_error"


class UpstreamRequestRejected(GatewayError):
    """The upstream refused the request itself (4xx): its explanation, sanitised, goes to the client; no fallback."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class NoDeploymentAvailable(GatewayError):
    status = 503
    type = "server_error"
    code = "no_deployment_available"


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"
