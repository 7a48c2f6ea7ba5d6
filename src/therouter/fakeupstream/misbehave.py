"""Answers of a misbehaving upstream: careless error bodies, wrong shapes, oversized lines and bodies, gzip bombs.

Each is a pure function of the normal answer (or of the request), used by ``writers`` when a knob asks for it.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any
from urllib.parse import quote

import orjson

from therouter.fakeupstream.asgi import Headers

#: what a careless server adds to its error messages besides the request's headers
ECHO_URL = "http://10.20.30.40:8000/internal/v1/chat/completions"
ECHO_PEER = "10.20.30.40:8000"
ECHO_PATH = "/srv/fake-upstream/config/server.yaml"
ECHO_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/fake-upstream/app/handlers.py", line 42, in generate\n'
    "    result = await engine.run(request)\n"
    '  File "/srv/fake-upstream/app/engine.py", line 7, in run\n'
    "    raise RuntimeError(state)\n"
    "RuntimeError: engine failure on worker gpu-0"
)


def echo_message(message: str, headers: Headers, body: dict[str, Any]) -> str:
    """``message`` plus everything a careless server dumps: the request's headers as received (Authorization
    included, and its token base64- and URL-encoded as debug dumps do), the start of the prompt, a URL, an IP:port,
    a file path, a traceback."""
    hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    token = hdrs.get("authorization", "").removeprefix("Bearer ")
    dump = orjson.dumps(hdrs).decode()
    return (
        f"{message}. Request headers: {dump}. Prompt: {_prompt(body)[:200]!r}. "
        f"auth_b64={base64.b64encode(token.encode()).decode()} auth_url={quote(token, safe='')} "
        f"while calling {ECHO_URL} (peer {ECHO_PEER}), config {ECHO_PATH}\n{ECHO_TRACEBACK}"
    )


def _prompt(body: dict[str, Any]) -> str:
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
        return str(msgs[0].get("content"))
    return str(body.get("prompt", ""))


# ---- wrong shapes ------------------------------------------------------------------------------------------------


def _misshape(obj: dict[str, Any], variant: str, *, stream: bool) -> Any:
    """The same answer with one field of the wrong type (or not an object at all)."""
    if variant == "chunk_int":
        return 5
    if variant == "chunk_str":
        return "x"
    if variant == "chunk_list":
        return []
    if variant == "choices_int":
        obj["choices"] = 5
    elif variant == "choice_not_object":
        obj["choices"] = [5]
    elif variant == "usage_int":
        obj["usage"] = 5
    else:
        choices = obj.get("choices") or [{"index": 0}]
        obj["choices"] = choices
        first = choices[0]
        key = "delta" if stream else "message"
        if variant == "delta_not_object":
            first[key] = 5
        else:
            inner = first.get(key) if isinstance(first.get(key), dict) else {}
            first[key] = inner
            if variant == "content_int":
                inner["content"] = 5
            elif variant == "tool_calls_int":
                inner["tool_calls"] = 5
            elif variant == "tool_call_not_object":
                inner["tool_calls"] = [5]
    return obj


def misshape_event(event: bytes, variant: str) -> bytes:
    """An encoded ``data: {...}\\n\\n`` event with the wrong shape."""
    obj = orjson.loads(event[len(b"data: "):])
    return b"data: " + orjson.dumps(_misshape(obj, variant, stream=True)) + b"\n\n"


def misshape_body(payload: bytes, variant: str) -> bytes:
    return orjson.dumps(_misshape(orjson.loads(payload), variant, stream=False))


# ---- oversized -----------------------------------------------------------------------------------------------------


def huge_event_pieces(model: str, size: int, piece: int = 64 * 1024) -> list[bytes]:
    """One valid SSE event of about ``size`` bytes on a single line, cut into network-sized pieces."""
    head = b'data: {"id":"huge","object":"chat.completion.chunk","created":1,"model":' + orjson.dumps(model)
    head += b',"choices":[{"index":0,"delta":{"content":"'
    tail = b'"},"finish_reason":null}]}\n\n'
    body = head + b"A" * max(size - len(head) - len(tail), 0) + tail
    return [body[i:i + piece] for i in range(0, len(body), piece)]


def huge_body(size: int) -> bytes:
    """A valid non-stream answer of about ``size`` bytes."""
    head = b'{"id":"huge","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    head += b'"message":{"role":"assistant","content":"'
    tail = b'"},"finish_reason":"stop"}]}'
    return head + b"A" * max(size - len(head) - len(tail), 0) + tail


def gzip_bomb(size: int, *, stream: bool) -> bytes:
    """gzip of an answer that inflates to ``size`` bytes (~1000:1), built without holding it: a stream is one
    endless SSE line, a non-stream body one endless JSON string."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = b"data: " if stream else b'{"id":"bomb","choices":[{"index":0,"message":{"content":"'
    out = [z.compress(head)]
    block = b"0" * (1024 * 1024)
    left = size
    while left > 0:
        out.append(z.compress(block[:left]))
        left -= len(block)
    out.append(z.compress(b"" if stream else b'"}}]}'))
    out.append(z.flush())
    return b"".join(out)
