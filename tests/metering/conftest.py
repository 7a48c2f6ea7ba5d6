"""Fixtures for the metering tests: settings, an injectable clock, a started Meter on the per-test key prefix of
the shared real redis-server, and a key factory."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from tests.metering._helpers import FakeClock, make_settings
from therouter.config import Settings
from therouter.keys import KeyRecord
from therouter.metering import Meter, MeterOptions
from therouter.store import Store


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def options() -> MeterOptions:
    return MeterOptions(tick=3600)  # background pass off: tests call maintain() themselves


@pytest.fixture
async def meter(store: Store, settings: Settings, clock: FakeClock, options: MeterOptions,
                tmp_path: Path) -> AsyncIterator[Meter]:
    m = Meter(store, settings, tmp_path / "journal", clock=clock, options=options)
    await m.start()
    yield m
    await m.aclose()


@pytest.fixture
def make_key() -> Callable[..., KeyRecord]:
    def make(**limits: Any) -> KeyRecord:
        return KeyRecord(id="key_" + uuid.uuid4().hex[:12], name="test", hint="tr-xxxx...abcd", **limits)

    return make
