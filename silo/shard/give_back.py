"""Give back: a leased task its worker never started goes back to its queue at once.

Used by the worker stream (silo.rpc.stream) for the tasks a stopping worker had
received but not started, and for the tasks the server leased for a stream but could
not send. Running → Scheduled without counting an attempt: the lease leaves storage
(with its Running index row), the same RunAttempt (same task id, attempt number and
held concurrency slots) is put back due at its original start, and the status says
Scheduled again. A job cancelled meanwhile ends Cancelled instead, as its worker would
have reported.
"""

from __future__ import annotations

from silo import errors
from silo.shard import outcome
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import RUNNING, SCHEDULED, JobStatus, RunAttempt


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
    now = shard.now()
    shard.drop_lease(task_id)
    start = lease.started_at_ms
    key = keys.task(task.task_group, start, lease.priority, job_id, task.attempt, tenant)
    shard.add_task(key, task)
    job.kind = SCHEDULED
    job.task_id = None
    job.task_key = key
    shard.put_status(tenant, job_id, JobStatus(SCHEDULED, now, start, task.attempt,
                                               last_attempt=task.attempt - 1))
    shard.settle(tenant, job_id, job)
    shard.count_status(tenant, RUNNING, SCHEDULED)
    await shard.committer.commit()
