"""Give back: a leased task its worker never started goes back to its queue at once.

Used by the worker stream (silo.rpc.stream) for the tasks a stopping worker had
received but not started, and for the tasks the server leased for a stream but could
not send. Running → Scheduled without counting an attempt: the lease leaves storage
(with its Running index row), the same RunAttempt (same task id, attempt number and
held concurrency slots) is put back due at its original start, and the status says
Scheduled again. A job cancelled meanwhile ends Cancelled instead, as its worker would
have reported.

A lease that bypassed the job's limits (LeaseTask of a named job holds no concurrency
slot) must not go back as that slot-less RunAttempt: LeaseTasks would then run the job
past its concurrency limit. Its attempt walks the job's limits again instead, as a
restart's does, from the same start time and with the same attempt numbers.
"""

from __future__ import annotations

from silo import errors
from silo.shard import limits, outcome
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import (
    RUNNING,
    SCHEDULED,
    ConcurrencyLimit,
    FloatingConcurrencyLimit,
    JobInfo,
    JobStatus,
    RunAttempt,
    job_info_decoder,
)


def _bypassed(task: RunAttempt, info: JobInfo | None) -> bool:
    """The attempt runs without a slot of one of its job's concurrency limits."""
    if info is None:
        return False
    held = set(task.held_queues)
    return any(isinstance(lim, ConcurrencyLimit | FloatingConcurrencyLimit)
               and lim.key not in held for lim in info.limits)


async def give_back(shard: Shard, worker_id: str, task_id: str) -> None:
    """Requeue the unstarted task leased as task_id by worker_id; durable on return."""
    lease = shard.leases.get(task_id)
    if lease is None or not isinstance(lease.task, RunAttempt):
        raise errors.lease_not_found()
    if lease.worker_id != worker_id:
        raise errors.lease_owner_mismatch()
    task = lease.task
    tenant, job_id = task.tenant, task.job_id
    job = shard.active.get((tenant, job_id))
    if job is None or job.cancelled_at_ms is not None:
        await outcome.finish_attempt(shard, lease, outcome.Cancelled())
        await shard.committer.commit()
        return
    info = shard.info_cache.get(tenant, job_id)
    if info is None and not task.held_queues:  # only then can the attempt have bypassed
        raw = await shard.committer.get(keys.job_info(tenant, job_id))
        info = job_info_decoder.decode(raw) if raw is not None else None
        if shard.leases.get(task_id) is not lease:
            raise errors.lease_not_found()  # reported (or reaped) while we read
        job = shard.active.get((tenant, job_id))
        if job is None or job.cancelled_at_ms is not None:  # cancelled while we read
            await outcome.finish_attempt(shard, lease, outcome.Cancelled())
            await shard.committer.commit()
            return
    now = shard.now()
    shard.drop_lease(task_id)
    start = lease.started_at_ms
    job.kind = SCHEDULED
    job.task_id = None
    # The status before the limit walk, as outcome._schedule_retry does (why: there).
    shard.put_status(tenant, job_id, JobStatus(SCHEDULED, now, start, task.attempt,
                                               last_attempt=task.attempt - 1))
    if info is not None and _bypassed(task, info):
        limits.start_attempt(shard, job, tenant=tenant, job_id=job_id, attempt=task.attempt,
                             relative=task.relative_attempt, task_group=task.task_group,
                             priority=lease.priority, start_ms=start, limits=info.limits,
                             now=now)
    else:
        key = keys.task(task.task_group, start, lease.priority, job_id, task.attempt, tenant)
        shard.add_task(key, task)
        job.task_key = key
    shard.settle(tenant, job_id, job)
    shard.count_status(tenant, RUNNING, SCHEDULED)
    await shard.committer.commit()
