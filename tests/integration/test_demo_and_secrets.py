"""The demo works as the README says, and secrets never leak into logs, errors, metrics or responses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai

from tests.integration.conftest import CANARY, Fake, Gateway
from therouter.redisproc import free_port


def demo(port: int, data_dir: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "therouter", "demo", "--port", str(port), "--data-dir",
                             str(data_dir)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def operator_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`therouter ...` as an operator runs it in the repo after pasting the demo's export line (default config)."""
    base = {k: v for k, v in os.environ.items() if k not in ("THEROUTER_CONFIG", "REDIS_URL", "THEROUTER_ADMIN_KEY")}
    return subprocess.run([sys.executable, "-m", "therouter", *args], cwd=cwd, env={**base, **env}, check=False,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def processes_mentioning(needle: str) -> list[int]:
    """Live processes whose command line or working directory mentions ``needle`` (redis-server renames itself,
    but runs in its data folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if needle in cmdline or needle in cwd:
            found.append(int(proc.name))
    return found


def test_demo_starts_everything_and_serves_the_sdk(tmp_path: Path, repo_root: Path) -> None:
    port = free_port()
    proc = demo(port, tmp_path / "demo", repo_root)
    try:
        out = ""
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while "/admin/keys" not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            out += line
        m = re.search(r"Demo key: (\S+)", out)
        assert m, out
        # it said what it was doing while it started
        for step in ("starting a private redis-server", "starting simulated DeepSeek, vLLM, SGLang and Anthropic upstreams",
                     "creating a demo key", f"starting the gateway on http://127.0.0.1:{port}"):
            assert re.search(re.escape(step) + r".*\.\.\. ok", out), out
        # the printed snippet is what a user would paste
        assert f"http://127.0.0.1:{port}/v1" in out and "curl" in out and "OpenAI(" in out
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=m.group(1), max_retries=0)
        r = client.chat.completions.create(model="deepseek/deepseek-v3.2",
                                           messages=[{"role": "user", "content": "Hello!"}])
        assert r.choices[0].message.content and r.usage and r.usage.total_tokens > 0
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="deepseek/deepseek-v3.2", messages=[{"role": "user", "content": "Hi"}], stream=True) if c.choices)
        assert text
        # Claude Code's settings (base URL + token + a claude-* id) against the demo: deepseek/deepseek-v3.2 serves
        assert "ANTHROPIC_BASE_URL=" in out and "anthropic.Anthropic(" in out
        # (closed here, so its connection's TIME_WAIT is the client's and the gateway's port is free at the end)
        with anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", auth_token=m.group(1), max_retries=0) as claude:
            msg = claude.messages.with_raw_response.create(model="claude-sonnet-4-6", max_tokens=64,
                                                            messages=[{"role": "user", "content": "Hello!"}])
        assert msg.headers["x-therouter-provider"] == "deepseek" and msg.parse().content[0].type == "text"
        redis_files = list((tmp_path / "demo" / "redis").iterdir())
        assert redis_files, "the demo's redis keeps its data under the data folder"

        # the export line points the CLI and the admin endpoints at the demo's own Redis
        export = re.search(r"export REDIS_URL=(\S+) THEROUTER_ADMIN_KEY=(\S+)", out)
        assert export, out
        env = {"REDIS_URL": export.group(1), "THEROUTER_ADMIN_KEY": export.group(2)}
        listing = operator_cli(repo_root, env, "keys", "list")
        assert listing.returncode == 0 and re.search(r"key_\w+ +demo ", listing.stdout), listing.stdout
        usage = operator_cli(repo_root, env, "usage", "--json", "--group-by", "key")
        assert [(u["key_name"], u["requests"]) for u in json.loads(usage.stdout)["data"]] == [("demo", 3)]
        keys = httpx.get(f"http://127.0.0.1:{port}/admin/keys", timeout=10,
                         headers={"Authorization": f"Bearer {env['THEROUTER_ADMIN_KEY']}"})
        assert keys.status_code == 200 and [k["name"] for k in keys.json()["data"]] == ["demo"]

        # one demo per data folder: a second one is refused before it starts anything
        other = free_port()
        second = demo(other, tmp_path / "demo", repo_root)
        said, _ = second.communicate(timeout=60)
        assert second.returncode == 1 and "another `therouter demo`" in said and "--data-dir" in said, said
        with socket.socket() as s:
            s.bind(("127.0.0.1", other))  # it let its port go
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
    assert processes_mentioning(str(tmp_path)) == []


def test_demo_refuses_a_busy_port_and_starts_nothing(tmp_path: Path, repo_root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fakes_before = set(processes_mentioning("therouter.fakeupstream"))
        proc = demo(port, tmp_path / "demo", repo_root)
        said, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = said.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "Nothing was started" in lines[0], said
    assert "Traceback" not in said
    assert not (tmp_path / "demo").exists()  # no data folder, no lock, no redis
    assert processes_mentioning(str(tmp_path)) == []
    assert set(processes_mentioning("therouter.fakeupstream")) <= fakes_before


def test_demo_script_checks_the_port_before_installing(tmp_path: Path, repo_root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(["bash", str(repo_root / "scripts" / "demo.sh")], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PORT": str(port), "PYTHON": sys.executable},
                           stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 1 and f"port {port}" in r.stderr and "installing" not in r.stdout + r.stderr, r


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

