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
"""

from __future__ import annotations

from typing import NamedTuple

from silo.storage.records import RateLimitState

LEAKY_BUCKET = 1


class Decision(NamedTuple):
    admitted: bool
    reset_ms: int  # when a retry can next succeed (meaningful when not admitted)
    state: RateLimitState


def check(state: RateLimitState | None, *, limit: int, duration_ms: int, hits: int,
          algorithm: int, now: int) -> Decision:
    hits = max(1, hits)
    if algorithm == LEAKY_BUCKET:
        return _leaky(state, limit, duration_ms, hits, now)
    return _token(state, limit, duration_ms, hits, now)


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
