"""ImportJobs: take over jobs from another system together with their attempt history.

A new job is stored with its finished attempts (numbered 1..n, relative = absolute) and
a status derived from them (`decide_status`): no attempts → Scheduled for attempt 1; the
last attempt Succeeded or Cancelled → that status at its finish time; the last Failed →
Failed when the retry policy is spent (`#failed > retry_count`, or no policy), else
Scheduled for attempt n+1. A Scheduled import walks its limits like an enqueue.

Importing an id that already exists re-imports it: the stored attempts must be the first
k attempts of the request exactly, at least one new attempt must come with it, and only
the retry policy is taken from the request. Running and Succeeded jobs are refused. The
job's pending task, held slots and parked request are dropped before its new state is
written, and the cancel flag is cleared.

Every job is checked and staged on its own (a refused job is a per-job result, nothing
of it is written); the whole call answers once one batch holding all of them is durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from silo import errors
from silo.ids import new_id
from silo.shard import indexes, pending
from silo.shard import limits as limit_chain
from silo.shard.state import ActiveJob, Shard
from silo.storage import keys
from silo.storage.records import (
    ATTEMPT_CANCELLED,
    ATTEMPT_FAILED,
    ATTEMPT_SUCCEEDED,
    CANCELLED,
    FAILED,
    RUNNING,
    SCHEDULED,
    STATUS_NAMES,
    SUCCEEDED,
    TERMINAL,
    Attempt,
    JobInfo,
    JobStatus,
    Limit,
    RetryPolicy,
    attempt_decoder,
    encode,
    job_info_decoder,
    job_status_decoder,
)

_TERMINAL_ATTEMPTS = (ATTEMPT_SUCCEEDED, ATTEMPT_FAILED, ATTEMPT_CANCELLED)


class ImportedAttempt(NamedTuple):
    """A finished attempt from the other system."""

    status: int  # ATTEMPT_SUCCEEDED, ATTEMPT_FAILED or ATTEMPT_CANCELLED
    started_at_ms: int
    finished_at_ms: int
    result: bytes = b""
    error_code: str = ""
    error_data: bytes = b""


class ImportJob(NamedTuple):
    id: str
    priority: int
    enqueue_time_ms: int  # <= 0: now
    start_at_ms: int  # <= 0: now (when the next attempt may start)
    retry_policy: RetryPolicy | None
    payload: bytes
    limits: list[Limit]
    metadata: dict[str, str]
    task_group: str
    attempts: Sequence[ImportedAttempt] = ()


class ImportResult(NamedTuple):
    job_id: str
    success: bool
    error: str | None
    status: int  # the job's status after the import (FAILED for a refused job)


# ---- policy (pure) --------------------------------------------------------------------


def check_attempts(attempts: Sequence[ImportedAttempt]) -> None:
    """Every attempt is finished, and only the last may be anything but Failed."""
    for i, a in enumerate(attempts):
        if a.status not in _TERMINAL_ATTEMPTS:
            raise errors.invalid("import attempts must be terminal (not Running)")
        if i < len(attempts) - 1 and a.status != ATTEMPT_FAILED:
            raise errors.invalid(
                f"import attempt {i + 1} must be Failed (only the last attempt may be non-Failed)")


def decide_status(attempts: Sequence[ImportedAttempt], policy: RetryPolicy | None, now: int,
                  start_ms: int) -> JobStatus:
    """The status a job with this history has (see the module docstring)."""
    n = len(attempts)
    if n == 0:
        return JobStatus(SCHEDULED, now, start_ms, 1)
    last = attempts[-1]
    if last.status == ATTEMPT_SUCCEEDED:
        return JobStatus(SUCCEEDED, last.finished_at_ms, last_attempt=n)
    if last.status == ATTEMPT_CANCELLED:
        return JobStatus(CANCELLED, last.finished_at_ms, last_attempt=n)
    failed = sum(1 for a in attempts if a.status == ATTEMPT_FAILED)
    if policy is None or failed > policy.retry_count:
        return JobStatus(FAILED, last.finished_at_ms, last_attempt=n)
    return JobStatus(SCHEDULED, now, start_ms, n + 1, last_attempt=n)


def same_attempt(stored: Attempt, given: ImportedAttempt) -> bool:
    """Whether a stored attempt is the imported one (status, times, result/error bytes)."""
    if stored.status != given.status or stored.started_at_ms != given.started_at_ms:
        return False
    if (stored.finished_at_ms or 0) != given.finished_at_ms:
        return False
    if given.status == ATTEMPT_SUCCEEDED:
        return (stored.result or b"") == given.result
    if given.status == ATTEMPT_FAILED:
        return ((stored.error_code or "") == given.error_code
                and (stored.error_data or b"") == given.error_data)
    return True


def _attempt_record(job_id: str, number: int, a: ImportedAttempt) -> Attempt:
    rec = Attempt(job_id, number, number, new_id(), a.status, a.started_at_ms, a.finished_at_ms)
    if a.status == ATTEMPT_SUCCEEDED:
        rec.result = a.result
    elif a.status == ATTEMPT_FAILED:
        rec.error_code, rec.error_data = a.error_code, a.error_data
    return rec


# ---- the operation --------------------------------------------------------------------


async def import_jobs(shard: Shard, tenant: str, jobs: Sequence[ImportJob]) -> list[ImportResult]:
    """Import jobs of one tenant; one result per job, in order.

    Raises FAILED_PRECONDITION, importing nothing, if any of the ids is a Running job.
    """
    for job in jobs:
        active = shard.active.get((tenant, job.id))
        if active is not None and active.kind == RUNNING:
            raise errors.cannot("reimport", job.id, "job is currently running", "Running")
    results: list[ImportResult] = []
    for job in jobs:
        try:
            kind = await _import_one(shard, tenant, job)
        except errors.SiloError as e:
            results.append(ImportResult(job.id, False, e.message, FAILED))
        else:
            results.append(ImportResult(job.id, True, None, kind))
    await shard.committer.commit()
    return results


async def _import_one(shard: Shard, tenant: str, job: ImportJob) -> int:
    if not job.id:
        raise errors.invalid("job id is required for import")
    async with shard.job_lock(tenant, job.id):
        raw_info = await shard.committer.get(keys.job_info(tenant, job.id))
        if raw_info is not None:
            return await _reimport(shard, tenant, job, job_info_decoder.decode(raw_info))
        if (tenant, job.id) in shard.active:  # cannot happen: active jobs have info rows
            raise errors.job_already_exists(job.id)
        check_attempts(job.attempts)
        now = shard.now()
        start = job.start_at_ms if job.start_at_ms > 0 else now
        info = JobInfo(job.id, tenant, job.priority,
                       job.enqueue_time_ms if job.enqueue_time_ms > 0 else now, job.payload,
                       job.retry_policy, dict(job.metadata), list(job.limits), job.task_group)
        shard.committer.put(keys.job_info(tenant, job.id), encode(info))
        indexes.put_new_job_rows(shard, info)  # 0x04, 0x10, 0x11
        for i, a in enumerate(job.attempts, 1):
            shard.put_attempt(tenant, _attempt_record(job.id, i, a))
        status = decide_status(job.attempts, job.retry_policy, now, start)
        _enter(shard, tenant, info, status, now)
        shard.count_status(tenant, None, status.kind)
        shard.count_jobs(total=1, completed=1 if status.kind in TERMINAL else 0)
        return status.kind


async def _reimport(shard: Shard, tenant: str, job: ImportJob, info: JobInfo) -> int:
    job_id = job.id
    raw_status = await shard.committer.get(keys.job_status(tenant, job_id))
    if raw_status is None:
        raise errors.job_not_found()
    old = job_status_decoder.decode(raw_status)
    rows = await shard.committer.scan_prefix(keys.attempts_prefix(tenant, job_id))
    active = shard.active.get((tenant, job_id))
    if active is None and old.kind == SCHEDULED:  # queued: its task is only in storage
        active, _ = await pending.load(shard, tenant, job_id)  # the last await here
    old_kind = active.kind if active is not None else old.kind
    name = STATUS_NAMES[old_kind]
    if old_kind == RUNNING:
        raise errors.cannot("reimport", job_id, "job is currently running", name)
    if old_kind == SUCCEEDED:
        raise errors.cannot("reimport", job_id, "job already succeeded", name)
    stored = [attempt_decoder.decode(v) for _, v in rows]
    for i, a in enumerate(stored):
        if a.status not in _TERMINAL_ATTEMPTS:
            raise errors.cannot("reimport", job_id, f"existing attempt {i + 1} is still running",
                                name)
    k = len(stored)
    if len(job.attempts) < k:
        raise errors.cannot("reimport", job_id, f"reimport has {len(job.attempts)} attempts "
                            f"but job has {k} existing attempts", name)
    for i, (a, given) in enumerate(zip(stored, job.attempts, strict=False)):
        if not same_attempt(a, given):
            raise errors.cannot("reimport", job_id,
                                f"existing attempt {i + 1} does not match reimport data", name)
    if len(job.attempts) == k:
        raise errors.cannot("reimport", job_id, "reimport must include at least one new attempt",
                            name)
    new = job.attempts[k:]
    check_attempts(new)
    now = shard.now()
    start = job.start_at_ms if job.start_at_ms > 0 else now
    for i, a in enumerate(new, k + 1):
        shard.put_attempt(tenant, _attempt_record(job_id, i, a))
    status = decide_status(job.attempts, job.retry_policy, now, start)
    info.retry_policy = job.retry_policy  # the only field a re-import changes
    shard.committer.put(keys.job_info(tenant, job_id), encode(info))
    if active is not None:  # Scheduled: its pending task, slots and parked request go
        limit_chain.abandon_pending(shard, tenant, active, now)
        shard.active.pop((tenant, job_id), None)
    shard.info_cache.discard(tenant, job_id)
    shard.committer.delete(keys.cancellation(tenant, job_id))
    _enter(shard, tenant, info, status, now, old)
    shard.count_status(tenant, old_kind, status.kind)
    was_done, done = old_kind in TERMINAL, status.kind in TERMINAL
    shard.count_jobs(completed=int(done) - int(was_done))
    return status.kind


def _enter(shard: Shard, tenant: str, info: JobInfo, status: JobStatus, now: int,
           old: JobStatus | None = None) -> None:
    """Write the job's status; a Scheduled job becomes active first (as in enqueue) and
    starts its limit chain. `old`: the status a re-import replaces, which the status
    index needs to drop its old row."""
    if status.kind != SCHEDULED:
        shard.put_status(tenant, info.id, status, old)
        return
    assert status.current_attempt is not None and status.next_attempt_starts_after_ms is not None
    job = shard.active[(tenant, info.id)] = ActiveJob(SCHEDULED)
    shard.put_status(tenant, info.id, status, old)
    shard.info_cache.put(info)
    limit_chain.start_attempt(shard, job, tenant=tenant, job_id=info.id,
                              attempt=status.current_attempt, relative=status.current_attempt,
                              task_group=info.task_group, priority=info.priority,
                              start_ms=status.next_attempt_starts_after_ms,
                              limits=info.limits, now=now)
    shard.settle(tenant, info.id, job)
