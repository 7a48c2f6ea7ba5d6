"""``therouter fake-upstream`` command line: run the simulator under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import signal
import socket
import sys
from typing import Any

from therouter.fakeupstream.app import create_app
from therouter.fakeupstream.asgi import FakeConnectionCut
from therouter.fakeupstream.config import FLAVORS, KNOB_DEFAULTS, KNOB_HELP, FakeConfig, KnobError, merge_knobs

LISTENING_PREFIX = "fake-upstream listening on "


class _DropExpectedNoise(logging.Filter):
    """Connections dropped on purpose (fault ``cut``) or requests cancelled at shutdown are not errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (FakeConnectionCut, asyncio.CancelledError))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="therouter fake-upstream",
        description="Simulate a DeepSeek-, vLLM- or SGLang-flavoured OpenAI-compatible server.",
    )
    p.add_argument("--flavor", choices=FLAVORS, default="deepseek",
                   help="which server to imitate: its paths, usage fields and quirks (default: deepseek)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    p.add_argument("--models", default=None, help="comma-separated model ids ('*' accepts any)")
    p.add_argument("--seed", type=int, default=None, help="seed for error_rate sampling")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
    p.add_argument("--access-log", action="store_true", help="enable uvicorn access log (off by default)")
    knobs = p.add_argument_group("fault knobs (defaults; overridable per request with x-fault)")
    for name, default in KNOB_DEFAULTS.items():
        knobs.add_argument(
            "--" + name.replace("_", "-"),
            dest="knob_" + name,
            default=None,
            metavar="V",
            help=f"{KNOB_HELP[name]} (default: {default})",
        )
    return p


def config_from_args(args: argparse.Namespace) -> FakeConfig:
    explicit = {k[5:]: v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}
    knobs = merge_knobs(KNOB_DEFAULTS, explicit)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    return FakeConfig(flavor=args.flavor, api_key=args.api_key, models=models, seed=args.seed, **knobs)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (KnobError, ValueError) as exc:
        parser.error(str(exc))

    import uvicorn

    app = create_app(config)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    has_httptools = importlib.util.find_spec("httptools") is not None
    uv_config = uvicorn.Config(
        app,
        loop="uvloop" if has_uvloop else "asyncio",
        http="httptools" if has_httptools else "h11",
        lifespan="off",
        access_log=args.access_log,
        log_level=args.log_level,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=1,
        backlog=4096,
    )
    logging.getLogger("uvicorn.error").addFilter(_DropExpectedNoise())
    server = uvicorn.Server(uv_config)
    host_repr = f"[{args.host}]" if ":" in args.host else args.host

    async def serve() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.005)
        if server.started:
            sys.stdout.write(f"{LISTENING_PREFIX}http://{host_repr}:{port}\n")
            sys.stdout.flush()
        await task

    def request_exit(signum: int, frame: Any) -> None:
        # Active before uvicorn installs its own handlers (and again after it restores ours and
        # re-raises the captured signal): ask the server to stop instead of dying mid-startup.
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_exit)
    try:
        with asyncio.Runner(loop_factory=uv_config.get_loop_factory()) as runner:
            runner.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0 if server.started else 1
