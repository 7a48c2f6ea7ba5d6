"""The health monitor's schedule: the interval between checks comes from the config (routing.health_check_interval)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from therouter.config import ConfigError, Settings, parse_settings
from therouter.routing.health import HealthMonitor


def config(**routing: Any) -> Settings:
    raw = {"store": {"redis_url": "redis://127.0.0.1:1"},
           "providers": {"vllm-a": {"kind": "vllm", "base_url": "http://vllm-a.internal/v1"}},
           "models": {"m": {"context_length": 4096, "max_output_tokens": 1024,
                            "pricing": {"input": "0.1", "output": "0.2"},
                            "deployments": [{"provider": "vllm-a", "model": "m"}]}},
           "routing": routing}
    return parse_settings(raw, "x.yaml", env={})


async def test_checks_run_every_health_check_interval_seconds() -> None:
    slept: list[float] = []
    checks: list[bool] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 3:
            raise asyncio.CancelledError

    async def check_all(models: bool = True) -> None:
        checks.append(models)

    mon = HealthMonitor(config(health_check_interval=2.5), {}, sleep=sleep)
    mon.check_all = check_all  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await mon._loop()
    assert slept == [2.5] * 4 and len(checks) == 3


def test_health_check_interval_is_configurable_and_validated() -> None:
    assert config().routing.health_check_interval == 10.0  # the default, as before it was configurable
    assert HealthMonitor(config(health_check_interval=0.5), {}).interval == 0.5
    with pytest.raises(ConfigError, match=r"x.yaml: routing\.health_check_interval"):
        config(health_check_interval=0)
