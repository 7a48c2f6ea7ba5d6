"""The usage report's parameters (pure): defaults, day ranges, and a 400 naming each bad parameter."""

from __future__ import annotations

from datetime import date

import pytest

from tests.metering._helpers import FakeClock
from therouter.errors import InvalidRequest
from therouter.metering.usage import usage_query


def test_usage_query_defaults_and_refusals() -> None:
    now = FakeClock()()  # 2025-01-31 23:59 UTC
    q = usage_query(None, None, None, now)
    assert (q.group_by, q.first, q.last) == (("key", "model", "day"), date(2025, 1, 25), date(2025, 1, 31))
    assert usage_query("provider,day", "2025-01-01", "2025-01-02", now).source == "byprov"
    assert usage_query("model", None, "2025-01-02", now, days=2).days() == ["20250102", "20250101"]
    for args, param in ((("model,provider", None, None), "group_by"), (("key,key", None, None), "group_by"),
                        (("user", None, None), "group_by"),
                        (("key", "2025-13-01", None), "from"), (("key", None, "yesterday"), "to"),
                        (("key", "2025-02-01", "2025-01-01"), "from"), (("key", "2023-01-01", "2025-01-01"), "from")):
        with pytest.raises(InvalidRequest) as e:
            usage_query(*args, now)
        assert e.value.param == param and e.value.status == 400, args
    with pytest.raises(InvalidRequest) as e:
        usage_query("key", None, None, now, days=0)
    assert e.value.param == "days"
