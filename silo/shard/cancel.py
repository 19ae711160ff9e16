"""CancelJob: a Scheduled job ends Cancelled at once; a Running one gets a cancel flag.

The worker of a running job learns of the flag from its next heartbeat and reports the
Cancelled outcome (a failure reported instead also ends Cancelled, see outcome.py).
"""

from __future__ import annotations

from silo import errors
from silo.shard import limits
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import (
    CANCELLED,
    RUNNING,
    SCHEDULED,
    Cancellation,
    JobStatus,
    encode,
    job_status_decoder,
)


def _start_of(job, pending) -> int | None:
    """When the pending attempt is due: its task's key, or the parked chain's start."""
    if job.task_key is not None:
        return keys.decode_task(job.task_key)[1]
    return pending.start_ms if pending is not None else None


async def cancel_job(shard: Shard, tenant: str, job_id: str) -> None:
    job = shard.active.get((tenant, job_id))
    if job is None:
        async with shard.job_lock(tenant, job_id):
            raw = await shard.committer.get(keys.job_status(tenant, job_id))
            job = shard.active.get((tenant, job_id))
            if job is None:
                if raw is None:
                    raise errors.job_not_found()
                if job_status_decoder.decode(raw).kind == CANCELLED:
                    raise errors.job_already_cancelled()
                raise errors.job_already_terminal()
    if job.cancelled_at_ms is not None:
        raise errors.job_already_cancelled()
    now = shard.now()
    shard.committer.put(keys.cancellation(tenant, job_id), encode(Cancellation(now)))
    job.cancelled_at_ms = now
    if job.kind == SCHEDULED:
        pending = (shard.tasks.get(job.task_key) if job.task_key is not None
                   else shard.requests.get(job.request_key))
        attempt = pending.attempt if pending is not None else None
        start = _start_of(job, pending)
        limits.abandon_pending(shard, tenant, job, now)
        # Cancelled while scheduled keeps its scheduling fields (upstream behaviour).
        shard.put_status(tenant, job_id, JobStatus(
            CANCELLED, now, start, attempt,
            last_attempt=(attempt - 1) if attempt is not None else 0))
        del shard.active[(tenant, job_id)]
        shard.info_cache.discard(tenant, job_id)
        shard.count_status(tenant, SCHEDULED, CANCELLED)
        shard.count_jobs(completed=1)
    else:
        assert job.kind == RUNNING
    await shard.committer.commit()
