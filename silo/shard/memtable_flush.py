"""Periodic L0 flush: a shard's memtable goes to an L0 SST at least every
`storage.l0_flush_interval_s` while it is being written, and soon after a burst of
writes ends.

SlateDB writes the memtable out only when it reaches `l0_sst_size_bytes` or after 4096
WAL flushes, and until then every WAL object since the last L0 SST must be kept (and
replayed by a restart). A shard with a few commits per second would keep thousands of
WAL objects for an hour; with this flush it keeps about
(l0_flush_interval_s + gc_min_age_s + gc_interval_s) x WAL objects per second, and a
restart replays at most l0_flush_interval_s of WAL. Cost: one L0 SST and one manifest
per interval per written shard (none while idle).

The idle flush: a memtable costs about 3x its counted bytes in RSS (slatedb_settings),
so after a fill (EnqueueMany, ImportJobs) a shard held up to `l0_sst_size_bytes` x 3 of
it, ~24 MB at the default, until the interval ran out, 30 s after the fill. When at
least `IDLE_FLUSH_BYTES` were written since the last flush and nothing during the last
look (one reaper pass, 1 s by default), the memtable goes to L0 at once: the memory is
freed while the shard is idle, and the WAL objects become garbage sooner. Sparse writes
(less than that per interval) still wait for the interval, so they make no small SSTs.
"""

from __future__ import annotations

import time
import weakref
from typing import NamedTuple

from slatedb.uniffi import FlushOptions, FlushType

from silo.shard.state import Shard
from silo.storage.db import StorageError

IDLE_FLUSH_BYTES = 1 << 20

_MEMTABLE = FlushOptions(flush_type=FlushType.MEM_TABLE)


class Seen(NamedTuple):
    """What a shard's committer had written at its last flush (or first look) and at the
    look before this one."""

    at: float  # monotonic time of the last flush, or of the last idle interval's end
    batches: int  # batches written by then
    nbytes: int  # their bytes
    looked: int  # batches written at the previous look


def due(now: float, seen: Seen, batches: int, nbytes: int, interval_s: float,
        idle_bytes: int = IDLE_FLUSH_BYTES) -> tuple[bool, Seen]:
    """Whether to flush now, and what to remember (a pure policy: the caller flushes).

    Nothing written since the last flush: no flush, and an interval that ran out idle
    starts over (a write after a long idle waits up to one interval). The interval
    over: flush. Otherwise flush when a burst of at least `idle_bytes` has ended
    (nothing written since the previous look)."""
    if batches == seen.batches:
        if now - seen.at >= interval_s:
            seen = seen._replace(at=now)
        return False, seen._replace(looked=batches)
    if now - seen.at >= interval_s or (
            batches == seen.looked and nbytes - seen.nbytes >= idle_bytes):
        return True, Seen(now, batches, nbytes, batches)
    return False, seen._replace(looked=batches)


# shard -> what due() remembers
_last: weakref.WeakKeyDictionary[Shard, Seen] = weakref.WeakKeyDictionary()


async def maybe_flush_memtable(shard: Shard) -> bool:
    """Flush the memtable to L0 when `due`; True when it did."""
    interval = shard.config.l0_flush_interval_s
    if interval <= 0:
        return False
    c = shard.committer
    now, batches, nbytes = time.monotonic(), c.batches_written, c.bytes_written
    seen = _last.get(shard)
    if seen is None:  # the first look only records
        _last[shard] = Seen(now, batches, nbytes, batches)
        return False
    flush, _last[shard] = due(now, seen, batches, nbytes, interval)
    if not flush:
        return False
    try:
        await shard.db.flush_with_options(_MEMTABLE)
    except Exception as e:  # noqa: BLE001 - surface storage failures uniformly
        raise StorageError(f"memtable flush failed: {e}") from e
    return True
