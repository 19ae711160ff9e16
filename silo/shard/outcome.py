"""Ending an attempt: ReportOutcome, and the lease reaper's WORKER_CRASHED failures.

success → Succeeded; cancelled → Cancelled; failure → a retry (new attempt, new task id,
Scheduled at now + back-off) while the retry policy allows, else Failed. A failure
reported after a cancel request ends the job Cancelled (our decision on the upstream
quirk: a cancelled job must not come back through a retry).
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from silo import errors
from silo.observability import tracing
from silo.shard import limits, retry
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
    SUCCEEDED,
    Attempt,
    JobInfo,
    JobStatus,
    Lease,
    RunAttempt,
    job_info_decoder,
)

WORKER_CRASHED = "WORKER_CRASHED"


class Success(NamedTuple):
    result: bytes


class Failure(NamedTuple):
    code: str
    data: bytes


class Cancelled(NamedTuple):
    pass


Outcome = Success | Failure | Cancelled

_msgpack = msgspec.msgpack.Encoder()


@tracing.traced("report_outcome")
async def report_outcome(shard: Shard, task_id: str, outcome: Outcome) -> None:
    """Apply a worker's outcome for the attempt leased as task_id."""
    await stage_outcome(shard, task_id, outcome)
    await shard.committer.commit()


async def stage_outcome(shard: Shard, task_id: str, outcome: Outcome) -> Lease:
    """`report_outcome` up to its commit wait; returns the attempt's lease. A Success or
    Cancelled never waits (a Failure may read the job's retry policy)."""
    if not isinstance(outcome, Failure):
        return stage_final(shard, task_id, outcome)
    lease = shard.leases.get(task_id)
    if lease is None or not isinstance(lease.task, RunAttempt):
        raise errors.lease_not_found()
    await finish_attempt(shard, lease, outcome)
    return lease


def stage_final(shard: Shard, task_id: str, outcome: Success | Cancelled) -> Lease:
    """`stage_outcome` of a Success or Cancelled, which never reads storage: synchronous,
    so a batch of outcomes (silo.rpc.batch) stages each without a coroutine."""
    lease = shard.leases.get(task_id)
    if lease is None or not isinstance(lease.task, RunAttempt):
        raise errors.lease_not_found()
    _end_attempt(shard, lease, outcome, None, None)
    return lease


async def finish_attempt(shard: Shard, lease: Lease, outcome: Outcome) -> None:
    """Stage the end of a leased attempt. Shared by ReportOutcome and the reaper."""
    task = lease.task
    assert isinstance(task, RunAttempt)
    tenant, job_id = task.tenant, task.job_id
    policy = None
    info = None
    if isinstance(outcome, Failure):
        info = shard.info_cache.get(tenant, job_id)
        if info is None:
            raw = await shard.committer.get(keys.job_info(tenant, job_id))
            info = job_info_decoder.decode(raw) if raw is not None else None
        policy = info.retry_policy if info is not None else None
        if shard.leases.get(task.task_id) is not lease:
            raise errors.lease_not_found()  # reported (or reaped) while we read
    _end_attempt(shard, lease, outcome, info, policy)


def _end_attempt(shard: Shard, lease: Lease, outcome: Outcome, info: JobInfo | None,
                 policy) -> None:
    """The synchronous step of finish_attempt, once a failure's retry policy is known."""
    task = lease.task
    assert isinstance(task, RunAttempt)
    tenant, job_id = task.tenant, task.job_id
    job = shard.active.get((tenant, job_id))
    if job is None:  # cannot happen while the lease exists; keep storage consistent anyway
        job = ActiveJob(RUNNING, task_id=task.task_id)
    now = shard.now()
    shard.drop_lease(task.task_id)
    # Every end of an attempt frees its slots; a retry queues for them again from scratch.
    if task.held_queues:
        limits.release(shard, tenant, list(task.held_queues), task.task_id, now)
    attempt = Attempt(job_id, task.attempt, task.relative_attempt, task.task_id, 0,
                      lease.started_at_ms, now)
    if isinstance(outcome, Failure) and job.cancelled_at_ms is not None:
        outcome_kind = CANCELLED
        attempt.status, attempt.error_code, attempt.error_data = (
            ATTEMPT_FAILED, outcome.code, outcome.data)
    elif isinstance(outcome, Success):
        outcome_kind = SUCCEEDED
        attempt.status, attempt.result = ATTEMPT_SUCCEEDED, outcome.result
    elif isinstance(outcome, Cancelled):
        outcome_kind = CANCELLED
        attempt.status = ATTEMPT_CANCELLED
    else:
        attempt.status, attempt.error_code, attempt.error_data = (
            ATTEMPT_FAILED, outcome.code, outcome.data)
        outcome_kind = FAILED
        if info is not None and retry.should_retry(policy, task.relative_attempt):
            assert policy is not None
            next_ms = now + retry.retry_delay_ms(policy, task.relative_attempt, now)
            shard.put_attempt(tenant, attempt)
            _schedule_retry(shard, job, task, info, next_ms, now)
            return
    shard.put_attempt(tenant, attempt)
    shard.put_status(tenant, job_id, JobStatus(outcome_kind, now, last_attempt=task.attempt))
    shard.active.pop((tenant, job_id), None)
    shard.info_cache.discard(tenant, job_id)
    shard.count_status(tenant, RUNNING, outcome_kind)
    shard.count_jobs(completed=1)


def _schedule_retry(shard: Shard, job: ActiveJob, task: RunAttempt, info: JobInfo,
                    next_ms: int, now: int) -> None:
    job.kind = SCHEDULED
    job.task_id = None
    shard.active[(task.tenant, task.job_id)] = job
    # The status first, while the job is surely in `active`: put_status replaces the
    # index row the job remembers (the Running one, which holds the lease). A retry
    # joins its queue and grants it (limits.walk), and a grant that resumes this job
    # settles it out of `active`, after which put_status would leave that row behind.
    shard.put_status(task.tenant, task.job_id, JobStatus(
        SCHEDULED, now, next_ms, task.attempt + 1, last_attempt=task.attempt))
    limits.start_attempt(shard, job, tenant=task.tenant, job_id=task.job_id,
                         attempt=task.attempt + 1, relative=task.relative_attempt + 1,
                         task_group=task.task_group, priority=info.priority, start_ms=next_ms,
                         limits=info.limits, now=now, retry=True)
    shard.settle(task.tenant, task.job_id, job)
    shard.count_status(task.tenant, RUNNING, SCHEDULED)


async def heartbeat(shard: Shard, worker_id: str, task_id: str) -> int | None:
    """Extend a lease to now + lease_ms; return the job's cancellation time, if any."""
    lease = shard.leases.get(task_id)
    if lease is None:
        raise errors.lease_not_found()
    if lease.worker_id != worker_id:
        raise errors.lease_owner_mismatch()
    lease = msgspec.structs.replace(lease, expiry_ms=shard.now() + shard.config.lease_ms)
    shard.put_lease(lease)
    await shard.committer.commit()
    task = lease.task
    if isinstance(task, RunAttempt):
        job = shard.active.get((task.tenant, task.job_id))
        if job is not None:
            return job.cancelled_at_ms
    return None


def crash_outcome(lease: Lease, now: int) -> Failure:
    text = f"lease expired at {lease.expiry_ms} (now {now}), worker={lease.worker_id}"
    return Failure(WORKER_CRASHED, _msgpack.encode(text))
