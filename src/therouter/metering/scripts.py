"""The Lua scripts of the metering package, read from the ``.lua`` files beside this module and registered once.

``admit``, ``settle`` and ``release`` share the helpers of ``common.lua`` (prepended). Registered scripts run with
EVALSHA; redis-py reloads a script itself after a ``NOSCRIPT`` (e.g. after a Redis restart) -- safe, since a
``NOSCRIPT`` reply means the script did not run.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Callable, Sequence

from therouter.store import Store

_WITH_COMMON = ("admit", "settle", "release")
_PLAIN = ("price_set", "rebuild", "reap")


def _text(name: str) -> str:
    return resources.files("therouter.metering").joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    def __init__(self, store: Store) -> None:
        self._store = store
        common = _text("common")
        self._scripts: dict[str, Any] = {}
        for name in _WITH_COMMON:
            self._scripts[name] = store.redis.register_script(common + "\n" + _text(name))
        for name in _PLAIN:
            self._scripts[name] = store.redis.register_script(_text(name))

    async def run(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """One script call under the store's breaker (failures become ``StoreUnavailable``)."""
        script = self._scripts[name]
        return await self._store.call(lambda: script(keys=list(keys), args=list(args)))

    async def run_with(self, name: str, keys: Sequence[str], args: Sequence[str | int],
                       extra: Callable[[Any], None]) -> Any:
        """The script and a few more (idempotent) commands, added by ``extra(pipeline)``, in one round trip."""
        script = self._scripts[name]
        return await self._store.call(lambda: self._store.script_with(script, keys, args, extra))

    async def run_many(self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[str | int]]]) -> list[Any]:
        """The script once per ``(keys, args)``, in one round trip (a single node; see ``Store.script_many``): one
        reply per call, an error reply as its exception. A failure of the round trip raises ``StoreUnavailable``."""
        script = self._scripts[name]
        return await self._store.call(lambda: self._store.script_many(script, calls))
