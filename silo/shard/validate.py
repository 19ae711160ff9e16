"""Validation of a job's caller-given fields: pure, shared by Enqueue and ImportJobs.

Upstream checks priority, metadata and task group (behaviour.md §1.2 Enqueue), in that
order, and nothing else. Every other number a job carries is used later in arithmetic
that the state machine must survive (retry back-off, rate-limit waits, scheduled times
stored as int64 and packed into u64 keys), so we bound each one here and answer
INVALID_ARGUMENT naming the field. The bounds are generous: any value a real client
means (a year-long interval, a factor of 10, a limit of a billion) passes.

Everything raises `silo.errors.SiloError` (INVALID_ARGUMENT) and changes nothing.
"""

from __future__ import annotations

import math

from silo import errors
from silo.storage.records import (
    ConcurrencyLimit,
    FloatingConcurrencyLimit,
    Limit,
    RateLimit,
    RetryPolicy,
)

MAX_PRIORITY = 99
MAX_JOB_ID_CHARS = 128
MAX_TASK_GROUP_CHARS = 64
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY_CHARS = 64  # keys must be shorter
MAX_METADATA_VALUE_BYTES = 65535  # values must be shorter

# Latest time a job may be scheduled at: 9999-12-31T23:59:59.999Z. Every computed time
# (now + back-off) is clamped to it too, so it fits int64 fields and datetime.
MAX_TIME_MS = 253_402_300_799_999
# Longest interval, back-off or window: about 100 years.
MAX_INTERVAL_MS = 100 * 365 * 86_400_000
# Largest back-off growth factor per retry.
MAX_BACKOFF_FACTOR = 1000.0
MAX_LIMITS = 64
MAX_LIMIT_KEY_CHARS = 1024  # concurrency keys, rate-limit names and unique keys
MAX_RATE_LIMIT = 1 << 53  # exact as a float (the limiter counts in floats)
MAX_HITS = (1 << 31) - 1  # int32 on the wire
# A worker id is copied into every lease it takes: bounded so one LeaseTasks call
# cannot multiply a huge id by max_tasks.
MAX_WORKER_ID_CHARS = 1024


def validate_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise errors.invalid(f"metadata has too many entries (max {MAX_METADATA_ENTRIES})")
    for k, v in metadata.items():
        if len(k) >= MAX_METADATA_KEY_CHARS:
            raise errors.invalid("metadata key too long (must be < 64 chars)")
        if len(v.encode()) >= MAX_METADATA_VALUE_BYTES:
            raise errors.invalid("metadata value too long (must be < u16::MAX bytes)")


def _int_range(field: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise errors.invalid(f"{field} must be between {lo} and {hi} (got {value})")


def _factor(field: str, value: float) -> None:
    if not math.isfinite(value) or not 0.0 <= value <= MAX_BACKOFF_FACTOR:
        raise errors.invalid(
            f"{field} must be a finite number between 0 and {MAX_BACKOFF_FACTOR:g} "
            f"(got {value!r})")


def _key(field: str, value: str, *, required: bool = False) -> None:
    if required and not value:
        raise errors.invalid(f"{field} is required")
    if len(value) > MAX_LIMIT_KEY_CHARS:
        raise errors.invalid(f"{field} too long (must be <= {MAX_LIMIT_KEY_CHARS} chars)")


def validate_retry_policy(policy: RetryPolicy | None) -> None:
    if policy is None:
        return
    _int_range("retry_policy.initial_interval_ms", policy.initial_interval_ms, 0,
               MAX_INTERVAL_MS)
    _int_range("retry_policy.max_interval_ms", policy.max_interval_ms, 0, MAX_INTERVAL_MS)
    _factor("retry_policy.backoff_factor", policy.backoff_factor)


def validate_limits(limits: list[Limit]) -> None:
    if len(limits) > MAX_LIMITS:
        raise errors.invalid(f"too many limits (max {MAX_LIMITS})")
    for i, limit in enumerate(limits):
        at = f"limits[{i}]"
        if isinstance(limit, ConcurrencyLimit):
            _key(f"{at}.concurrency.key", limit.key)
            if limit.max_concurrency <= 0:
                raise errors.invalid("concurrency limit max_concurrency must be >= 1")
        elif isinstance(limit, FloatingConcurrencyLimit):
            _key(f"{at}.floating_concurrency.key", limit.key)
            if limit.default_max_concurrency <= 0:
                raise errors.invalid("floating limit default_max_concurrency must be >= 1")
            _int_range(f"{at}.floating_concurrency.refresh_interval_ms",
                       limit.refresh_interval_ms, 0, MAX_INTERVAL_MS)
            validate_metadata(limit.metadata)
        elif isinstance(limit, RateLimit):
            if limit.limit <= 0 or limit.duration_ms <= 0:
                raise errors.invalid("rate limit needs limit >= 1 and duration_ms >= 1")
            if not limit.name:
                raise errors.invalid("rate limit name is required")
            _key(f"{at}.rate_limit.name", limit.name)
            _key(f"{at}.rate_limit.unique_key", limit.unique_key)
            _int_range(f"{at}.rate_limit.limit", limit.limit, 1, MAX_RATE_LIMIT)
            _int_range(f"{at}.rate_limit.duration_ms", limit.duration_ms, 1, MAX_INTERVAL_MS)
            _int_range(f"{at}.rate_limit.hits", limit.hits, 0, MAX_HITS)
            rp = limit.retry_policy
            pre = f"{at}.rate_limit.retry_policy"
            _int_range(f"{pre}.initial_backoff_ms", rp.initial_backoff_ms, 0, MAX_INTERVAL_MS)
            _int_range(f"{pre}.max_backoff_ms", rp.max_backoff_ms, 0, MAX_INTERVAL_MS)
            _factor(f"{pre}.backoff_multiplier", rp.backoff_multiplier)


def validate_job_fields(
    job_id: str,
    priority: int,
    task_group: str,
    metadata: dict[str, str],
    limits: list[Limit],
    retry_policy: RetryPolicy | None = None,
    start_at_ms: int = 0,
    *,
    max_task_group_chars: int | None = MAX_TASK_GROUP_CHARS,
) -> None:
    """Every check of a new job, upstream's first and in upstream's order.

    ImportJobs passes `max_task_group_chars=None` (upstream has no length check there).
    """
    if not 0 <= priority <= MAX_PRIORITY:
        raise errors.invalid("priority must be between 0 and 99")
    validate_metadata(metadata)
    if not task_group:
        raise errors.invalid("task_group is required")
    if max_task_group_chars is not None and len(task_group) > max_task_group_chars:
        raise errors.invalid("task_group too long (must be <= 64 chars)")
    if len(job_id) > MAX_JOB_ID_CHARS:
        raise errors.invalid(f"job id too long (must be <= {MAX_JOB_ID_CHARS} chars)")
    if start_at_ms > MAX_TIME_MS:
        raise errors.invalid(f"start_at_ms must be <= {MAX_TIME_MS} (year 9999)")
    validate_retry_policy(retry_policy)
    validate_limits(limits)


def validate_worker_id(worker_id: str) -> None:
    if len(worker_id) > MAX_WORKER_ID_CHARS:
        raise errors.invalid(f"worker_id too long (must be <= {MAX_WORKER_ID_CHARS} chars)")


def clamp_time(ms: float) -> int:
    """A computed time, saturated into [0, MAX_TIME_MS] (NaN → MAX_TIME_MS)."""
    if ms != ms or ms >= MAX_TIME_MS:
        return MAX_TIME_MS
    return 0 if ms <= 0 else int(ms)  # also -inf


def clamp_interval(ms: float) -> int:
    """A computed delay, saturated into [0, MAX_INTERVAL_MS] (NaN → MAX_INTERVAL_MS)."""
    if ms != ms or ms >= MAX_INTERVAL_MS:
        return MAX_INTERVAL_MS
    return 0 if ms <= 0 else int(ms)  # also -inf
