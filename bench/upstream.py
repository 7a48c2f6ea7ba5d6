"""The nginx fake upstream of the benchmark: a DeepSeek-like chat completion, as one JSON answer or as a fixed
52-event SSE stream, chosen by the request body's ``"stream": true`` (Debian's njs module reads the body and
returns one of two fixed answers from memory).

Everything lives in a private folder (config, njs script, pid, logs, temp paths): ``nginx -p DIR -c DIR/nginx.conf
-e DIR/error.log -g 'daemon off;'``; nothing under /etc or /var is read or written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
UPSTREAM_MODEL = "deepseek-v3.2"
CREATED = 1764400000
FINGERPRINT = "fp_ffc7281d48_prod0820_fp8_kvcache"
PROMPT_TOKENS = 12
CONTENT_CHUNKS = 50
# what the benchmark asks: DeepSeek's answers carry usage both ways, and this is the limit the gateway bounds them by
MAX_TOKENS = 64
USAGE = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CONTENT_CHUNKS,
         "total_tokens": PROMPT_TOKENS + CONTENT_CHUNKS, "prompt_tokens_details": {"cached_tokens": 0},
         "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": PROMPT_TOKENS}
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def content() -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(CONTENT_CHUNKS)]


def json_answer() -> str:
    """DeepSeek's non-stream chat.completion, with usage."""
    return _dumps({
        "id": "5f3c1a52-7a8e-4c1b-9d21-3b6e0f2a9c11", "object": "chat.completion", "created": CREATED,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(content())},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE, "system_fingerprint": FINGERPRINT}) + "\n"


def sse_events() -> list[str]:
    """DeepSeek's stream: a role chunk, 50 content chunks, the finish chunk carrying usage (52 data events), then
    ``data: [DONE]``. Chunks before the last say ``"usage": null``, as DeepSeek's do."""
    def chunk(delta: dict[str, str], finish: str | None = None, usage: object = None) -> str:
        return "data: " + _dumps({
            "id": "8c2e6b90-1f4d-4a7e-b3c5-0d9a7e6f5b21", "object": "chat.completion.chunk", "created": CREATED,
            "model": UPSTREAM_MODEL, "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": usage}) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in content()]
    events.append(chunk({"content": ""}, "stop", USAGE))
    events.append("data: [DONE]\n\n")
    return events


def sse_answer() -> str:
    return "".join(sse_events())


def models_answer() -> str:
    return _dumps({"object": "list", "data": [{"id": UPSTREAM_MODEL, "object": "model", "owned_by": "deepseek"}]})


def njs_script() -> str:
    """The njs handler: js_content reads the whole body first; its "stream" field picks the fixed answer, which the
    script holds as constants (made once when nginx loads it) and returns from memory."""
    return f"""\
const JSON_ANSWER = {json.dumps(json_answer())};
const SSE_ANSWER = {json.dumps(sse_answer())};
const STREAM = /"stream"\\s*:\\s*true/;

function chat(r) {{
    if (STREAM.test(r.requestText || '')) {{
        r.headersOut['Content-Type'] = 'text/event-stream';
        r.headersOut['Cache-Control'] = 'no-cache';
        r.return(200, SSE_ANSWER);
    }} else {{
        r.headersOut['Content-Type'] = 'application/json';
        r.return(200, JSON_ANSWER);
    }}
}}

function models(r) {{
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, {json.dumps(models_answer())});
}}

export default {{chat, models}};
"""


def write_config(folder: Path, port: int) -> Path:
    """nginx.conf (one worker, access log off, every path inside ``folder``) and the njs script; returns the conf."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)  # nginx's worker (nobody, when started as root) reads the njs script here
    (folder / "upstream.js").write_text(njs_script())
    temp = " ".join(f"{d}_temp_path {folder / d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = f"""\
load_module {NJS_MODULE};
worker_processes 1;
pid {folder / 'nginx.pid'};
error_log {folder / 'error.log'} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    {temp}
    client_body_buffer_size 64k;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    js_path {folder};
    js_import up from upstream.js;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ /chat/completions$ {{ js_content up.chat; }}
        location ~ /models$ {{ js_content up.models; }}
        location = /health {{ return 200 'ok'; }}
    }}
}}
"""
    path = folder / "nginx.conf"
    path.write_text(conf)
    return path


def command(folder: Path, conf: Path) -> list[str]:
    return ["nginx", "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf), "-g", "daemon off;"]
