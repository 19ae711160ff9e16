"""Reading a job: GetJob (with its attempts) and GetJobResult. Reads never change state."""

from __future__ import annotations

from typing import NamedTuple

from silo import errors
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import (
    ATTEMPT_CANCELLED,
    ATTEMPT_RUNNING,
    CANCELLED,
    RUNNING,
    STATUS_NAMES,
    SUCCEEDED,
    TERMINAL,
    Attempt,
    JobInfo,
    JobStatus,
    RunAttempt,
    attempt_decoder,
    job_info_decoder,
    job_status_decoder,
)


class JobView(NamedTuple):
    info: JobInfo
    status: JobStatus
    attempts: list[Attempt]
    result: bytes | None


class JobResult(NamedTuple):
    status: int
    finished_at_ms: int
    result: bytes | None
    error_code: str
    error_data: bytes | None


async def _status(shard: Shard, tenant: str, job_id: str) -> JobStatus:
    raw = await shard.committer.get(keys.job_status(tenant, job_id))
    if raw is None:
        raise errors.job_not_found()
    return job_status_decoder.decode(raw)


async def _attempt(shard: Shard, tenant: str, job_id: str, n: int) -> Attempt | None:
    if n <= 0:
        return None
    raw = await shard.committer.get(keys.attempt(tenant, job_id, n))
    return attempt_decoder.decode(raw) if raw is not None else None


def _running_attempt(shard: Shard, tenant: str, job_id: str) -> Attempt | None:
    """The attempt in progress is its lease; show it as a Running attempt."""
    job = shard.active.get((tenant, job_id))
    if job is None or job.kind != RUNNING or job.task_id is None:
        return None
    lease = shard.leases.get(job.task_id)
    if lease is None or not isinstance(lease.task, RunAttempt):
        return None
    t = lease.task
    return Attempt(job_id, t.attempt, t.relative_attempt, t.task_id, ATTEMPT_RUNNING,
                   lease.started_at_ms)


async def get_job(shard: Shard, tenant: str, job_id: str, include_attempts: bool) -> JobView:
    # A job enqueued recently and not yet ended is in the info cache, usually with the
    # status it was last given (silo.shard.info_cache): then no storage read at all.
    info = shard.info_cache.get(tenant, job_id)
    if info is None:
        raw = await shard.committer.get(keys.job_info(tenant, job_id))
        if raw is None:
            raise errors.job_not_found()
        info = job_info_decoder.decode(raw)
    status = shard.info_cache.status(tenant, job_id)
    if status is None:
        status = await _status(shard, tenant, job_id)
    attempts: list[Attempt] = []
    if include_attempts:
        rows = await shard.committer.scan_prefix(keys.attempts_prefix(tenant, job_id))
        attempts = [attempt_decoder.decode(v) for _, v in rows]
        running = _running_attempt(shard, tenant, job_id)
        if running is not None:
            attempts = [a for a in attempts if a.attempt != running.attempt] + [running]
    result = None
    if status.kind == SUCCEEDED:
        last = next((a for a in attempts if a.attempt == status.last_attempt), None)
        if last is None:
            last = await _attempt(shard, tenant, job_id, status.last_attempt)
        result = last.result if last is not None else None
    return JobView(info, status, attempts, result)


async def get_job_result(shard: Shard, tenant: str, job_id: str) -> JobResult:
    """The outcome of a terminal job: status from the job, data from its latest attempt."""
    status = await _status(shard, tenant, job_id)
    if status.kind not in TERMINAL:
        raise errors.precondition(f"job is not complete: status is {STATUS_NAMES[status.kind]}")
    last = await _attempt(shard, tenant, job_id, status.last_attempt)
    if last is None:  # cancelled before any attempt ran
        return JobResult(status.kind, status.changed_at_ms, None, "", None)
    finished = last.finished_at_ms if last.finished_at_ms is not None else status.changed_at_ms
    if status.kind == CANCELLED and last.status != ATTEMPT_CANCELLED:
        finished = status.changed_at_ms  # cancelled during retry back-off: the cancel time
    return JobResult(status.kind, finished, last.result, last.error_code or "", last.error_data)
