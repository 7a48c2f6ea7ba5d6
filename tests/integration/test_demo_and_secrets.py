"""The demo works as the README says, and secrets never leak into logs, errors, metrics or responses."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from therouter.redisproc import free_port
from tests.integration.conftest import CANARY, Fake, Gateway


def test_demo_starts_everything_and_serves_the_sdk(tmp_path: Path, repo_root: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "therouter", "demo", "--port", str(port), "--data-dir",
                             str(tmp_path / "demo")], cwd=repo_root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = ""
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while "Spend of the demo key" not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            out += line
        m = re.search(r"Demo key: (\S+)", out)
        assert m, out
        # the printed snippet is what a user would paste
        assert f"http://127.0.0.1:{port}/v1" in out and "curl" in out and "OpenAI(" in out
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=m.group(1), max_retries=0)
        r = client.chat.completions.create(model="deepseek/deepseek-v3.2",
                                           messages=[{"role": "user", "content": "Hello!"}])
        assert r.choices[0].message.content and r.usage and r.usage.total_tokens > 0
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="deepseek/deepseek-v3.2", messages=[{"role": "user", "content": "Hi"}], stream=True) if c.choices)
        assert text
        redis_files = list((tmp_path / "demo" / "redis").iterdir())
        assert redis_files, "the demo's redis keeps its data under the data folder"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    with socket.socket() as s:  # the gateway port is free again: everything it started has stopped
        s.bind(("127.0.0.1", port))


def test_canary_secret_never_leaks(gateway: Gateway, api_key: str, client: openai.OpenAI,
                                   fakes: dict[str, Fake]) -> None:
    """Drive success, fallback, upstream errors that echo headers, cut streams and bad input; then look for the
    provider key and the client key everywhere a user or an operator can see."""
    seen: list[str] = []
    msgs = [{"role": "user", "content": "hi"}]
    for kind in ("500", "401", "402", "429", "400", "cut", "in_band", "in_band_mid", "bad_json"):
        fakes["deepseek"].configure(error_kind=kind, echo_request=True)  # careless bodies: our key comes back
        for stream in (False, True):
            r = httpx.post(gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                           json={"model": "deepseek/deepseek-v3.2", "messages": msgs, "stream": stream})
            seen.append(r.text + str(dict(r.headers)))
    for f in fakes.values():
        f.configure(error_kind="503", echo_request=True)
    r = httpx.post(gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                   json={"model": "deepseek/deepseek-v3.2", "messages": msgs})
    seen.append(r.text + str(dict(r.headers)))
    seen.append(httpx.get(gateway.url + "/metrics").text)
    seen.append(httpx.get(gateway.url + "/ready").text)
    blob = "\n".join(seen) + gateway.logs()
    assert CANARY not in blob
    assert api_key not in blob
    assert api_key not in gateway.logs()
    # and the upstream did receive the canary as our credential
    assert fakes["deepseek"].last()["headers"]["authorization"] == "valid"

