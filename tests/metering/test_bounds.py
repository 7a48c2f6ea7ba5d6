"""Upstream usage bounded before billing (pure): counts an upstream got wrong are replaced by the gateway's estimate,
every count is clamped to the model card, and each anomaly is named."""

from __future__ import annotations

import dataclasses

import pytest

from therouter.metering.bounds import REASONS, Bounds, bound_usage
from therouter.protocol.usage import Usage

CARD = Bounds(context=4096, max_output=1024)
ESTIMATE = Usage(prompt_tokens=12, completion_tokens=30, estimated=True)


@pytest.mark.parametrize("value,reason", [
    ("12", "not_a_number"), (True, "not_a_number"), (1.5, "not_a_number"), (float("nan"), "not_a_number"),
    (float("inf"), "not_a_number"), ([3], "not_a_number"), ({"n": 3}, "not_a_number"), (-5, "negative"),
    (-5.0, "negative"),
])
def test_a_bad_count_is_rejected_and_named(value: object, reason: str) -> None:
    u = Usage.from_openai({"prompt_tokens": 10, "completion_tokens": value})
    assert (u.completion_tokens, u.rejected) == (0, {"completion_tokens": reason})


def test_integral_floats_are_counts_and_absent_details_are_not_anomalies() -> None:
    u = Usage.from_openai({"prompt_tokens": 10.0, "completion_tokens": 7, "prompt_tokens_details": None,
                           "completion_tokens_details": None})
    assert (u.prompt_tokens, u.completion_tokens, u.rejected) == (10, 7, {})


def test_a_usage_object_without_its_counts_is_not_free() -> None:
    assert Usage.from_openai({}).rejected == {"prompt_tokens": "missing", "completion_tokens": "missing"}
    # DeepSeek's hit/miss spelling gives the prompt count without prompt_tokens
    u = Usage.from_openai({"prompt_cache_hit_tokens": 3, "prompt_cache_miss_tokens": 7, "completion_tokens": 1})
    assert (u.prompt_tokens, u.cached_tokens, u.rejected) == (10, 3, {})


def test_rejected_counts_are_replaced_by_the_estimate_and_marked_estimated() -> None:
    reported = Usage.from_openai({"prompt_tokens": "lots", "completion_tokens": -1,
                                  "prompt_tokens_details": {"cached_tokens": "x"},
                                  "completion_tokens_details": {"reasoning_tokens": 2.5}})
    billed, reasons = bound_usage(reported, CARD, ESTIMATE)
    assert (billed.prompt_tokens, billed.completion_tokens, billed.cached_tokens, billed.reasoning_tokens) == (
        12, 30, 0, 0)
    assert billed.estimated and billed.rejected == {}
    assert sorted(reasons) == sorted(["not_a_number", "negative", "not_a_number", "not_a_number"])
    assert reported.rejected  # the input is left as it was


def test_only_the_bad_count_is_replaced() -> None:
    reported = Usage.from_openai({"prompt_tokens": 100, "completion_tokens": "9"})
    billed, reasons = bound_usage(reported, CARD, ESTIMATE)
    assert (billed.prompt_tokens, billed.completion_tokens, billed.estimated, reasons) == (
        100, 30, True, ["not_a_number"])


def test_absurd_counts_are_clamped_to_the_card() -> None:
    reported = Usage(prompt_tokens=10**15, completion_tokens=10**12, cached_tokens=10**16, reasoning_tokens=10**13)
    billed, reasons = bound_usage(reported, CARD, ESTIMATE)
    assert (billed.prompt_tokens, billed.completion_tokens, billed.cached_tokens, billed.reasoning_tokens) == (
        4096, 1024, 4096, 1024)
    assert reasons == ["prompt_over_context", "completion_over_max_output", "cached_over_prompt",
                       "reasoning_over_completion"]
    assert not billed.estimated  # clamped, not replaced


def test_several_choices_may_each_use_the_max_output() -> None:
    billed, reasons = bound_usage(Usage(prompt_tokens=10, completion_tokens=3000), Bounds(4096, 1024 * 4))
    assert (billed.completion_tokens, reasons) == (3000, [])


def test_sane_usage_passes_unchanged() -> None:
    reported = Usage(prompt_tokens=4096, completion_tokens=1024, cached_tokens=4000, reasoning_tokens=1000)
    billed, reasons = bound_usage(reported, CARD, ESTIMATE)
    assert billed == reported and reasons == []


def test_reasons_are_a_small_fixed_set() -> None:
    bad = [("1", "x"), (-1, True), (10**9, 10**9)]
    for prompt, completion in bad:
        _, reasons = bound_usage(Usage.from_openai({"prompt_tokens": prompt, "completion_tokens": completion,
                                                    "prompt_tokens_details": {"cached_tokens": 10**10}}), CARD)
        assert reasons and set(reasons) <= set(REASONS)


def test_cache_writes_are_clamped_to_the_prompt_left_after_reads() -> None:
    u, reasons = bound_usage(Usage(prompt_tokens=100, cached_tokens=60, cache_write_tokens=70, completion_tokens=1),
                             Bounds(context=1000, max_output=10))
    assert (u.cached_tokens, u.cache_write_tokens) == (60, 40)
    assert reasons == ["cache_write_over_prompt"]


def test_a_usage_within_bounds_is_copied_whole_and_left_unchanged() -> None:
    """bound_usage copies the usage field by field (faster than dataclasses.replace): every field but ``rejected``."""
    reported = Usage(prompt_tokens=100, completion_tokens=20, cached_tokens=10, reasoning_tokens=5,
                     cache_write_tokens=7, estimated=True)
    u, reasons = bound_usage(reported, CARD)
    assert reasons == [] and u == reported and u is not reported
    assert {f.name for f in dataclasses.fields(Usage)} == {
        "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cache_write_tokens", "estimated",
        "rejected"}, "a new Usage field: copy it in bound_usage too"
