"""The yardstick: a pass-through that does nothing else (no auth, no metering, no routing). FastAPI + aiohttp.

    BARE_UPSTREAM=http://127.0.0.1:PORT/v1/chat/completions uvicorn --app-dir bench bare:app --port 9000
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

UPSTREAM = os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:8001/v1/chat/completions")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4096)) as session:
        app.state.session = session
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    r = await app.state.session.post(UPSTREAM, data=body, headers={"content-type": "application/json"})
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        async def relay() -> AsyncIterator[bytes]:
            try:
                async for data in r.content.iter_any():
                    yield data
            finally:
                r.release()
        return StreamingResponse(relay(), status_code=r.status, media_type="text/event-stream")
    data = await r.read()
    return Response(data, status_code=r.status, media_type="application/json")
