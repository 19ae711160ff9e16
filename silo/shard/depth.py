"""Queue depth per task group (the silo_ready_tasks gauge), kept as shard counters.

The pending task rows of each task group are counted in memory as tasks are added and
removed (`Shard._count_task`, and the lease step's decrement) and written as absolute
values with each batch, as shard counters `tasks:<group>` (0xF0), in the batch whose
writes they describe (the committer's seal hook). An open reads those few rows instead
of counting the backlog, so a shard with a million queued jobs opens as fast as an
empty one and nothing proportional to its depth runs on the way to its first lease.

A shard written before these counters existed has no `task_counters` meta row: it is
counted once, from a scan whose iterator (its snapshot) is opened at open, plus the
adds and removes made since; the scan runs only when `start_count` is called (the
worker calls it once it serves, so the count never delays a lease). When the scan is
done the counters and the meta row go out in one batch and are kept from then on. Until
then the in-memory figure is partial (it may even be negative) and nothing is written.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from silo.storage import keys
from silo.storage.records import decode_i64, encode_i64
from silo.storage.scan import ResumingScan

if TYPE_CHECKING:
    from silo.shard.state import Shard

log = logging.getLogger(__name__)

COUNTER_PREFIX = "tasks:"  # shard counter name of a task group's pending task rows
META = "task_counters"  # shard meta: the counters are complete (i64 1)
COUNT_BATCH = 4096


class Depth(dict[str, int]):
    """task group → pending task rows; remembers which groups changed since the last
    seal, and writes them there once the counters are known to be complete."""

    def __init__(self) -> None:
        super().__init__()
        self.dirty: set[str] = set()
        self.persist = False  # the counters are complete: write them with each batch

    def __setitem__(self, group: str, n: int) -> None:
        dict.__setitem__(self, group, n)
        self.dirty.add(group)

    def clear(self) -> None:
        self.dirty.update(self)
        dict.clear(self)

    def seal(self, writes: dict[bytes, bytes | None]) -> None:
        """Add the changed groups' counters to a batch being sealed."""
        if not self.persist or not self.dirty:
            return
        for group in self.dirty:
            n = self.get(group, 0)
            writes[keys.shard_counter(COUNTER_PREFIX + group)] = encode_i64(n) if n else None
        self.dirty.clear()


def read_counter(into: dict[str, int], name: str, value: bytes) -> bool:
    """Take one shard counter row read at open; False if it is not a depth counter."""
    if not name.startswith(COUNTER_PREFIX):
        return False
    into[name[len(COUNTER_PREFIX):]] = decode_i64(value)
    return True


def mark_complete(shard: Shard) -> None:
    """Stage the meta row and every group's counter: from now on they are kept."""
    depth = shard.depth
    depth.persist = True
    depth.dirty.update(depth)
    shard.committer.put(keys.shard_meta(META), encode_i64(1))


async def load(shard: Shard, persisted: dict[str, int], *, new: bool) -> None:
    """At open: use the persisted counters, or (an older shard) open the snapshot the
    deferred count will read. `persisted` is what the shard counter scan found."""
    depth = shard.depth
    if new:
        mark_complete(shard)  # committed with the new shard's first rows
        return
    if await shard.db.get(keys.shard_meta(META)) is not None:
        for group, n in persisted.items():
            dict.__setitem__(depth, group, n)
        depth.persist = True
        return
    prefix = keys.kind_prefix(keys.TASK)
    scan = ResumingScan(shard.db, prefix, keys.prefix_end(prefix))
    await scan.begin()  # the snapshot: every add/remove after this point is counted live
    shard.depth_scan = scan


def start_count(shard: Shard) -> asyncio.Future[None] | None:
    """Start the deferred count of an older shard (nothing to do otherwise)."""
    scan, shard.depth_scan = shard.depth_scan, None
    if scan is None:
        return None
    shard._depth_count = asyncio.ensure_future(_count(shard, scan))
    return shard._depth_count


async def _count(shard: Shard, scan: ResumingScan) -> None:
    try:
        n = 0
        while rows := await scan.next_batch(COUNT_BATCH):
            for r in rows:
                shard._count_task(r.key, 1)
            n += len(rows)
            await asyncio.sleep(0)
        mark_complete(shard)
        await shard.committer.commit()
        log.info("shard %s: %d pending tasks counted; task-group counters written",
                 shard.id, n)
    except Exception as exc:  # noqa: BLE001 - a metric only: counted again at next open
        log.warning("shard %s: counting the queue depth stopped: %r", shard.id, exc)
