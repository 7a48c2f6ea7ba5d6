"""One timer for many deadlines: what passes fires once, what is unwatched or moved does not."""

from __future__ import annotations

import asyncio

from therouter.sweep import Sweep


def test_a_sweep_fires_passed_deadlines_once_and_stops_when_nothing_is_watched() -> None:
    async def main() -> tuple[list[str], bool]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        sw: Sweep[str] = Sweep(loop, 0.01, lambda obj, now: fired.append(obj))
        now = loop.time()
        sw.watch("soon", now + 0.02)
        sw.watch("cancelled", now + 0.02)
        sw.watch("moved", now + 0.02)
        sw.unwatch("cancelled")
        sw.watch("moved", now + 10)  # watched again: the new deadline holds
        await asyncio.sleep(0.1)
        sw.unwatch("moved")
        await asyncio.sleep(0.05)
        return fired, sw._handle is None

    fired, idle = asyncio.run(main())
    assert fired == ["soon"] and idle
