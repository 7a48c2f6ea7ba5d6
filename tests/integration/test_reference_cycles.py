"""A request leaves no reference cycle behind in the gateway: what it allocated is freed when it ends, without the
cyclic garbage collector (which the server tunes to run rarely, ``server.tune_gc``; with cycles per request, the
collector's work grows with the load -- ~50 us of each JSON request's CPU in the benchmark before it was tuned).

The gateway runs under a launcher that keeps what the collector finds (``gc.DEBUG_SAVEALL``) and, on SIGUSR2, writes
the gateway's own objects among it (types from ``therouter`` or ``uvicorn``) to its log, then frees them."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import Fake, Gateway, make_key, own_config, running, start_gateway, wait_for
from therouter.redisproc import RedisProcess

LAUNCHER = r'''
import collections, gc, runpy, signal, sys

def report(*_):
    gc.collect()
    ours = collections.Counter()
    for o in gc.garbage:
        t = type(o)
        mod = getattr(o, "__module__", "") if t.__name__ in ("function", "method") else t.__module__
        if (mod or "").startswith(("therouter", "uvicorn")):
            ours[f"{mod}.{getattr(o, '__qualname__', t.__qualname__)}"] += 1
    sys.stderr.write(f"CYCLES {sum(ours.values())} {dict(ours.most_common(12))}\n")
    sys.stderr.flush()
    gc.set_debug(0)  # free what was kept, for good, before keeping again
    gc.garbage.clear()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)

gc.set_debug(gc.DEBUG_SAVEALL)
signal.signal(signal.SIGUSR2, report)
sys.argv = ["therouter", *sys.argv[1:]]
runpy.run_module("therouter", run_name="__main__")
'''


@pytest.fixture(scope="module")
def gw(redis_proc: RedisProcess, fakes: dict[str, Fake], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("cycles")
    launcher = tmp / "launcher.py"
    launcher.write_text(LAUNCHER)
    with running(start_gateway(own_config(redis_proc.url, fakes, tmp, "cyc"), tmp, launcher=launcher)) as g:
        yield g


def _cycles(gw: Gateway) -> str:
    """The next CYCLES report of the gateway (after SIGUSR2)."""
    before = gw.logs().count("CYCLES ")
    os.kill(gw.proc.pid, signal.SIGUSR2)
    wait_for(lambda: gw.logs().count("CYCLES ") > before, timeout=10)
    return re.findall(r"CYCLES .*", gw.logs())[-1]


async def test_requests_leave_no_reference_cycles(gw: Gateway, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=gw.v1, api_key=await make_key(gw, budget_nano=10 * 10**9, rpm=10_000), max_retries=0,
                           timeout=30)
    messages = [{"role": "user", "content": "hello"}]

    def some_requests() -> None:
        for _ in range(5):
            client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=messages)  # type: ignore[arg-type]
            stream = client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=messages,  # type: ignore[arg-type]
                                                    stream=True, stream_options={"include_usage": True})
            assert [c for c in stream]
            client.completions.create(model="deepseek/deepseek-v3.2", prompt="hi", max_tokens=5)

    some_requests()  # warm: caches, pools, the first connections
    _cycles(gw)  # what start-up left, dropped
    some_requests()
    report = _cycles(gw)
    assert report.startswith("CYCLES 0 "), report
