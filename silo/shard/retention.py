"""Retention: finished jobs disappear `completed_job_expire_s` (Succeeded) or
`terminal_job_expire_s` (Failed, Cancelled) after they ended.

Every terminal status write stages an expiry row `0x0D (expire_at, tenant, job)` in the
same batch (Shard.schedule_expiry). The sweeper reads only the rows already due (a range
scan ending at `expiry_due_end(now)`), so its cost is the number of jobs to delete, never
the number of live jobs. A row is a reminder, not a verdict: the job is deleted only if
it is still terminal and its own expiry (status change time + the TTL of its status, as
configured now) has passed; a job restarted or re-imported meanwhile keeps living, and one
whose TTL was raised gets its row moved to the new time. Deletion is DeleteJob's path
(attempts, info, status, cancel flag, counters) in one batch with the row's removal.

Jobs that finished while retention was off (or before this release: layout 1 data) have
no rows. The first sweep with retention on walks the job statuses once, in batches, and
stages the missing rows; shard meta `expiry_indexed` records that it was done, and is
cleared when a shard opens with retention off, so turning it on again re-indexes.
"""

from __future__ import annotations

import logging
import weakref

from slatedb.uniffi import KeyRange

from silo.shard.delete import stage_delete
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.db import StorageError
from silo.storage.records import TERMINAL, encode_i64, job_status_decoder
from silo.storage.scan import ResumingScan

log = logging.getLogger(__name__)

SWEEP_BATCH = 1000  # rows per sweep and shard; the next sweep takes the rest
INDEXED_META = "expiry_indexed"
_checked: weakref.WeakSet[Shard] = weakref.WeakSet()  # shards whose meta flag is settled


def enabled(shard: Shard) -> bool:
    c = shard.config
    return c.completed_job_expire_ms > 0 or c.terminal_job_expire_ms > 0


async def due_rows(shard: Shard, now: int, limit: int = SWEEP_BATCH) -> list[bytes]:
    """Expiry keys due at or before now, oldest first (rows deleted but not yet applied are
    skipped; rows staged but not yet applied wait for the next sweep)."""
    start = keys.kind_prefix(keys.EXPIRY_INDEX)
    try:
        it = await shard.db.scan(KeyRange(start=start, start_inclusive=True,
                                          end=keys.expiry_due_end(now), end_inclusive=False))
        rows = await it.next_batch(limit)
    except Exception as e:  # noqa: BLE001 - surface storage failures uniformly
        raise StorageError(f"scan failed: {e}") from e
    out = []
    for r in rows:
        found, value = shard.committer.staged_value(r.key)
        if not (found and value is None):
            out.append(r.key)
    return out


async def expire_due(shard: Shard) -> int:
    """Delete the jobs whose retention has run out; return how many were deleted."""
    if shard not in _checked:
        await _settle_index(shard)
        _checked.add(shard)
    if not enabled(shard):
        return 0
    now = shard.now()
    rows = await due_rows(shard, now)
    deleted = 0
    for key in rows:
        _, tenant, job_id = keys.decode_expiry_index(key)
        async with shard.job_lock(tenant, job_id):
            shard.committer.delete(key)
            if (tenant, job_id) in shard.active:
                continue  # running again (restart, re-import)
            raw = await shard.committer.get(keys.job_status(tenant, job_id))
            if raw is None:
                continue  # deleted already
            status = job_status_decoder.decode(raw)
            ttl = shard.config.expire_ms(status.kind)
            if status.kind not in TERMINAL or ttl <= 0:
                continue
            due = status.changed_at_ms + ttl
            if due > now:  # ended again later, or its TTL grew: wait for the new time
                shard.committer.put(keys.expiry_index(due, tenant, job_id), b"")
                continue
            await stage_delete(shard, tenant, job_id)
            deleted += 1
    if rows:
        await shard.committer.commit()
    if deleted:
        log.debug("shard %s: %d finished jobs expired", shard.id, deleted)
    return deleted


async def _settle_index(shard: Shard) -> None:
    """Index every finished job once when retention is on; forget that when it is off."""
    meta = keys.shard_meta(INDEXED_META)
    done = await shard.committer.get(meta) is not None
    if not enabled(shard):
        if done:
            shard.committer.delete(meta)
            await shard.committer.commit()
        return
    if done:
        return
    n = 0
    try:
        prefix = keys.kind_prefix(keys.JOB_STATUS)
        it = ResumingScan(shard.db, prefix, keys.prefix_end(prefix))
        while rows := await it.next_batch(SWEEP_BATCH):
            for r in rows:
                tenant, pos = keys.dec_str(r.key, 1)
                job_id, _ = keys.dec_str(r.key, pos)
                status = job_status_decoder.decode(r.value)
                if status.kind in TERMINAL and (tenant, job_id) not in shard.active:
                    shard.schedule_expiry(tenant, job_id, status)
                    n += 1
            await shard.committer.commit()
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"scan failed: {e}") from e
    shard.committer.put(meta, encode_i64(1))
    await shard.committer.commit()
    log.info("shard %s: %d finished jobs given an expiry time", shard.id, n)
