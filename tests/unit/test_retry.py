"""Retry back-off math (behaviour.md §2.6)."""

from hypothesis import given
from hypothesis import strategies as st

from silo.shard.retry import is_last_attempt, jitter_factor, retry_delay_ms, should_retry
from silo.storage.records import RetryPolicy


def policy(**kw):
    base = dict(retry_count=3, initial_interval_ms=1000, max_interval_ms=60_000,
                randomize_interval=False, backoff_factor=2.0)
    base.update(kw)
    return RetryPolicy(**base)


def test_first_retry_waits_initial_times_factor():
    p = policy()
    assert [retry_delay_ms(p, n, 0) for n in (1, 2, 3)] == [2000, 4000, 8000]


def test_delay_is_capped_at_max_interval():
    assert retry_delay_ms(policy(max_interval_ms=5000), 10, 0) == 5000
    assert retry_delay_ms(policy(max_interval_ms=0), 1, 0) == 0


def test_rounding_is_half_away_from_zero():
    assert retry_delay_ms(policy(initial_interval_ms=1, backoff_factor=2.5), 1, 0) == 3


def test_huge_exponent_does_not_overflow():
    assert retry_delay_ms(policy(backoff_factor=1e10), 500, 0) == 60_000


def test_jitter_is_deterministic_and_in_range():
    assert jitter_factor(1234, 1) == jitter_factor(1234, 1)
    p = policy(randomize_interval=True, max_interval_ms=10**9)
    d = retry_delay_ms(p, 1, 1_700_000_000_000)
    assert 2000 <= d < 4000
    assert d == retry_delay_ms(p, 1, 1_700_000_000_000)


@given(st.integers(0, 2**62), st.integers(1, 30))
def test_jitter_factor_bounds(t, n):
    f = jitter_factor(t, n)
    assert 1.0 <= f <= 2.0


def test_retry_budget_and_last_attempt():
    p = policy(retry_count=2)
    assert should_retry(p, 1) and should_retry(p, 2) and not should_retry(p, 3)
    assert not should_retry(None, 1)
    assert is_last_attempt(p, 3) and not is_last_attempt(p, 2)
    assert is_last_attempt(None, 1)


_ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e308, -1e308, float("nan"), float("inf"), -0.0])
_ANY_INT = st.integers(-(2**63), 2**63 - 1)


@given(_ANY_INT, _ANY_INT, st.booleans(), _ANY_FLOAT, st.integers(1, 2**32),
       st.integers(0, 2**62))
def test_delay_saturates_for_any_stored_numbers(initial, max_interval, rnd, factor, n, t):
    """Records written before Enqueue validated numbers must not break the retry math."""
    from silo.shard.validate import MAX_INTERVAL_MS

    p = RetryPolicy(3, initial, max_interval, rnd, factor)
    d = retry_delay_ms(p, n, t)
    assert isinstance(d, int)
    assert 0 <= d <= MAX_INTERVAL_MS


def test_poison_policies_give_a_capped_delay():
    assert retry_delay_ms(policy(backoff_factor=float("nan")), 1, 0) == 60_000
    assert retry_delay_ms(policy(backoff_factor=1e308), 3, 0) == 60_000
    assert retry_delay_ms(policy(initial_interval_ms=2**62, max_interval_ms=2**63 - 1), 1, 0) \
        < 2**63 - 2_000_000_000_000
