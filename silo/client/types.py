"""Small typed classes of the client API, and their conversion to and from the protos.

Payloads, results and error data travel as msgpack (``SerializedBytes.msgpack``); the
client encodes with msgspec. Decoding is strict for job payloads (empty bytes are an
error) and tolerant for results and error data (empty → None, undecodable → the bytes
as UTF-8 text), like Silo's TypeScript client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgspec

from silo._proto import silo_pb2 as pb

_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode


def encode(value: Any) -> bytes:
    """msgpack-encode a value (bytes become msgpack bin, like a Uint8Array in JS)."""
    return _encode(value)


def decode_strict(data: bytes) -> Any:
    if not data:
        raise ValueError("No bytes to decode: the payload is empty")
    return _decode(data)


def decode_tolerant(data: bytes | None) -> Any:
    if not data:
        return None
    try:
        return _decode(data)
    except (msgspec.DecodeError, ValueError):
        return data.decode("utf-8", "replace")


# ---- enums ---------------------------------------------------------------------------


class JobStatus(enum.IntEnum):
    SCHEDULED = pb.JOB_STATUS_SCHEDULED
    RUNNING = pb.JOB_STATUS_RUNNING
    SUCCEEDED = pb.JOB_STATUS_SUCCEEDED
    FAILED = pb.JOB_STATUS_FAILED
    CANCELLED = pb.JOB_STATUS_CANCELLED

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

    @property
    def label(self) -> str:
        return self.name.capitalize()


class AttemptStatus(enum.IntEnum):
    RUNNING = pb.ATTEMPT_STATUS_RUNNING
    SUCCEEDED = pb.ATTEMPT_STATUS_SUCCEEDED
    FAILED = pb.ATTEMPT_STATUS_FAILED
    CANCELLED = pb.ATTEMPT_STATUS_CANCELLED

    @property
    def label(self) -> str:
        return self.name.capitalize()


class RateLimitAlgorithm(enum.IntEnum):
    TOKEN_BUCKET = pb.GUBERNATOR_ALGORITHM_TOKEN_BUCKET
    LEAKY_BUCKET = pb.GUBERNATOR_ALGORITHM_LEAKY_BUCKET


def _status(v: int) -> JobStatus | int:
    try:
        return JobStatus(v)
    except ValueError:
        return v


# ---- enqueue options -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to ``retry_count`` extra attempts, back-off from ``initial_interval_ms`` ×
    ``backoff_factor`` per attempt, capped at ``max_interval_ms``."""

    retry_count: int
    initial_interval_ms: int = 1000
    max_interval_ms: int = 60_000
    randomize_interval: bool = False
    backoff_factor: float = 2.0

    def to_pb(self) -> pb.RetryPolicy:
        return pb.RetryPolicy(retry_count=self.retry_count,
                              initial_interval_ms=self.initial_interval_ms,
                              max_interval_ms=self.max_interval_ms,
                              randomize_interval=self.randomize_interval,
                              backoff_factor=self.backoff_factor)

    @classmethod
    def from_pb(cls, m: pb.RetryPolicy) -> RetryPolicy:
        return cls(m.retry_count, m.initial_interval_ms, m.max_interval_ms,
                   m.randomize_interval, m.backoff_factor)


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """At most ``max_concurrency`` jobs sharing ``key`` (per tenant) run at once."""

    key: str
    max_concurrency: int

    def to_pb(self) -> pb.Limit:
        return pb.Limit(concurrency=pb.ConcurrencyLimit(key=self.key,
                                                        max_concurrency=self.max_concurrency))


@dataclass(frozen=True, slots=True)
class RateLimitRetryPolicy:
    initial_backoff_ms: int = 0
    max_backoff_ms: int = 0
    backoff_multiplier: float = 0.0
    max_retries: int = 0

    def to_pb(self) -> pb.RateLimitRetryPolicy:
        return pb.RateLimitRetryPolicy(initial_backoff_ms=self.initial_backoff_ms,
                                       max_backoff_ms=self.max_backoff_ms,
                                       backoff_multiplier=self.backoff_multiplier,
                                       max_retries=self.max_retries)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``limit`` hits per ``duration_ms`` for (``name``, ``unique_key``)."""

    name: str
    unique_key: str
    limit: int
    duration_ms: int
    hits: int = 1
    algorithm: RateLimitAlgorithm = RateLimitAlgorithm.TOKEN_BUCKET
    behavior: int = 0
    retry_policy: RateLimitRetryPolicy | None = None

    def to_pb(self) -> pb.Limit:
        m = pb.GubernatorRateLimit(name=self.name, unique_key=self.unique_key, limit=self.limit,
                                   duration_ms=self.duration_ms, hits=self.hits,
                                   algorithm=int(self.algorithm), behavior=self.behavior)
        if self.retry_policy is not None:
            m.retry_policy.CopyFrom(self.retry_policy.to_pb())
        return pb.Limit(rate_limit=m)


@dataclass(frozen=True, slots=True)
class FloatingConcurrencyLimit:
    """A concurrency limit whose maximum workers recompute every ``refresh_interval_ms``."""

    key: str
    default_max_concurrency: int
    refresh_interval_ms: int
    metadata: dict[str, str] = field(default_factory=dict)

    def to_pb(self) -> pb.Limit:
        return pb.Limit(floating_concurrency=pb.FloatingConcurrencyLimit(
            key=self.key, default_max_concurrency=self.default_max_concurrency,
            refresh_interval_ms=self.refresh_interval_ms, metadata=self.metadata))


Limit = ConcurrencyLimit | RateLimit | FloatingConcurrencyLimit


def limit_from_pb(m: pb.Limit) -> Limit | None:
    kind = m.WhichOneof("limit")
    if kind == "concurrency":
        return ConcurrencyLimit(m.concurrency.key, m.concurrency.max_concurrency)
    if kind == "rate_limit":
        r = m.rate_limit
        rp = None
        if r.HasField("retry_policy"):
            p = r.retry_policy
            rp = RateLimitRetryPolicy(p.initial_backoff_ms, p.max_backoff_ms,
                                      p.backoff_multiplier, p.max_retries)
        try:
            alg = RateLimitAlgorithm(r.algorithm)
        except ValueError:
            alg = RateLimitAlgorithm.TOKEN_BUCKET
        return RateLimit(r.name, r.unique_key, r.limit, r.duration_ms, r.hits, alg,
                         r.behavior, rp)
    if kind == "floating_concurrency":
        f = m.floating_concurrency
        return FloatingConcurrencyLimit(f.key, f.default_max_concurrency,
                                        f.refresh_interval_ms, dict(f.metadata))
    return None


def limits_from_pb(ms) -> list[Limit]:
    return [x for x in (limit_from_pb(m) for m in ms) if x is not None]


# ---- jobs ----------------------------------------------------------------------------


@dataclass(slots=True)
class JobAttempt:
    job_id: str
    attempt_number: int
    task_id: str
    status: AttemptStatus | int
    started_at_ms: int
    finished_at_ms: int | None = None
    result: Any = None
    error_code: str | None = None
    error_data: Any = None

    @classmethod
    def from_pb(cls, m: pb.JobAttempt) -> JobAttempt:
        try:
            st: AttemptStatus | int = AttemptStatus(m.status)
        except ValueError:
            st = m.status
        return cls(
            m.job_id, m.attempt_number, m.task_id, st, m.started_at_ms,
            m.finished_at_ms if m.HasField("finished_at_ms") else None,
            decode_tolerant(m.result.msgpack) if m.HasField("result") else None,
            m.error_code if m.HasField("error_code") else None,
            decode_tolerant(m.error_data.msgpack) if m.HasField("error_data") else None)


@dataclass(slots=True)
class Job:
    """A job as GetJob returns it; ``payload`` and ``result`` are decoded."""

    id: str
    tenant: str | None
    status: JobStatus | int
    priority: int
    task_group: str
    enqueue_time_ms: int
    status_changed_at_ms: int
    payload: Any
    metadata: dict[str, str]
    limits: list[Limit]
    retry_policy: RetryPolicy | None = None
    next_attempt_starts_after_ms: int | None = None
    result: Any = None
    attempts: list[JobAttempt] = field(default_factory=list)

    @classmethod
    def from_pb(cls, m: pb.GetJobResponse, tenant: str | None = None) -> Job:
        return cls(
            id=m.id, tenant=tenant, status=_status(m.status), priority=m.priority,
            task_group=m.task_group, enqueue_time_ms=m.enqueue_time_ms,
            status_changed_at_ms=m.status_changed_at_ms,
            payload=decode_tolerant(m.payload.msgpack) if m.HasField("payload") else None,
            metadata=dict(m.metadata), limits=limits_from_pb(m.limits),
            retry_policy=(RetryPolicy.from_pb(m.retry_policy)
                          if m.HasField("retry_policy") else None),
            next_attempt_starts_after_ms=(m.next_attempt_starts_after_ms
                                          if m.HasField("next_attempt_starts_after_ms")
                                          else None),
            result=decode_tolerant(m.result.msgpack) if m.HasField("result") else None,
            attempts=[JobAttempt.from_pb(a) for a in m.attempts])


@dataclass(slots=True)
class JobResult:
    """A finished job's outcome: ``result`` when Succeeded, ``error_code``/``error_data``
    when Failed, neither when Cancelled."""

    id: str
    status: JobStatus | int
    finished_at_ms: int = 0
    result: Any = None
    error_code: str | None = None
    error_data: Any = None

    @property
    def succeeded(self) -> bool:
        return self.status == JobStatus.SUCCEEDED

    @property
    def failed(self) -> bool:
        return self.status == JobStatus.FAILED

    @property
    def cancelled(self) -> bool:
        return self.status == JobStatus.CANCELLED

    @classmethod
    def from_pb(cls, m: pb.GetJobResultResponse) -> JobResult:
        r = cls(m.id, _status(m.status), m.finished_at_ms)
        kind = m.WhichOneof("result")
        if kind == "success_data":
            r.result = decode_tolerant(m.success_data.msgpack)
        elif kind == "failure":
            r.error_code = m.failure.error_code
            r.error_data = decode_tolerant(m.failure.error_data.msgpack)
        return r


# ---- worker protocol -----------------------------------------------------------------


class Task:
    """A leased job attempt. ``payload`` is decoded on first access (strictly: an empty
    payload raises); ``payload_bytes`` holds the raw msgpack."""

    __slots__ = ("id", "job_id", "tenant_id", "attempt_number", "relative_attempt_number",
                 "is_last_attempt", "metadata", "_limits", "payload_bytes", "priority",
                 "shard", "task_group", "lease_ms", "_payload", "_decoded")

    def __init__(self, m: pb.Task) -> None:
        self.id: str = m.id
        self.job_id: str = m.job_id
        self.tenant_id: str | None = m.tenant_id if m.HasField("tenant_id") else None
        self.attempt_number: int = m.attempt_number
        self.relative_attempt_number: int = m.relative_attempt_number
        self.is_last_attempt: bool = m.is_last_attempt
        self.metadata: dict[str, str] = dict(m.metadata)
        self._limits = m.limits
        self.payload_bytes: bytes = m.payload.msgpack
        self.priority: int = m.priority
        self.shard: str = m.shard
        self.task_group: str = m.task_group
        self.lease_ms: int = m.lease_ms
        self._decoded = False
        self._payload: Any = None

    @property
    def payload(self) -> Any:
        if not self._decoded:
            self._payload = decode_strict(self.payload_bytes)
            self._decoded = True
        return self._payload

    @property
    def limits(self) -> list[Limit]:
        return limits_from_pb(self._limits)

    def __repr__(self) -> str:
        return (f"Task(id={self.id!r}, job_id={self.job_id!r}, tenant_id={self.tenant_id!r}, "
                f"attempt={self.attempt_number}, shard={self.shard!r})")


@dataclass(slots=True)
class RefreshTask:
    """A leased request to recompute a floating concurrency limit's maximum."""

    id: str
    queue_key: str
    current_max_concurrency: int
    last_refreshed_at_ms: int
    metadata: dict[str, str]
    lease_ms: int
    shard: str
    task_group: str
    tenant_id: str | None

    @classmethod
    def from_pb(cls, m: pb.RefreshFloatingLimitTask) -> RefreshTask:
        return cls(m.id, m.queue_key, m.current_max_concurrency, m.last_refreshed_at_ms,
                   dict(m.metadata), m.lease_ms, m.shard, m.task_group,
                   m.tenant_id if m.HasField("tenant_id") else None)


@dataclass(slots=True)
class LeaseResult:
    tasks: list[Task]
    refresh_tasks: list[RefreshTask]


# Outcomes a worker reports (a handler may also return Failure/Cancelled itself).


@dataclass(frozen=True, slots=True)
class Success:
    result: Any = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt: ``data`` is msgpack-encoded unless it is already ``bytes``."""

    code: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Cancelled:
    pass


Outcome = Success | Failure | Cancelled


def outcome_to_pb(req: pb.ReportOutcomeRequest, outcome: Outcome | Any) -> None:
    if isinstance(outcome, Failure):
        data = outcome.data
        raw = data if isinstance(data, bytes | bytearray) else _encode(data)
        req.failure.code = outcome.code
        req.failure.data.msgpack = bytes(raw)
    elif isinstance(outcome, Cancelled):
        req.cancelled.SetInParent()
    else:
        value = outcome.result if isinstance(outcome, Success) else outcome
        req.success.msgpack = _encode(value)


# ---- import and query ----------------------------------------------------------------


@dataclass(slots=True)
class ImportAttempt:
    status: AttemptStatus
    started_at_ms: int
    finished_at_ms: int
    result: Any = None
    error_code: str | None = None
    error_data: Any = None

    def to_pb(self) -> pb.ImportAttempt:
        m = pb.ImportAttempt(status=int(self.status), started_at_ms=self.started_at_ms,
                             finished_at_ms=self.finished_at_ms)
        if self.status == AttemptStatus.SUCCEEDED:
            m.result.msgpack = _encode(self.result)
        if self.error_code is not None:
            m.error_code = self.error_code
        if self.error_data is not None:
            m.error_data.msgpack = _encode(self.error_data)
        return m


@dataclass(slots=True)
class ImportJob:
    id: str
    payload: Any
    task_group: str
    tenant: str | None = None
    priority: int = 50
    enqueue_time_ms: int = 0
    start_at_ms: int = 0
    retry_policy: RetryPolicy | None = None
    limits: list[Limit] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    attempts: list[ImportAttempt] = field(default_factory=list)


@dataclass(slots=True)
class ImportResult:
    id: str
    success: bool
    error: str | None
    status: JobStatus | int


@dataclass(slots=True)
class QueryResult:
    columns: list[tuple[str, str]]
    rows: list[Any]
