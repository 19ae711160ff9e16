"""Retry back-off: pure functions, the exact math Silo's clients and tests expect.

Saturating: whatever numbers a stored policy carries (NaN, inf, 1e308, huge or negative
intervals — Enqueue rejects them now, older records may still hold them), the delay is
an int in [0, MAX_INTERVAL_MS], so `now + delay` always fits the int64 time fields.
"""

from __future__ import annotations

import math

from silo.shard.validate import MAX_INTERVAL_MS
from silo.storage.records import RetryPolicy

_U64 = (1 << 64) - 1
_LCG_MUL = 6364136223846793005


def _round(x: float) -> int:
    """Round half away from zero (as Rust's f64::round), not Python's banker's rounding."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def jitter_factor(failure_time_ms: int, failures_so_far: int) -> float:
    """A deterministic factor in [1, 2) derived from the failure time and count."""
    seed = (failure_time_ms ^ (failures_so_far << 32)) & _U64
    seed = (seed * _LCG_MUL + 1) & _U64
    return 1.0 + (seed >> 32) / 0xFFFFFFFF


def retry_delay_ms(policy: RetryPolicy, failures_so_far: int, failure_time_ms: int) -> int:
    """Back-off before the next attempt after `failures_so_far` failures (first = 1).

    delay = round(initial × factor^n), times a jitter in [1, 2) when randomized (then
    rounded again), capped at max_interval_ms. The first retry therefore waits
    initial × factor, not initial.
    """
    cap = min(max(0, policy.max_interval_ms), MAX_INTERVAL_MS)
    try:
        raw = policy.initial_interval_ms * policy.backoff_factor**failures_so_far
    except (OverflowError, ZeroDivisionError):
        raw = math.inf
    if raw != raw:  # NaN (e.g. 0 × inf)
        return cap
    if raw >= cap * 2 + 1:
        return cap  # capped whatever the jitter (also catches inf)
    if raw <= 0:
        return 0
    delay = _round(raw)
    if policy.randomize_interval:
        delay = _round(delay * jitter_factor(failure_time_ms, failures_so_far))
    return max(0, min(delay, cap))


def should_retry(policy: RetryPolicy | None, failures_so_far: int) -> bool:
    return policy is not None and failures_so_far <= policy.retry_count


def is_last_attempt(policy: RetryPolicy | None, relative_attempt: int) -> bool:
    return relative_attempt >= (policy.retry_count + 1 if policy is not None else 1)
