"""Cost and price arithmetic: exact integers, no I/O."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from hypothesis import given
from hypothesis import strategies as st

from therouter.metering import PriceVersion, cost_nano, nano_to_usd, reservation_nano
from therouter.metering.prices import dearest, price_at
from therouter.protocol.usage import Usage

DEEPSEEK = PriceVersion("deepseek-chat", 1, 0, 280_000_000, 28_000_000, 420_000_000)
QWEN = PriceVersion("qwen", 1, 0, 100_000_000, 50_000_000, 200_000_000)


def test_deepseek_hit_and_miss_are_priced_separately() -> None:
    usage = Usage.from_openai({
        "prompt_tokens": 1200, "completion_tokens": 300, "prompt_cache_hit_tokens": 1024,
        "prompt_cache_miss_tokens": 176, "completion_tokens_details": {"reasoning_tokens": 250},
    })
    # 176 x 0.28 + 1024 x 0.028 + 300 x 0.42 (reasoning is inside completion) = 203.952 USD per 1M = 203_952 nano
    assert cost_nano(usage, DEEPSEEK) == 203_952
    assert isinstance(cost_nano(usage, DEEPSEEK), int)


def test_vllm_cached_tokens_at_hit_price_and_absent_means_all_miss() -> None:
    cached = Usage.from_openai({"prompt_tokens": 1000, "completion_tokens": 50,
                                "prompt_tokens_details": {"cached_tokens": 600}})
    plain = Usage.from_openai({"prompt_tokens": 1000, "completion_tokens": 50})
    assert cost_nano(cached, QWEN) == 400 * 100 + 600 * 50 + 50 * 200  # nano: price/1M x tokens
    assert cost_nano(plain, QWEN) == 1000 * 100 + 50 * 200


def test_rounding_is_half_up_in_integers() -> None:
    one = PriceVersion("m", 1, 0, 1, 1, 1)  # 1 nano-USD per 1M tokens
    assert cost_nano(Usage(prompt_tokens=499_999), one) == 0
    assert cost_nano(Usage(prompt_tokens=500_000), one) == 1  # a tie goes up
    assert cost_nano(Usage(prompt_tokens=2_500_000), one) == 3  # not banker's rounding (which gives 2)
    assert cost_nano(Usage(prompt_tokens=1_499_999), one) == 1


@given(prompt=st.integers(0, 10**9), cached=st.integers(0, 10**9), completion=st.integers(0, 10**9),
       p_in=st.integers(0, 10**12), p_cached=st.integers(0, 10**12), p_out=st.integers(0, 10**12))
def test_cost_matches_decimal_half_up_and_reservation_covers_it(
    prompt: int, cached: int, completion: int, p_in: int, p_cached: int, p_out: int
) -> None:
    price = PriceVersion("m", 1, 0, p_in, p_cached, p_out)
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=min(cached, prompt))
    c = min(cached, prompt)
    exact = (Decimal(prompt - c) * p_in + Decimal(c) * p_cached + Decimal(completion) * p_out) / Decimal(10**6)
    assert cost_nano(usage, price) == int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert reservation_nano(prompt, completion, price) >= cost_nano(usage, price)


def test_reservation_rounds_up_and_uses_the_dearer_prompt_rate() -> None:
    odd = PriceVersion("m", 1, 0, 1, 3, 1)
    assert reservation_nano(1, 0, odd) == 1  # 3 / 1M rounded up
    assert reservation_nano(1000, 100, DEEPSEEK) == 1000 * 280 + 100 * 420


def test_price_at_picks_newest_effective_not_after() -> None:
    v1, v2, v3 = (PriceVersion("m", i, e, i, i, i) for i, e in ((1, 0), (2, 100), (3, 200)))
    assert price_at([v1, v2, v3], 99) == v1
    assert price_at([v3, v2, v1], 100) == v2
    assert price_at([v1, v2, v3], 10**10) == v3
    assert price_at([v2], 50) is None


def test_nano_to_usd_is_an_exact_string() -> None:
    assert nano_to_usd(0) == "0.00"
    assert nano_to_usd(1_500_000_000) == "1.50"
    assert nano_to_usd(203_952) == "0.000203952"
    assert nano_to_usd(123 * 10**18 + 1) == "123000000000.000000001"


@given(st.one_of(st.sampled_from([0, 1, 9, 10, 15_960, 120_000_000, 999_999_999, 10**9, 10**9 + 1, -1, -(10**9)]),
                 st.integers(min_value=0, max_value=10**9 + 5), st.integers(min_value=-(10**12), max_value=10**12)))
def test_nano_to_usd_under_a_dollar_is_the_general_string(nano: int) -> None:
    """Amounts under a dollar take a shorter way (one per request line): the same string as the general one."""
    whole, frac = divmod(abs(nano), 10**9)
    digits = f"{frac:09d}".rstrip("0")
    assert nano_to_usd(nano) == f"{'-' if nano < 0 else ''}{whole}.{digits.ljust(2, '0')}"


# ---- cache writes (Anthropic): their own price, inside prompt_tokens ---------------------------------------------

CLAUDE = PriceVersion("claude", 1, 0, 5_000_000_000, 500_000_000, 25_000_000_000, cache_write=6_250_000_000)


def test_cache_reads_and_writes_each_at_their_own_price() -> None:
    # what the Anthropic adapter reports: prompt = uncached + reads + writes
    usage = Usage.from_openai({"prompt_tokens": 3544, "completion_tokens": 89,
                               "prompt_tokens_details": {"cached_tokens": 2048, "cache_write_tokens": 1024}})
    assert (usage.cached_tokens, usage.cache_write_tokens) == (2048, 1024)
    # 472 x 5 + 2048 x 0.5 + 1024 x 6.25 + 89 x 25 USD per 1M
    assert cost_nano(usage, CLAUDE) == 472 * 5000 + 2048 * 500 + 1024 * 6250 + 89 * 25000
    assert cost_nano(usage, PriceVersion("m", 1, 0, 5_000_000_000, 500_000_000, 25_000_000_000)) \
        == (472 + 1024) * 5000 + 2048 * 500 + 89 * 25000  # no cache_write price: writes cost input


def test_reservation_covers_a_prompt_written_to_the_cache() -> None:
    """A cache write can cost more than uncached input: the prompt part of the worst case uses the dearest rate."""
    all_written = Usage(prompt_tokens=1000, cache_write_tokens=1000, completion_tokens=10)
    assert reservation_nano(1000, 10, CLAUDE) == 1000 * 6250 + 10 * 25000 >= cost_nano(all_written, CLAUDE)
    assert reservation_nano(1000, 10, CLAUDE) > 1000 * 5000 + 10 * 25000  # more than the input rate alone covers


@given(prompt=st.integers(0, 10**9), cached=st.integers(0, 10**9), written=st.integers(0, 10**9),
       completion=st.integers(0, 10**9), p_in=st.integers(0, 10**12), p_cached=st.integers(0, 10**12),
       p_write=st.integers(0, 10**12), p_out=st.integers(0, 10**12))
def test_cost_with_cache_writes_is_exact_and_reserved(prompt: int, cached: int, written: int, completion: int,
                                                      p_in: int, p_cached: int, p_write: int, p_out: int) -> None:
    price = PriceVersion("m", 1, 0, p_in, p_cached, p_out, cache_write=p_write)
    c = min(cached, prompt)
    w = min(written, prompt - c)
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=c, cache_write_tokens=w)
    exact = (Decimal(prompt - c - w) * p_in + Decimal(c) * p_cached + Decimal(w) * p_write
             + Decimal(completion) * p_out) / Decimal(10**6)
    assert cost_nano(usage, price) == int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert reservation_nano(prompt, completion, price) >= cost_nano(usage, price)


def test_dearest_keeps_the_dearest_cache_write() -> None:
    d = dearest(QWEN, CLAUDE)
    assert d.cache_write == CLAUDE.cache_write and d.input == CLAUDE.input
    assert dearest(QWEN, DEEPSEEK).cache_write == DEEPSEEK.input  # none set: writes cost input
