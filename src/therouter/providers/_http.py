"""Upstream HTTP: the one place that talks to the network and maps foreign exceptions to GatewayErrors.

Three interchangeable transports sit behind :class:`Transport`:

- :class:`~therouter.providers._h1.H1Transport` (default, ``server.upstream_client: h1``): a lean HTTP/1.1 client on
  raw asyncio + httptools, ~4x cheaper per request than aiohttp's client (no task, header multidict or tracing hooks
  per request).
- :class:`AiohttpTransport` (``aiohttp``): an aiohttp ``ClientSession`` per provider; roughly 10x the throughput of
  httpx's pool on this class of machine.
- :class:`HttpxTransport` (``httpx``): ``httpx.AsyncClient``; used where respx serves best (adapter unit tests).

Redirects are never followed. Content-encoding is undone here, by us (``_decode``), never by the client library, so
a compressed body never inflates past the limit its reader sets. Responses are exposed as decoded byte chunks;
nothing here parses JSON or SSE.

Errors carry our own words in ``message`` (what a client may see) and the foreign text in ``detail`` (logs and
attempt records only): an OS error can name addresses, an upstream body can hold anything.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import httpx

from therouter.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRequestRejected,
    UpstreamStreamError,
    UpstreamTimeout,
)
from therouter.providers._decode import ACCEPT_ENCODING, ContentDecoder
from therouter.providers._sanitize import redact, sanitize

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # bytes of a decoded non-stream body (server.max_upstream_body_bytes)


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes = b""
    # filled by the adapter: facts the gateway needs about what was sent
    meta: dict[str, object] = field(default_factory=dict)


class UpstreamResponse(ABC):
    status: int
    headers: Mapping[str, str]

    @abstractmethod
    def raw_chunks(self) -> AsyncIterator[bytes]:
        """The body as it came off the wire (content-encoding not undone); a broken connection raises."""

    @abstractmethod
    async def close(self) -> None: ...

    def buffered(self) -> bool:
        """Whether the whole body has arrived already, so reading it will not wait (the caller needs no timer)."""
        return False

    def ready(self) -> bool:
        """Whether the next piece of the body is here already (or its end, or an error): the next read will not
        wait, so the caller needs no timer for it. False when unsure."""
        return False

    async def chunks(self, raw_limit: int | None = None) -> AsyncGenerator[bytes, None]:
        """The decoded body, in pieces of bounded size however well it was compressed (and UpstreamBadResponse once
        more than ``raw_limit`` bytes came off the wire)."""
        decoder = ContentDecoder(self.headers.get("content-encoding"))
        raw_size = 0
        async for raw in self.raw_chunks():
            raw_size += len(raw)
            if raw_limit is not None and raw_size > raw_limit:
                raise _too_large(f"body is over the {raw_limit}-byte limit ({decoder.encoding})")
            for piece in decoder.feed(raw):
                yield piece
        for piece in decoder.flush():
            yield piece

    async def read(self, limit: int = DEFAULT_MAX_BODY) -> bytes:
        """The whole decoded body, or UpstreamBadResponse as soon as it (or its compressed form) passes ``limit``:
        at most ``limit`` bytes plus one piece are ever held."""
        declared = self.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(f"content-length {declared} is over the {limit}-byte limit")
        parts: list[bytes] = []
        size = 0
        async with aclosing(self.chunks(raw_limit=limit)) as pieces:
            async for piece in pieces:
                size += len(piece)
                if size > limit:
                    raise _too_large(f"decoded body is over the {limit}-byte limit")
                parts.append(piece)
        return b"".join(parts)


def _too_large(detail: str) -> UpstreamBadResponse:
    return UpstreamBadResponse("The provider sent a response larger than the gateway accepts.", sent=True,
                               code="upstream_response_too_large", detail=detail)


def _broke(e: BaseException) -> UpstreamStreamError:
    return UpstreamStreamError("The connection to the provider broke.", sent=True, detail=f"{type(e).__name__}: {e}")


def _wire_headers(req: UpstreamRequest) -> dict[str, str]:
    """What is sent: the request's headers, advertising only the content-encodings we decode ourselves."""
    h = {k: v for k, v in req.headers.items() if k.lower() != "accept-encoding"}
    h["accept-encoding"] = ACCEPT_ENCODING
    return h


class Transport(ABC):
    @abstractmethod
    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        """Send and wait for the status line and headers. Raises UpstreamConnectError / UpstreamTimeout."""

    @abstractmethod
    async def aclose(self) -> None: ...


# our words for transport failures (the foreign text goes to ``detail``)
_CONNECT = "Could not connect to the provider."
_CONNECT_TIMEOUT = "Connecting to the provider timed out."
_NO_ANSWER = "The provider did not answer in time."
_CLOSED = "The provider closed the connection."
_FAILED = "The request to the provider failed."


# ---- aiohttp --------------------------------------------------------------------------------------------------------


class _AiohttpResponse(UpstreamResponse):
    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers

    async def raw_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, ConnectionError, OSError) as e:
            raise _broke(e) from None

    async def close(self) -> None:
        self._resp.close()  # drops the connection if the body was not fully read: cancels the upstream work


class AiohttpTransport(Transport):
    def __init__(self, max_connections: int = 512) -> None:
        self._max = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _get(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily inside the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max, ttl_dns_cache=300, enable_cleanup_closed=True),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,  # ours to do, bounded (_decode)
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        session = self._get()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, connect=connect)
        try:
            async with asyncio.timeout(headers_timeout):
                resp = await session.request(
                    req.method, req.url, data=req.body or None, headers=_wire_headers(req),
                    allow_redirects=False, timeout=timeout,
                )
        except aiohttp.ServerTimeoutError:
            # before TimeoutError: aiohttp's connect timeout subclasses it, but nothing was sent (no sock_read is set)
            raise UpstreamConnectError(_CONNECT_TIMEOUT, detail="connect timed out") from None
        except TimeoutError:
            raise UpstreamTimeout(_NO_ANSWER, sent=True, detail="no response headers in time") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamConnectError(_CONNECT, detail=_oserror(e.os_error)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
            raise UpstreamConnectError(_CLOSED, sent=True, detail=f"{type(e).__name__}: {e}") from None
        except aiohttp.ClientError as e:
            raise UpstreamConnectError(_FAILED, sent=True, detail=f"{type(e).__name__}: {e}") from None
        return _AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---- httpx ----------------------------------------------------------------------------------------------------------


class _HttpxResponse(UpstreamResponse):
    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers = resp.headers

    async def raw_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_raw():  # not aiter_bytes: decoding is ours, bounded
                yield chunk
        except httpx.HTTPError as e:
            raise _broke(e) from None

    async def close(self) -> None:
        await self._resp.aclose()


class HttpxTransport(Transport):
    def __init__(self, max_connections: int = 512, client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            timeout=httpx.Timeout(None),
        )

    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        request = self._client.build_request(
            req.method, req.url, content=req.body or None, headers=_wire_headers(req),
            timeout=httpx.Timeout(None, connect=connect),
        )
        try:
            async with asyncio.timeout(headers_timeout):
                resp = await self._client.send(request, stream=True, follow_redirects=False)
        except TimeoutError:
            raise UpstreamTimeout(_NO_ANSWER, sent=True, detail="no response headers in time") from None
        except httpx.ConnectTimeout:
            raise UpstreamConnectError(_CONNECT_TIMEOUT, detail="connect timed out") from None
        except httpx.ConnectError as e:
            raise UpstreamConnectError(_CONNECT, detail=f"{type(e).__name__}: {e}") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout(_NO_ANSWER, sent=True, detail="no response headers in time") from None
        except httpx.HTTPError as e:
            raise UpstreamConnectError(_FAILED, sent=True, detail=f"{type(e).__name__}: {e}") from None
        return _HttpxResponse(resp)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_transport(kind: str, max_connections: int) -> Transport:
    if kind == "httpx":
        return HttpxTransport(max_connections)
    if kind == "h1":
        from therouter.providers._h1 import H1Transport  # here: _h1 imports this module

        return H1Transport(max_connections)
    return AiohttpTransport(max_connections)


def _oserror(e: OSError | None) -> str:
    if e is None:
        return "connection failed"
    return f"{type(e).__name__}: {e.strerror or e}"  # strerror may name the address: detail only


# ---- upstream status + body -> GatewayError ----------------------------------------------------------------------

# The one sanitiser of upstream text (``sanitize``, for the client) and ``redact`` (for logs and records) live in
# ``_sanitize`` and are used here and by ``base.Provider``.


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            v = float(ms)
            if math.isfinite(v):  # "nan" / "inf" parse as floats but are no delay (and crash math.ceil later)
                return max(v / 1000.0, 0.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            v = float(ra)
            return max(v, 0.0) if math.isfinite(v) else None
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra)
                return max((when - datetime.now(UTC)).total_seconds(), 0.0)
            except (TypeError, ValueError):
                return None
    return None


_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PARAM = re.compile(r"[A-Za-z0-9_.\[\]\-]{1,128}")


def error_from_upstream(
    status: int, message: str, code: str | None, param: str | None, headers: Mapping[str, str], *,
    secrets: tuple[str, ...] = (), in_stream: bool = False,
) -> GatewayError:
    """One readable table: which upstream answers are the client's fault and which are the provider's.

    ``message`` is the upstream's own text, untrusted. Only a 4xx that explains the client's mistake shows it to the
    client, sanitised; every other answer gets our own words (the provider is named by its config name where the
    error is rendered: ``routing.attempts.all_failed``, the gateway's mid-stream event). The full text, secrets
    redacted, rides in ``detail`` for the log and the attempt record.
    """
    low = message.lower()
    # an upstream's code / param reach the client (and code a metric label) as they are: only identifier-shaped,
    # secret-free ones do
    code = code if code and _TOKEN.fullmatch(code) and redact(code, secrets) == code else None
    param = param if param and _PARAM.fullmatch(param) and redact(param, secrets) == param else None
    how = f"error {status} in its stream" if in_stream else f"HTTP {status}"
    detail = redact(f"{how}: {message}" if message else how, secrets)
    if status in (401, 403, 402):
        # our credentials or our balance at the provider: fall back, alert, never show the client a 401/402
        return UpstreamAuthError(f"The provider refused the gateway's credentials or account ({how}).", sent=True,
                                 detail=detail)
    if status == 429:
        return UpstreamRateLimited(f"The provider is rate limiting the gateway ({how}).", sent=True, detail=detail,
                                   retry_after=retry_after_seconds(headers))
    if status == 408 or status >= 500:
        return UpstreamError(f"The provider failed ({how}).", sent=True, detail=detail,
                             retry_after=retry_after_seconds(headers))
    if status == 404 or "model not exist" in low or "model_not_found" in (code or ""):
        # the deployment names a model the host does not serve: a config fault, another deployment may work
        return UpstreamError(f"The provider does not serve the configured model ({how}).", sent=True, detail=detail,
                             retryable=False)
    if 400 <= status < 500:
        shown = sanitize(message, secrets)
        if "maximum context length" in low or "context length" in low or "context_length" in (code or ""):
            return UpstreamRequestRejected(shown or "The request is longer than the model's context length.",
                                           code="context_length_exceeded", param=param or "messages", detail=detail)
        return UpstreamRequestRejected(shown or f"The provider rejected the request ({how}).",
                                       code=code or "invalid_request_error", param=param,
                                       status=413 if status == 413 else 400, detail=detail)
    return UpstreamBadResponse(f"The provider answered with an unexpected status ({how}).", sent=True, detail=detail)
