"""Values stored under the keys of silo.storage.keys, as msgspec structs.

Encoded as msgpack arrays (`array_like`) so a record costs a few bytes of framing and
one C call to encode or decode. Adding a field: append it with a default, so records
written by an older version still decode.

Job and attempt statuses use the numbers of the public enums (silo.v1 JobStatus and
AttemptStatus), so converting to the wire is an identity.
"""

from __future__ import annotations

import msgspec

# silo.v1.JobStatus
SCHEDULED = 0
RUNNING = 1
SUCCEEDED = 2
FAILED = 3
CANCELLED = 4
STATUS_NAMES = {
    SCHEDULED: "Scheduled",
    RUNNING: "Running",
    SUCCEEDED: "Succeeded",
    FAILED: "Failed",
    CANCELLED: "Cancelled",
}
TERMINAL = frozenset((SUCCEEDED, FAILED, CANCELLED))

# silo.v1.AttemptStatus
ATTEMPT_RUNNING = 0
ATTEMPT_SUCCEEDED = 1
ATTEMPT_FAILED = 2
ATTEMPT_CANCELLED = 3


class RetryPolicy(msgspec.Struct, array_like=True, frozen=True):
    retry_count: int
    initial_interval_ms: int
    max_interval_ms: int
    randomize_interval: bool
    backoff_factor: float


class RateLimitRetryPolicy(msgspec.Struct, array_like=True, frozen=True):
    initial_backoff_ms: int = 100
    max_backoff_ms: int = 30000
    backoff_multiplier: float = 2.0
    max_retries: int = 0


class ConcurrencyLimit(msgspec.Struct, array_like=True, frozen=True, tag=1):
    key: str
    max_concurrency: int


class RateLimit(msgspec.Struct, array_like=True, frozen=True, tag=2):
    name: str
    unique_key: str
    limit: int
    duration_ms: int
    hits: int
    algorithm: int
    behavior: int
    retry_policy: RateLimitRetryPolicy


class FloatingConcurrencyLimit(msgspec.Struct, array_like=True, frozen=True, tag=3):
    key: str
    default_max_concurrency: int
    refresh_interval_ms: int
    metadata: dict[str, str]


Limit = ConcurrencyLimit | RateLimit | FloatingConcurrencyLimit


class JobInfo(msgspec.Struct, array_like=True):
    """What the caller enqueued; written once, never rewritten (payload can be large)."""

    id: str
    tenant: str
    priority: int
    enqueue_time_ms: int
    payload: bytes
    retry_policy: RetryPolicy | None
    metadata: dict[str, str]
    limits: list[Limit]
    task_group: str


class JobStatus(msgspec.Struct, array_like=True):
    kind: int
    changed_at_ms: int
    next_attempt_starts_after_ms: int | None = None
    current_attempt: int | None = None
    # Number of the last attempt that started (0: none yet), so the latest attempt of a
    # terminal job is one get away instead of a scan.
    last_attempt: int = 0


class Cancellation(msgspec.Struct, array_like=True):
    cancelled_at_ms: int


class RunAttempt(msgspec.Struct, array_like=True, tag=1):
    """A task a worker can lease: run attempt `attempt` of a job."""

    task_id: str
    tenant: str
    job_id: str
    attempt: int
    relative_attempt: int
    task_group: str
    held_queues: list[str] = []


class ChainStep(msgspec.Struct, array_like=True):
    """Where an attempt's walk through its job's limits stopped: it carries everything
    needed to resume without reading the job (order, start time, limits, held slots)."""

    task_id: str
    tenant: str
    job_id: str
    attempt: int
    relative_attempt: int
    task_group: str
    held_queues: list[str]
    limit_index: int
    priority: int
    start_ms: int
    limits: list[Limit]


class RequestTicket(ChainStep, tag=2):
    """Stopped at concurrency limit `limit_index` on `queue`.

    As a task (in the ready queue at the job's start time) it asks for the slot when it
    becomes due, so future jobs never hold slots early; stored under a concurrency
    request key it is a parked waiter, granted in (start, priority, job id) order.
    """

    queue: str


class CheckRateLimit(ChainStep, tag=3):
    """Waiting to pass rate limit `limit_index` (checked when due, `retry_count` so far)."""

    retry_count: int


class RefreshFloatingLimit(msgspec.Struct, array_like=True, tag=4):
    """A worker task that computes a new max for a floating limit (limits issue)."""

    task_id: str
    tenant: str
    queue_key: str
    current_max_concurrency: int
    last_refreshed_at_ms: int
    metadata: dict[str, str]
    task_group: str


Task = RunAttempt | RequestTicket | CheckRateLimit | RefreshFloatingLimit


class Lease(msgspec.Struct, array_like=True):
    """A leased task: who holds it until when. For a RunAttempt it is the running attempt."""

    worker_id: str
    task: Task
    expiry_ms: int
    started_at_ms: int
    priority: int = 0


class Attempt(msgspec.Struct, array_like=True):
    job_id: str
    attempt: int
    relative_attempt: int
    task_id: str
    status: int
    started_at_ms: int
    finished_at_ms: int | None = None
    result: bytes | None = None
    error_code: str | None = None
    error_data: bytes | None = None


class FloatingLimitState(msgspec.Struct, array_like=True):
    """Shared state of a floating concurrency limit (tenant, key): its current max and
    the refresh that workers compute for it. Created by the first job using the key."""

    current_max: int
    last_refreshed_at_ms: int
    refresh_scheduled: bool
    refresh_interval_ms: int
    default_max: int
    retry_count: int
    next_retry_at_ms: int | None
    metadata: dict[str, str]


class RateLimitState(msgspec.Struct, array_like=True):
    """A local rate limiter bucket: tokens left (token bucket) or level (leaky bucket)."""

    value: float
    window_start_ms: int
    updated_ms: int


class ShardMapEntry(msgspec.Struct):
    shard_id: str
    range_start: str
    range_end: str


class ShardMapFile(msgspec.Struct):
    version: int
    shards: list[ShardMapEntry]


_enc = msgspec.msgpack.Encoder()
encode = _enc.encode

job_info_decoder = msgspec.msgpack.Decoder(JobInfo)
job_status_decoder = msgspec.msgpack.Decoder(JobStatus)
cancellation_decoder = msgspec.msgpack.Decoder(Cancellation)
task_decoder = msgspec.msgpack.Decoder(Task)
lease_decoder = msgspec.msgpack.Decoder(Lease)
attempt_decoder = msgspec.msgpack.Decoder(Attempt)
request_decoder = msgspec.msgpack.Decoder(RequestTicket)
rate_state_decoder = msgspec.msgpack.Decoder(RateLimitState)
floating_decoder = msgspec.msgpack.Decoder(FloatingLimitState)


def encode_i64(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def decode_i64(b: bytes) -> int:
    return int.from_bytes(b, "big", signed=True)
