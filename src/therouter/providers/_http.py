"""Upstream HTTP: the one place that talks to the network and maps foreign exceptions to GatewayErrors.

Two interchangeable transports sit behind :class:`Transport`:

- :class:`AiohttpTransport` (default): an aiohttp ``ClientSession`` per provider; roughly 10x the throughput of httpx's
  pool on this class of machine.
- :class:`HttpxTransport`: ``httpx.AsyncClient``; used where respx serves best (adapter unit tests) and available by
  config (``server.upstream_client: httpx``).

Redirects are never followed. Responses are exposed as raw byte chunks; nothing here parses JSON or SSE.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator, Mapping

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
    def chunks(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def read(self) -> bytes: ...

    @abstractmethod
    async def close(self) -> None: ...


class Transport(ABC):
    @abstractmethod
    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        """Send and wait for the status line and headers. Raises UpstreamConnectError / UpstreamTimeout."""

    @abstractmethod
    async def aclose(self) -> None: ...


# ---- aiohttp --------------------------------------------------------------------------------------------------------


class _AiohttpResponse(UpstreamResponse):
    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, ConnectionError, OSError) as e:
            raise UpstreamStreamError(f"upstream connection broke: {type(e).__name__}", sent=True) from None

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (aiohttp.ClientError, ConnectionError, OSError) as e:
            raise UpstreamStreamError(f"upstream connection broke: {type(e).__name__}", sent=True) from None

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
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def send(self, req: UpstreamRequest, *, connect: float, headers_timeout: float) -> UpstreamResponse:
        session = self._get()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, connect=connect)
        try:
            async with asyncio.timeout(headers_timeout):
                resp = await session.request(
                    req.method, req.url, data=req.body or None, headers=req.headers,
                    allow_redirects=False, timeout=timeout,
                )
        except aiohttp.ServerTimeoutError:
            # before TimeoutError: aiohttp's connect timeout subclasses it, but nothing was sent (no sock_read is set)
            raise UpstreamConnectError("upstream connect timed out") from None
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time", sent=True) from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamConnectError(f"cannot connect to upstream: {_oserror(e.os_error)}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
            raise UpstreamConnectError(f"upstream closed the connection: {type(e).__name__}", sent=True) from None
        except aiohttp.ClientError as e:
            raise UpstreamConnectError(f"upstream request failed: {type(e).__name__}", sent=True) from None
        return _AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---- httpx ----------------------------------------------------------------------------------------------------------


class _HttpxResponse(UpstreamResponse):
    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers = resp.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_bytes():
                yield chunk
        except httpx.HTTPError as e:
            raise UpstreamStreamError(f"upstream connection broke: {type(e).__name__}", sent=True) from None

    async def read(self) -> bytes:
        try:
            return await self._resp.aread()
        except httpx.HTTPError as e:
            raise UpstreamStreamError(f"upstream connection broke: {type(e).__name__}", sent=True) from None

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
            req.method, req.url, content=req.body or None, headers=req.headers,
            timeout=httpx.Timeout(None, connect=connect),
        )
        try:
            async with asyncio.timeout(headers_timeout):
                resp = await self._client.send(request, stream=True, follow_redirects=False)
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time", sent=True) from None
        except httpx.ConnectTimeout:
            raise UpstreamConnectError("upstream connect timed out") from None
        except httpx.ConnectError as e:
            raise UpstreamConnectError(f"cannot connect to upstream: {type(e).__name__}") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout("upstream did not answer in time", sent=True) from None
        except httpx.HTTPError as e:
            raise UpstreamConnectError(f"upstream request failed: {type(e).__name__}", sent=True) from None
        return _HttpxResponse(resp)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_transport(kind: str, max_connections: int) -> Transport:
    if kind == "httpx":
        return HttpxTransport(max_connections)
    return AiohttpTransport(max_connections)


def _oserror(e: OSError | None) -> str:
    if e is None:
        return "connection failed"
    return e.strerror or type(e).__name__


# ---- upstream status + body -> GatewayError ----------------------------------------------------------------------

_SECRETISH = re.compile(r"(?i)(bearer\s+)?\b(sk|tr|key)-[A-Za-z0-9_\-]{6,}")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
    return _SECRETISH.sub("[redacted]", text)[:2000]


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
                return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)
            except (TypeError, ValueError):
                return None
    return None


def error_from_upstream(
    status: int, message: str, code: str | None, param: str | None, headers: Mapping[str, str]
) -> GatewayError:
    """One readable table: which upstream answers are the client's fault and which are the provider's."""
    low = message.lower()
    if status in (401, 403, 402):
        # our credentials or our balance at the provider: fall back, alert, never show the client a 401/402
        return UpstreamAuthError(f"provider refused our credentials or account (HTTP {status})", sent=True)
    if status == 429:
        return UpstreamRateLimited(
            "upstream rate limit reached", sent=True, retry_after=retry_after_seconds(headers)
        )
    if status == 408 or status >= 500:
        return UpstreamError(f"upstream error (HTTP {status}): {message}"[:500], sent=True,
                             retry_after=retry_after_seconds(headers))
    if status == 404 or "model not exist" in low or "model_not_found" in (code or ""):
        # the deployment names a model the host does not serve: a config fault, another deployment may work
        err = UpstreamError(f"upstream does not serve the configured model: {message}"[:500], sent=True)
        err.retryable = False
        return err
    if 400 <= status < 500:
        if "maximum context length" in low or "context length" in low or "context_length" in (code or ""):
            return UpstreamRequestRejected(message, code="context_length_exceeded", param=param or "messages")
        return UpstreamRequestRejected(message or f"upstream rejected the request (HTTP {status})",
                                       code=code or "invalid_request_error", param=param,
                                       status=413 if status == 413 else 400)
    return UpstreamBadResponse(f"unexpected upstream status {status}", sent=True)
