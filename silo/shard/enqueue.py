"""Enqueue: validate a new job, write it and its first task in one durable batch."""

from __future__ import annotations

from silo import errors
from silo.ids import new_id
from silo.observability import tracing
from silo.shard import indexes
from silo.shard import limits as limit_chain
from silo.shard.state import ActiveJob, Shard
from silo.shard.validate import (  # noqa: F401  (re-exported for older callers)
    MAX_JOB_ID_CHARS,
    MAX_TASK_GROUP_CHARS,
    validate_job_fields,
    validate_metadata,
)
from silo.storage import keys
from silo.storage.records import (
    SCHEDULED,
    JobInfo,
    JobStatus,
    Limit,
    RetryPolicy,
    encode,
)


def validate_job(
    job_id: str, priority: int, task_group: str, metadata: dict[str, str], limits: list[Limit],
    retry_policy: RetryPolicy | None = None, start_at_ms: int = 0,
) -> None:
    """The checks of behaviour.md §1.2 Enqueue, in its order, plus our own bounds."""
    validate_job_fields(job_id, priority, task_group, metadata, limits, retry_policy,
                        start_at_ms)


@tracing.traced("enqueue")
async def enqueue(
    shard: Shard,
    *,
    tenant: str,
    job_id: str,
    priority: int,
    start_at_ms: int,
    retry_policy: RetryPolicy | None,
    payload: bytes,
    limits: list[Limit],
    metadata: dict[str, str],
    task_group: str,
) -> str:
    """Store a new job as Scheduled with attempt 1 pending; return its id once durable."""
    info = new_job(tenant=tenant, job_id=job_id, priority=priority, start_at_ms=start_at_ms,
                   retry_policy=retry_policy, payload=payload, limits=limits,
                   metadata=metadata, task_group=task_group)
    if not job_id:
        _stage(shard, info)
    else:
        async with shard.job_lock(tenant, job_id):
            if (tenant, job_id) in shard.active or (
                await shard.committer.get(keys.job_info(tenant, job_id)) is not None
            ):
                raise errors.job_already_exists(job_id)
            _stage(shard, info)
    await shard.committer.commit()
    return info.id


def new_job(*, tenant: str, job_id: str, priority: int, start_at_ms: int,
            retry_policy: RetryPolicy | None, payload: bytes, limits: list[Limit],
            metadata: dict[str, str], task_group: str) -> JobInfo:
    """The validated JobInfo of a job to enqueue (a new id when job_id is empty)."""
    validate_job(job_id, priority, task_group, metadata, limits, retry_policy, start_at_ms)
    return JobInfo(job_id or new_id(), tenant, priority, start_at_ms, payload, retry_policy,
                   metadata, limits, task_group)


def stage_new(shard: Shard, *, tenant: str, **fields) -> str:
    """`enqueue` of a job without an id up to its commit wait (nothing to read first, so
    it stages synchronously): validate, stage the writes, return the new id. Callers that
    batch many jobs wait for `shard.committer.commit()` themselves."""
    info = new_job(tenant=tenant, job_id="", **fields)
    _stage(shard, info)
    return info.id


def _stage(shard: Shard, info: JobInfo) -> None:
    """Write the job and its first task; `enqueue_time_ms <= 0` means now."""
    now = shard.now()
    if info.enqueue_time_ms <= 0:
        info.enqueue_time_ms = now
    start = info.enqueue_time_ms
    tenant, job_id, group = info.tenant, info.id, info.task_group
    shard.committer.put(keys.job_info(tenant, job_id), encode(info))
    shard.info_cache.put(info)
    indexes.put_new_job_rows(shard, info)  # 0x04, 0x10, 0x11
    job = shard.active[(tenant, job_id)] = ActiveJob(SCHEDULED)
    shard.put_status(tenant, job_id, JobStatus(SCHEDULED, now, start, 1))
    limit_chain.start_attempt(shard, job, tenant=tenant, job_id=job_id, attempt=1,
                              relative=1,
                              task_group=group, priority=info.priority, start_ms=start,
                              limits=info.limits, now=now)
    shard.settle(tenant, job_id, job)
    shard.count_status(tenant, None, SCHEDULED)
    shard.count_jobs(total=1)
