"""Periodic L0 flush: a shard's memtable goes to an L0 SST at least every
`storage.l0_flush_interval_s` while it is being written.

SlateDB writes the memtable out only when it reaches `l0_sst_size_bytes` or after 4096
WAL flushes, and until then every WAL object since the last L0 SST must be kept (and
replayed by a restart). A shard with a few commits per second would keep thousands of
WAL objects for an hour; with this flush it keeps about
(l0_flush_interval_s + gc_min_age_s + gc_interval_s) x WAL objects per second, and a
restart replays at most l0_flush_interval_s of WAL. Cost: one L0 SST and one manifest
per interval per written shard (none while idle).
"""

from __future__ import annotations

import time
import weakref

from slatedb.uniffi import FlushOptions, FlushType

from silo.shard.state import Shard
from silo.storage.db import StorageError

_MEMTABLE = FlushOptions(flush_type=FlushType.MEM_TABLE)
# shard -> (monotonic time of the last flush or first look, batches written by then)
_last: weakref.WeakKeyDictionary[Shard, tuple[float, int]] = weakref.WeakKeyDictionary()


async def maybe_flush_memtable(shard: Shard) -> bool:
    """Flush the memtable to L0 if the interval passed and something was written since."""
    interval = shard.config.l0_flush_interval_s
    if interval <= 0:
        return False
    now, written = time.monotonic(), shard.committer.batches_written
    seen = _last.get(shard)
    if seen is None:
        _last[shard] = (now, written)
        return False
    if now - seen[0] < interval:
        return False
    _last[shard] = (now, written)
    if written == seen[1]:
        return False  # idle: nothing new in the memtable
    try:
        await shard.db.flush_with_options(_MEMTABLE)
    except Exception as e:  # noqa: BLE001 - surface storage failures uniformly
        raise StorageError(f"memtable flush failed: {e}") from e
    return True
