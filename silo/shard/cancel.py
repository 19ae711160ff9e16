"""CancelJob: a Scheduled job ends Cancelled at once; a Running one gets a cancel flag.

The worker of a running job learns of the flag from its next heartbeat and reports the
Cancelled outcome (a failure reported instead also ends Cancelled, see outcome.py).
"""

from __future__ import annotations

from silo import errors
from silo.shard import limits, pending
from silo.shard.state import ActiveJob, Shard
from silo.storage import keys
from silo.storage.records import (
    CANCELLED,
    RUNNING,
    SCHEDULED,
    TERMINAL,
    Cancellation,
    JobStatus,
    encode,
)


def _start_of(job, pending_step) -> int | None:
    """When the pending attempt is due: its task's key, or the parked chain's start."""
    if job.task_key is not None:
        return keys.decode_task(job.task_key)[1]
    return pending_step.start_ms if pending_step is not None else None


async def cancel_job(shard: Shard, tenant: str, job_id: str) -> None:
    job = shard.active.get((tenant, job_id))
    stored = None
    if job is None:
        async with shard.job_lock(tenant, job_id):
            job, stored = await pending.load(shard, tenant, job_id)
            if job is None:
                if stored is None:
                    raise errors.job_not_found()
                if stored.kind == CANCELLED:
                    raise errors.job_already_cancelled()
                if stored.kind in TERMINAL:
                    raise errors.job_already_terminal()
            _cancel(shard, tenant, job_id, job, stored)
    else:
        _cancel(shard, tenant, job_id, job, None)
    await shard.committer.commit()


def _cancel(shard: Shard, tenant: str, job_id: str, job: ActiveJob | None,
            stored: JobStatus | None) -> None:
    """Stage the cancel (no await). `job` None: a Scheduled job without a pending task;
    `stored`: the job's status when it was read from storage (not in memory)."""
    if job is not None and job.cancelled_at_ms is not None:
        raise errors.job_already_cancelled()
    now = shard.now()
    shard.committer.put(keys.cancellation(tenant, job_id), encode(Cancellation(now)))
    if job is not None and job.kind == RUNNING:
        job.cancelled_at_ms = now
        return
    if job is None:
        assert stored is not None
        step = None
        attempt = stored.current_attempt
        start = stored.next_attempt_starts_after_ms
    else:
        # Read from storage (`task`), or parked (its request).
        step = (job.task if job.request_key is None
                else shard.requests.get(job.request_key))
        attempt = step.attempt if step is not None else None
        start = _start_of(job, step)
        limits.abandon_pending(shard, tenant, job, now)
    # Cancelled while scheduled keeps its scheduling fields (upstream behaviour).
    shard.put_status(tenant, job_id, JobStatus(
        CANCELLED, now, start, attempt,
        last_attempt=(attempt - 1) if attempt is not None else 0), old=stored)
    shard.active.pop((tenant, job_id), None)
    shard.info_cache.discard(tenant, job_id)
    shard.count_status(tenant, SCHEDULED, CANCELLED)
    shard.count_jobs(completed=1)
