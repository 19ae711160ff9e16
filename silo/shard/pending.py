"""Reading a queued job back from storage: its status and its pending task.

A Scheduled job whose pending step is a task row has no in-memory entry (the backlog
lives in storage, silo.shard.buffer). The operations that change such a job (cancel,
expedite, LeaseTask, re-import) find its task from the status and info rows: the task
key is (task group, next-attempt time, priority, job id, current attempt, tenant),
every field known from those two rows, except for a rate-limit re-check, which waits
under a later start time and leaves a pointer row (0x0E) naming its key.

`load` returns an ActiveJob built from storage (not registered in `shard.active`; its
`index_key` is the job's current status-index row and `task` the pending task), or
the in-memory entry of a Running or parked job. Callers hold the job's lock, so no
other read-then-write operation on the job interleaves; a lease that takes the task
while we read shows up as the job entering `shard.active`, which `load` re-checks
after its last await.
"""

from __future__ import annotations

from silo.shard.state import ActiveJob, Shard, status_index_key
from silo.storage import keys
from silo.storage.records import (
    SCHEDULED,
    JobStatus,
    Task,
    job_info_decoder,
    job_status_decoder,
    task_decoder,
)


async def load(shard: Shard, tenant: str, job_id: str
               ) -> tuple[ActiveJob | None, JobStatus | None]:
    """(job, status): the in-memory entry and None; or a job read from storage with
    its stored status (job None when the job is missing or has no pending task)."""
    for _ in range(3):
        job = shard.active.get((tenant, job_id))
        if job is not None:
            return job, None
        raw = await shard.committer.get(keys.job_status(tenant, job_id))
        if (job := shard.active.get((tenant, job_id))) is not None:
            return job, None
        if raw is None:
            return None, None
        status = job_status_decoder.decode(raw)
        if status.kind != SCHEDULED:
            return None, status
        found = await find_task(shard, tenant, job_id, status)
        if (job := shard.active.get((tenant, job_id))) is not None:
            return job, None
        if found is None:
            return None, status  # Scheduled without a task (a dropped rate-limit chain)
        key, task = found
        if not shard.buffer(task.task_group).live(key, shard.committer):
            continue  # taken while we read; look again
        job = ActiveJob(SCHEDULED, task_key=key)
        job.task = task
        job.index_key = status_index_key(tenant, job_id, status)
        return job, status
    return None, None


async def find_task(shard: Shard, tenant: str, job_id: str, status: JobStatus
                    ) -> tuple[bytes, Task] | None:
    """The pending task row of a Scheduled job, if it has one."""
    if status.current_attempt is None or status.next_attempt_starts_after_ms is None:
        return None
    info = shard.info_cache.get(tenant, job_id)
    if info is None:
        raw = await shard.committer.get(keys.job_info(tenant, job_id))
        if raw is None:
            return None
        info = job_info_decoder.decode(raw)
    candidates = [keys.task(info.task_group, status.next_attempt_starts_after_ms,
                            info.priority, job_id, status.current_attempt, tenant)]
    pointer = await shard.committer.get(keys.pending_pointer(tenant, job_id))
    if pointer is not None:
        candidates.insert(0, pointer)
    buf = shard.buffer(info.task_group)
    for key in candidates:
        task = buf.get(key)
        if task is None:
            raw = await shard.committer.get(key)
            task = task_decoder.decode(raw) if raw is not None else None
        if task is not None and task.job_id == job_id and task.tenant == tenant:
            return key, task
    return None
