"""ExpediteJob: a future-scheduled pending task becomes due now (same attempt)."""

from __future__ import annotations

import msgspec

from silo import errors
from silo.shard import pending
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import (
    CANCELLED,
    RUNNING,
    STATUS_NAMES,
    TERMINAL,
    ChainStep,
    JobStatus,
)


async def expedite_job(shard: Shard, tenant: str, job_id: str) -> None:
    async with shard.job_lock(tenant, job_id):
        job, stored = await pending.load(shard, tenant, job_id)
        if job is None:
            if stored is None:
                raise errors.job_not_found()
            kind = stored.kind
            if kind not in TERMINAL:
                raise errors.cannot("expedite", job_id, "job has no pending task to expedite",
                                    STATUS_NAMES[kind])
            reason = "job is cancelled" if kind == CANCELLED else "job is already in terminal state"
            raise errors.cannot("expedite", job_id, reason, STATUS_NAMES[kind])
        if job.cancelled_at_ms is not None:
            raise errors.cannot("expedite", job_id, "job is cancelled", STATUS_NAMES[job.kind])
        if job.kind == RUNNING:
            raise errors.cannot("expedite", job_id, "job is currently running", "Running")
        key = job.task_key
        task = job.task
        if key is None or task is None:
            raise errors.cannot("expedite", job_id, "job has no pending task to expedite",
                                "Scheduled")
        group, start, priority, _, attempt, _ = keys.decode_task(key)
        now = shard.now()
        if start <= now:
            raise errors.cannot("expedite", job_id,
                                "task is already ready to run (not future-scheduled)",
                                "Scheduled")
        shard.remove_task(key, task)
        if isinstance(task, ChainStep):  # the chain goes on from now, not its old start
            task = msgspec.structs.replace(task, start_ms=now)
        new_key = keys.task(group, now, priority, job_id, attempt, tenant)
        shard.add_task(new_key, task)
        shard.put_status(tenant, job_id, JobStatus(0, now, now, attempt,
                                                   last_attempt=max(0, attempt - 1)), old=stored)
    await shard.committer.commit()
