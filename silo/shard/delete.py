"""DeleteJob: remove a terminal job and all its rows; a missing job is already deleted."""

from __future__ import annotations

from silo import errors
from silo.shard import indexes
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import (
    STATUS_NAMES,
    TERMINAL,
    job_info_decoder,
    job_status_decoder,
)


async def delete_job(shard: Shard, tenant: str, job_id: str) -> None:
    async with shard.job_lock(tenant, job_id):
        await stage_delete(shard, tenant, job_id)
    await shard.committer.commit()


async def stage_delete(shard: Shard, tenant: str, job_id: str) -> None:
    """Stage the deletion of every row of a finished job (the caller holds its job lock
    and commits). Shared by DeleteJob and retention (silo.shard.retention)."""
    job = shard.active.get((tenant, job_id))
    if job is not None:
        raise errors.precondition(
            f"cannot delete job {job_id}: job is currently running or has pending requests"
            f" (status: {STATUS_NAMES[job.kind]})")
    raw = await shard.committer.get(keys.job_status(tenant, job_id))
    raw_info = await shard.committer.get(keys.job_info(tenant, job_id))
    if raw is None and raw_info is None:
        return  # idempotent: nothing to delete
    status = job_status_decoder.decode(raw) if raw is not None else None
    status_kind = status.kind if status is not None else None
    if status_kind is not None and status_kind not in TERMINAL:  # queued, only in storage
        raise errors.precondition(
            f"cannot delete job {job_id}: job is currently running or has pending requests"
            f" (status: {STATUS_NAMES[status_kind]})")
    info = job_info_decoder.decode(raw_info) if raw_info is not None else None
    metadata = info.metadata if info is not None else {}
    attempts = await shard.committer.scan_prefix(keys.attempts_prefix(tenant, job_id))
    for k, _ in attempts:
        shard.committer.delete(k)
    shard.committer.delete(keys.job_info(tenant, job_id))
    shard.drop_status(tenant, job_id, status, metadata)
    if info is not None:
        indexes.drop_time_rows(shard, info)
    shard.committer.delete(keys.cancellation(tenant, job_id))
    shard.count_status(tenant, status_kind, None)
    shard.count_jobs(total=-1, completed=-1 if status_kind is not None else 0)
