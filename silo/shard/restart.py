"""RestartJob: a Failed or Cancelled job runs again with a fresh retry budget.

The new attempt number is the highest existing one + 1 (attempt numbers never repeat),
the relative attempt number restarts at 1, and the cancel flag is cleared.
"""

from __future__ import annotations

from silo import errors
from silo.shard import limits
from silo.shard.state import ActiveJob, Shard
from silo.storage import keys
from silo.storage.records import (
    CANCELLED,
    FAILED,
    SCHEDULED,
    STATUS_NAMES,
    SUCCEEDED,
    JobStatus,
    attempt_decoder,
    job_info_decoder,
    job_status_decoder,
)


async def restart_job(shard: Shard, tenant: str, job_id: str) -> None:
    async with shard.job_lock(tenant, job_id):
        job = shard.active.get((tenant, job_id))
        if job is not None:
            raise errors.cannot("restart", job_id, "job is still in progress",
                                STATUS_NAMES[job.kind])
        raw_status = await shard.committer.get(keys.job_status(tenant, job_id))
        raw_info = await shard.committer.get(keys.job_info(tenant, job_id))
        if raw_status is None or raw_info is None:
            raise errors.job_not_found()
        status = job_status_decoder.decode(raw_status)
        if status.kind == SUCCEEDED:
            raise errors.cannot("restart", job_id, "job already succeeded", "Succeeded")
        if status.kind not in (FAILED, CANCELLED):
            raise errors.cannot("restart", job_id, "job is still in progress",
                                STATUS_NAMES[status.kind])
        info = job_info_decoder.decode(raw_info)
        rows = await shard.committer.scan_prefix(keys.attempts_prefix(tenant, job_id))
        highest = max([attempt_decoder.decode(v).attempt for _, v in rows]
                      + [status.last_attempt, (status.current_attempt or 1) - 1])
        now = shard.now()
        start = max(info.enqueue_time_ms, now)
        attempt = highest + 1
        shard.committer.delete(keys.cancellation(tenant, job_id))
        job = shard.active[(tenant, job_id)] = ActiveJob(SCHEDULED)
        # Unlike upstream, a restarted attempt goes through the job's limits like any other.
        limits.start_attempt(shard, job, tenant=tenant, job_id=job_id, attempt=attempt,
                             relative=1, task_group=info.task_group, priority=info.priority,
                             start_ms=start, limits=info.limits, now=now)
        shard.info_cache.put(info)
        shard.put_status(tenant, job_id, JobStatus(SCHEDULED, now, start, attempt,
                                                   last_attempt=status.last_attempt),
                         old=status)
        shard.settle(tenant, job_id, job)
        shard.count_status(tenant, status.kind, SCHEDULED)
        shard.count_jobs(completed=-1)
    await shard.committer.commit()
