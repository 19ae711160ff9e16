"""Reading the infos of the next tasks to be leased before a lease asks for them.

A lease hands each task out with its job's info (payload, metadata). A job leased soon
after it was enqueued finds its info in the info cache (silo.shard.info_cache); a job
that waited in a deep queue does not (the cache is bounded, the backlog is not), and its
lease then waits for a SlateDB `get`. At a million queued jobs that get costs ~150 µs
of the loop thread and ~250 µs in all (measured, against ~40 µs on a small database):
LeaseTasks' p50 grew ×1.9 with depth, all of it that read.

The tasks a refill brought in from storage are the ones whose infos may be missing, and
they are leased in key order. The ready buffer keeps their keys in that order
(`ReadyBuffer.scanned`); after each lease, `advance` makes sure the infos of the next
AHEAD of them are in the cache or being read, topped up in batches of about AHEAD / 2
by one background task each, started after the lease's own commit, so the reads run
while the reply goes out and the loop waits for the next call. A lease then finds its
infos in memory. The CPU is the same; it is off the lease's path.

A prefetched info enters the cache only if nothing about the job changed meanwhile
(`InfoCache.begin_fetch` / `put_fetched`): an enqueue, import or delete of the job in
between wins. Tasks added at runtime (recent enqueues, retries) are not tracked here:
their infos were cached when they were written. Correctness never depends on this: a
lease that misses the cache reads storage as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec

from silo.storage import keys
from silo.storage.records import job_info_decoder

if TYPE_CHECKING:
    from silo.shard.buffer import ReadyBuffer
    from silo.shard.state import Shard

log = logging.getLogger(__name__)

AHEAD = 32  # scanned tasks whose infos are kept read ahead of the leases


def advance(shard: Shard, buf: ReadyBuffer) -> None:
    """After a lease took tasks from buf: read ahead the infos of the next scanned ones."""
    q = buf.scanned
    if not q:
        return
    tasks = buf.tasks
    while q and q[0] not in tasks:  # leased, or gone from the buffer
        q.popleft()
        if buf.fetched_ahead:
            buf.fetched_ahead -= 1
    # Top up in batches of about AHEAD / 2: one background step per batch, whose reads
    # go to SlateDB together, rather than one small task after every lease.
    if buf.fetched_ahead > AHEAD // 2 or buf.fetched_ahead >= len(q):
        return
    cache = shard.info_cache
    batch: list[tuple[str, str]] = []
    for i in range(buf.fetched_ahead, min(AHEAD, len(q))):
        task = tasks.get(q[i])
        if task is None:
            continue  # gone: dropped from the front on a later call
        ref = (task.tenant, task.job_id)
        if cache.get(*ref) is None and cache.begin_fetch(ref):
            batch.append(ref)
    buf.fetched_ahead = min(AHEAD, len(q))
    if batch:
        fut = asyncio.ensure_future(_fetch(shard, batch))
        shard.prefetches.add(fut)
        fut.add_done_callback(shard.prefetches.discard)


async def _fetch(shard: Shard, refs: list[tuple[str, str]]) -> None:
    cache = shard.info_cache
    try:
        raws = await asyncio.gather(*(shard.committer.get(keys.job_info(t, j)) for t, j in refs),
                                    return_exceptions=True)
    except asyncio.CancelledError:
        for ref in refs:
            cache.end_fetch(ref)
        raise
    for ref, raw in zip(refs, raws, strict=True):
        info = None
        if isinstance(raw, bytes):
            try:
                info = job_info_decoder.decode(raw)
            except (TypeError, msgspec.DecodeError):
                info = None  # the lease reads it again and reports it
        elif isinstance(raw, BaseException):
            log.debug("shard %s: prefetching %s failed: %r", shard.id, ref, raw)
        if info is not None and (info.tenant, info.id) == ref:
            cache.put_fetched(info)
        else:
            cache.end_fetch(ref)

