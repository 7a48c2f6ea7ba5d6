"""An SSE response that notices a client disconnect even while the upstream is silent, and a client that stops
reading.

The body is pumped in the request's task while one watcher waits for ``http.disconnect``
(:mod:`therouter.disconnect`) and cancels the pump, so a client that goes away closes the upstream within moments
(the gateway's generator then meters what was produced in a shielded ``finally``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from therouter import sse
from therouter.api.hints import Hints, hints_of
from therouter.disconnect import client_left, unless_gone, waiter
from therouter.errors import GatewayError, InternalError

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


class SSEResponse(Response):
    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str],
                 write_timeout: float = 60.0) -> None:
        self.events = events
        self.write_timeout = write_timeout
        self.status_code = 200
        self.background = None
        self.sse_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.hints: Hints | None = None  # our server's, when it gave them (api.hints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.hints = hints_of(scope)
        try:
            # pumped in this task, cancelled if the client leaves
            await unless_gone(self._pump(send), self.hints.gone if self.hints is not None else waiter(receive))
        except asyncio.CancelledError:
            if not client_left():
                raise  # a real cancellation (e.g. shutdown) goes on
        except OSError:
            pass  # the connection broke under a write: the client is gone
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + self.sse_headers})
        try:
            async for chunk in self.events:
                last = getattr(self.events, "ended", False)  # the stream's last chunk ends the response with it
                message = {"type": "http.response.body", "body": chunk, "more_body": not last}
                if self.hints is not None and self.hints.write_ready():
                    await send(message)  # (it cannot wait: no timer)
                else:
                    try:
                        # a client that stopped reading: the transport's buffer stays full and send() waits; past
                        # the write timeout the client is treated as gone (upstream closed, tokens so far metered)
                        async with asyncio.timeout(self.write_timeout):
                            await send(message)
                    except TimeoutError:
                        return
                if last:
                    return
        except GatewayError as e:
            await send({"type": "http.response.body", "body": sse.error_event(e), "more_body": True})
        except Exception:  # noqa: BLE001 - never a traceback on the wire; the gateway logged it
            await send({"type": "http.response.body", "body": sse.error_event(InternalError(
                "The server had an error while streaming your response.")), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


