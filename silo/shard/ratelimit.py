"""A local rate limiter: token and leaky buckets keyed by (name, unique_key), per shard.

Pure functions over a small state record, which the shard writes with the batch that
used it, so a restart resumes the bucket where it was (a restart cannot be used to
burst past a limit).

* Token bucket (algorithm 0), Gubernator's semantics: a window of `duration_ms` opens
  at the first hit with `limit` tokens; each admitted job takes `hits` tokens; when
  the tokens run out, jobs wait until the window ends (`reset_ms`) and a fresh one opens.
* Leaky bucket (algorithm 1): a level that drains continuously at limit/duration per
  ms; a job is admitted while level + hits ≤ limit, otherwise it waits until enough
  has drained.

Every function here is total: whatever numbers a stored limit carries (Enqueue bounds
them now; records written earlier may not be), it returns times as ints in
[0, MAX_TIME_MS] and never raises, so one job's limit cannot break a LeaseTasks call.
"""

from __future__ import annotations

from typing import NamedTuple

from silo.shard.validate import MAX_INTERVAL_MS, clamp_interval, clamp_time
from silo.storage.records import RateLimitRetryPolicy, RateLimitState

LEAKY_BUCKET = 1


class Decision(NamedTuple):
    admitted: bool
    reset_ms: int  # when a retry can next succeed (meaningful when not admitted)
    state: RateLimitState


def check(state: RateLimitState | None, *, limit: int, duration_ms: int, hits: int,
          algorithm: int, now: int) -> Decision:
    hits = max(1, hits)
    limit = max(1, limit)
    duration_ms = min(max(1, duration_ms), MAX_INTERVAL_MS)
    if state is not None and not (state.value == state.value and abs(state.value) < 1e300):
        state = None  # a bucket stored with a NaN / infinite level: start afresh
    if algorithm == LEAKY_BUCKET:
        d = _leaky(state, limit, duration_ms, hits, now)
    else:
        d = _token(state, limit, duration_ms, hits, now)
    return d._replace(reset_ms=clamp_time(d.reset_ms))


def backoff_ms(policy: RateLimitRetryPolicy, retry_count: int) -> int:
    """min(initial × multiplier^retry_count, max_backoff), saturated into
    [0, MAX_INTERVAL_MS] whatever the numbers (NaN, inf, 1e308, negatives)."""
    cap = clamp_interval(policy.max_backoff_ms)
    try:
        raw = policy.initial_backoff_ms * policy.backoff_multiplier ** retry_count
    except (OverflowError, ZeroDivisionError):
        raw = float("inf")
    if raw != raw:
        return cap
    return min(clamp_interval(raw), cap)


def next_check_ms(policy: RateLimitRetryPolicy, retry_count: int, reset_ms: int,
                  now: int) -> int:
    """When an over-limit job checks again: the bucket's reset time when it comes
    within max_backoff, else now + back-off; always after now, always a valid time."""
    window = clamp_interval(policy.max_backoff_ms)
    at = reset_ms if now < reset_ms < now + window else now + backoff_ms(policy, retry_count)
    return clamp_time(max(at, now + 1))


def _token(state: RateLimitState | None, limit: int, duration_ms: int, hits: int,
           now: int) -> Decision:
    if state is None or now >= state.window_start_ms + duration_ms:
        state = RateLimitState(float(limit), now, now)
    reset = state.window_start_ms + duration_ms
    if state.value >= hits:
        return Decision(True, reset, RateLimitState(state.value - hits, state.window_start_ms, now))
    return Decision(False, reset, state)


def _leaky(state: RateLimitState | None, limit: int, duration_ms: int, hits: int,
           now: int) -> Decision:
    rate = limit / duration_ms  # drained per ms
    level = 0.0 if state is None else max(0.0, state.value - (now - state.updated_ms) * rate)
    if level + hits <= limit:
        return Decision(True, now, RateLimitState(level + hits, now, now))
    wait = (level + hits - limit) / rate
    return Decision(False, now + max(1, int(wait + 0.999)), RateLimitState(level, now, now))
