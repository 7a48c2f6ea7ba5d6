"""GenerationRecord and Admission survive JSON (the journal and the Redis record are made of them)."""

from __future__ import annotations

import orjson

from tests.metering._helpers import record
from therouter.metering import Admission, GenerationRecord, PriceVersion


def test_record_round_trips_through_json() -> None:
    rec = record("gen-1", prompt=1200, completion=300, cached=1024, reasoning=250, stream=True)
    rec.usage.estimated, rec.cost_nano, rec.price_version = True, 203_952, 3
    rec.attempts.append({"provider": "local", "outcome": "possibly_accepted", "latency_ms": 2000,
                         "error": "upstream_timeout", "possibly_accepted": True})
    rec.skipped = [{"provider": "other", "reason": "breaker_open"}]
    d = orjson.loads(orjson.dumps(rec.to_dict()))
    assert d["cost_usd"] == "0.000203952" and d["usage"]["estimated"] is True
    assert d["usage"]["prompt_tokens_details"] == {"cached_tokens": 1024}
    back = GenerationRecord.from_dict(d)
    assert back == rec
    assert back.counters() == {"cost": 203_952, "requests": 1, "prompt_tokens": 1200, "completion_tokens": 300,
                               "cached_tokens": 1024, "reasoning_tokens": 250}


def test_unknown_outcome_reads_as_failed() -> None:
    d = record("gen-2").to_dict()
    d["outcome"] = "weird"
    assert GenerationRecord.from_dict(d).outcome == "failed"


def test_admission_round_trips_through_json() -> None:
    price = PriceVersion("qwen", 2, 1700000000, 100_000_000, 50_000_000, 200_000_000, "operator")
    adm = Admission("gen-1", "key_1", "qwen", price, 3000, 20, 1738367940.5, 28972799, tracked=True)
    back = Admission.from_dict(orjson.loads(orjson.dumps(adm.to_dict())))
    assert back == adm and back.price_version == 2


def test_cache_writes_are_shown_and_kept_in_the_record() -> None:
    rec = record("gen-3", prompt=3544, completion=89, cached=2048)
    rec.usage.cache_write_tokens = 1024
    d = orjson.loads(orjson.dumps(rec.to_dict()))
    assert d["usage"]["prompt_tokens_details"] == {"cached_tokens": 2048, "cache_write_tokens": 1024}
    assert GenerationRecord.from_dict(d) == rec


def test_admission_keeps_a_cache_write_price() -> None:
    price = PriceVersion("claude", 1, 0, 5_000_000_000, 500_000_000, 25_000_000_000, cache_write=6_250_000_000)
    adm = Admission("gen-1", "key_1", "claude", price, 3000, 20, 1738367940.5, 28972799)
    assert Admission.from_dict(orjson.loads(orjson.dumps(adm.to_dict()))).price.cache_write == 6_250_000_000
