"""A client leaving cancels the work it guards, from the ASGI messages or from the server's signal, alike."""

from __future__ import annotations

import asyncio

import pytest

from therouter.disconnect import Signal, client_left, unless_gone, waiter


async def _guarded(gone_after: float | None, *, fired_before: bool = False, use_signal: bool) -> str:
    """Work of 0.2 s guarded by a client who leaves after ``gone_after`` s (None: never)."""
    signal = Signal()
    left = asyncio.Event()

    async def receive() -> dict[str, str]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def leave() -> None:
        if gone_after is None:
            return
        await asyncio.sleep(gone_after)
        signal.fire()
        left.set()

    if fired_before:
        signal.fire()
        left.set()
    leaving = asyncio.ensure_future(leave())
    try:
        return await unless_gone(asyncio.sleep(0.2, "done"), signal if use_signal else waiter(receive))
    except asyncio.CancelledError:
        assert client_left()
        return "gone"
    finally:
        leaving.cancel()


@pytest.mark.parametrize("use_signal", [True, False])
def test_the_work_finishes_when_the_client_stays(use_signal: bool) -> None:
    assert asyncio.run(_guarded(None, use_signal=use_signal)) == "done"


@pytest.mark.parametrize("use_signal", [True, False])
def test_a_client_leaving_cancels_the_work(use_signal: bool) -> None:
    assert asyncio.run(_guarded(0.01, use_signal=use_signal)) == "gone"


@pytest.mark.parametrize("use_signal", [True, False])
def test_a_client_already_gone_cancels_the_work_at_once(use_signal: bool) -> None:
    assert asyncio.run(_guarded(None, fired_before=True, use_signal=use_signal)) == "gone"


def test_a_cancellation_from_outside_stays_one() -> None:
    async def main() -> bool:
        signal = Signal()
        task = asyncio.ensure_future(unless_gone(asyncio.sleep(1), signal))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return signal._callbacks == []  # unsubscribed
        return False

    assert asyncio.run(main())


def test_a_signal_runs_its_callbacks_once() -> None:
    signal, calls = Signal(), []
    signal.subscribe(lambda: calls.append("a"))
    gone = lambda: calls.append("b")
    signal.subscribe(gone)
    signal.unsubscribe(gone)
    signal.fire()
    signal.fire()
    signal.subscribe(lambda: calls.append("late"))  # after the fact: at once
    assert calls == ["a", "late"]
