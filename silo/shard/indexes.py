"""The query indexes: the enqueue-time rows, backfill of an older layout, active rows.

Layout 1 data dirs (the first release) have no status index (0x03) or metadata index
(0x04); layout 2 ones lack the enqueue-time indexes (0x10/0x11, the job list's
order). The first open with this release derives what is missing from the job status
(0x02) and job info (0x01) rows, in batches so a large shard does not build one huge
write, then records `layout_version = 3` in the batch of the last rows: a crash mid-way
redoes the backfill from the start, which only rewrites the same empty rows.

The enqueue-time rows derive from the job info alone (tenant, id, enqueue time, task
group, metadata), which never changes after enqueue: they are put in the batch that
writes the info (enqueue, import) and deleted in the batch that deletes it (DeleteJob,
retention), and no other transition touches them.

Jobs in memory remember their current 0x03 row (ActiveJob.index_key) so that a
transition deletes it without a read; at open it is loaded from the index itself. A
Running job's row also holds its lease (layout 4): the open restores the leases from
those rows (load_running).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from silo.storage import keys
from silo.storage.records import (
    RUNNING,
    STATUS_NAMES,
    JobInfo,
    decode_i64,
    encode_i64,
    job_info_decoder,
    job_status_decoder,
    lease_decoder,
)
from silo.storage.scan import ResumingScan

if TYPE_CHECKING:
    from silo.shard.state import Shard

log = logging.getLogger(__name__)


BACKFILL_BATCH = 5000  # rows staged per durable batch while backfilling


def put_new_job_rows(shard: Shard, info: JobInfo) -> None:
    """Stage a new job's metadata index rows (0x04) and enqueue-time rows (0x10/0x11),
    in the batch that writes its info (enqueue and import), each string encoded once."""
    shard.committer.put_empty(keys.new_job_index_rows(
        info.tenant, info.id, info.enqueue_time_ms, info.task_group, info.metadata))


def drop_time_rows(shard: Shard, info: JobInfo) -> None:
    """Stage the deletion of a job's enqueue-time rows, in the batch deleting its info."""
    for k in keys.time_index_rows(info.tenant, info.id, info.enqueue_time_ms,
                                  info.task_group, info.metadata):
        shard.committer.delete(k)


async def _scan_batches(db, prefix: bytes, batch: int = 1024):
    it = ResumingScan(db, prefix, keys.prefix_end(prefix))  # long at open: see scan.py
    while True:
        rows = await it.next_batch(batch)
        if not rows:
            return
        yield rows


async def _nothing():
    return
    yield


async def layout_version(shard: Shard) -> int:
    raw = await shard.committer.get(keys.shard_meta("layout_version"))
    return 1 if raw is None else decode_i64(raw)


async def backfill_if_needed(shard: Shard) -> int:
    """Write the index rows an older layout lacks; return how many were written."""
    found = await layout_version(shard)
    if found >= keys.LAYOUT_VERSION:
        return 0
    if found >= 3:
        # Layout 4 changed where leases and counters live, not the indexes: both forms
        # are read (Shard._rebuild, silo.shard.counters), nothing to backfill.
        shard.committer.put(keys.shard_meta("layout_version"), encode_i64(keys.LAYOUT_VERSION))
        await shard.committer.commit()
        return 0
    from silo.shard.state import status_index_key  # noqa: PLC0415 - state imports us lazily

    t0 = time.perf_counter()
    log.info("shard %s: layout %d found, backfilling the query indexes", shard.id, found)
    c = shard.committer
    written = staged = 0

    async def flush_if_full() -> None:
        nonlocal staged
        if staged >= BACKFILL_BATCH:
            await c.commit()
            staged = 0
            log.info("shard %s: backfill progress: %d index rows", shard.id, written)

    statuses = (_scan_batches(shard.db, keys.kind_prefix(keys.JOB_STATUS)) if found < 2
                else _nothing())
    async for rows in statuses:
        for r in rows:
            tenant, pos = keys.dec_str(r.key, 1)
            job_id, _ = keys.dec_str(r.key, pos)
            c.put(status_index_key(tenant, job_id, job_status_decoder.decode(r.value)), b"")
            written += 1
            staged += 1
        await flush_if_full()
    async for rows in _scan_batches(shard.db, keys.kind_prefix(keys.JOB_INFO)):
        for r in rows:
            info = job_info_decoder.decode(r.value)
            if found < 2:
                for k, v in info.metadata.items():
                    c.put(keys.metadata_index(info.tenant, k, v, info.id), b"")
                    written += 1
                    staged += 1
            for k in keys.time_index_rows(info.tenant, info.id, info.enqueue_time_ms,
                                          info.task_group, info.metadata):
                c.put(k, b"")
                written += 1
                staged += 1
        await flush_if_full()
    c.put(keys.shard_meta("layout_version"), encode_i64(keys.LAYOUT_VERSION))
    await c.commit()
    log.info("shard %s: backfill done: %d index rows in %.0f ms", shard.id, written,
             (time.perf_counter() - t0) * 1000)
    return written


async def load_running(shard: Shard) -> None:
    """At open: the Running jobs, from their status-index rows (0x03; the Running rows
    only, so the cost is bounded by what runs). A row's value is its lease (layout 4,
    Shard.put_lease): the job is Running again with it. An empty value is a lease of
    an older layout, already restored from its 0x06 row. Each running job remembers
    its row (a parked job's row is derived from its request, a queued job's from its
    task when it is leased)."""
    tenants = {t for (t, s), n in shard.tenant_status.items()
               if n > 0 and s == STATUS_NAMES[RUNNING]}
    active = shard.active
    for tenant in sorted(tenants):
        prefix = keys.status_index_prefix(tenant, STATUS_NAMES[RUNNING])
        async for rows in _scan_batches(shard.db, prefix):
            for r in rows:
                job = active.get((tenant, keys.decode_status_index(r.key)[3]))
                if job is None and r.value:
                    job = await shard.restore_lease(lease_decoder.decode(r.value))
                if job is not None and job.kind == RUNNING:
                    job.index_key = r.key
