"""The SlateDB settings that make a shard's storage settle: compactor and garbage collector.

Without them a shard's object store only grows: every WAL flush is an object (one per
group commit with flush_on_commit), the memtable reaches L0 only when it fills, and
garbage — WAL objects already in an SST, SSTs compacted away, old manifests — stays for
10 minutes or more (SlateDB's default GC interval, and 5 minutes' minimum age).

WAL objects become garbage once the memtable holding their writes is in an L0 SST: when
it reaches `l0_sst_size_bytes`, or after 4096 WAL flushes (SlateDB's own cap, which it
refuses to lower), whichever comes first.

What is set here (each from one `storage.*` option, see CONFIGURATION.md):
* `compactor_options.poll_interval` (0 = no compactor): L0 SSTs are merged into sorted
  runs, which drops deleted and expired jobs' rows and tombstones;
* `compactor_options.scheduler_options.min_compaction_sources` (2, SlateDB 4): how many
  L0 SSTs or similar-sized runs one compaction takes. A tombstone is dropped only by a
  merge into the bottom run, so this sets how long deleted jobs' bytes stay: with 2 a
  shard keeps 1-2 sorted runs and they go within ~2 L0 flushes (bench/README.md "Soak");
* `garbage_collector_options.*` (interval 0 = no GC): WAL objects, manifests and
  compactor state files older than `gc_min_age_s`, and SSTs compacted away older than
  `gc_sst_min_age_s`, are deleted. SSTs keep a longer minimum age because a long read may
  still be walking one that a compaction just replaced; the compactor's checkpoints (which
  pin the SSTs and manifests a compaction reads) get the same lifetime.

Memory, so a shard's RSS does not grow with its backlog (issue 12; bench/deep_shard.py):
* `max_unflushed_bytes` (`storage.max_unflushed_bytes`; SlateDB: 1 GiB): memtables
  written to the WAL but not yet to an L0 SST. While L0 uploads lag behind a fast fill,
  frozen memtables pile up to this bound before writers are held back. A memtable costs
  about 3x its counted size in RSS (SlateDB counts key + value bytes; each row is also
  a skiplist node and two allocations: +84 MB of heap for +28.7 MB counted, measured in
  one process, bench/README.md "Deep queue"), so the bound and `l0_sst_size_bytes` are
  most of what a shard's RSS rises by under writes;
* the compactor (when on): output SSTs of at most `COMPACTION_MAX_SST_BYTES` (SlateDB
  256 MiB: an SST being written keeps one 8-byte filter hash per key and its whole
  index until it is closed, so at SlateDB's size a merge into a large bottom run held
  tens of MB more, growing with the data up to that size), one subcompaction per
  compaction and at most `MAX_CONCURRENT_COMPACTIONS` at a time (SlateDB 4 x 4, each
  with its own read-ahead and output writer). A worker is pinned to one core
  (silo.runtime.supervisor), so parallel subcompactions only cost memory there;
* the SST block and metadata cache (`storage.block_cache_bytes`): one cache per worker
  process, shared by its shards (`configure_builder`), instead of SlateDB's default one
  per database. Blocks that leasing reads come back from the object store (or the OS
  page cache, for a local store) past it.

A pure function of the values, so the mapping is tested without opening a database.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

MiB = 1 << 20
DEFAULT_BLOCK_CACHE_BYTES = 16 * MiB
DEFAULT_MAX_UNFLUSHED_BYTES = 32 * MiB
COMPACTION_MAX_SST_BYTES = 32 * MiB  # SlateDB: 256 MiB
MAX_CONCURRENT_COMPACTIONS = 2  # SlateDB: 4; 2 lets L0 merges run beside a long one
MAX_SUBCOMPACTIONS = 1  # SlateDB: 4


class StorageTuning(NamedTuple):
    compactor_poll_interval_ms: int = 5000  # 0: no compactor
    gc_interval_s: int = 30  # 0: no garbage collector
    gc_min_age_s: int = 30  # WAL objects, manifests, compactions files
    gc_sst_min_age_s: int = 60  # SSTs no longer in the manifest (SlateDB: 300)
    compactor_min_sources: int = 2  # SlateDB: 4
    max_unflushed_bytes: int = DEFAULT_MAX_UNFLUSHED_BYTES  # SlateDB: 1 GiB


def _ms(n: int) -> str:
    return f"{n}ms"


def _s(n: int) -> str:
    return f"{n}s"


def slatedb_settings(t: StorageTuning) -> dict[str, object]:
    """SlateDB setting (dotted key) -> value, applied over SlateDB's defaults."""
    out: dict[str, object] = {"max_unflushed_bytes": t.max_unflushed_bytes}
    if t.compactor_poll_interval_ms > 0:
        out["compactor_options.poll_interval"] = _ms(t.compactor_poll_interval_ms)
        out["compactor_options.worker.compactions_poll_interval"] = _ms(
            t.compactor_poll_interval_ms)
        # The compactor takes checkpoints of this lifetime (SlateDB: 900 s); the GC cannot
        # delete what a live checkpoint references, so the two ages move together.
        out["compactor_options.checkpoint_lifetime"] = _s(t.gc_sst_min_age_s)
        # Size-tiered scheduling: a compaction takes this many L0 SSTs, or sorted runs of
        # similar size (SlateDB: 4). Tombstones drop only in a merge into the bottom run;
        # with 4, a small bottom run is merged with 3 newer runs of 4 L0 SSTs each, so
        # deleted jobs' tombstones stay ~16 L0 flushes; with 2, about 2.
        out["compactor_options.scheduler_options.min_compaction_sources"] = str(
            t.compactor_min_sources)
        # Memory of a compaction (see the module docstring).
        out["compactor_options.max_concurrent_compactions"] = MAX_CONCURRENT_COMPACTIONS
        out["compactor_options.worker.max_concurrent_compactions"] = MAX_CONCURRENT_COMPACTIONS
        out["compactor_options.worker.max_subcompactions"] = MAX_SUBCOMPACTIONS
        out["compactor_options.worker.max_sst_size"] = COMPACTION_MAX_SST_BYTES
    else:
        out["compactor_options"] = None
    if t.gc_interval_s > 0:
        for part, age in (("manifest", t.gc_min_age_s), ("wal", t.gc_min_age_s),
                          ("compactions", t.gc_min_age_s), ("compacted", t.gc_sst_min_age_s)):
            out[f"garbage_collector_options.{part}_options.interval"] = _s(t.gc_interval_s)
            out[f"garbage_collector_options.{part}_options.min_age"] = _s(age)
        # SlateDB 0.17's boundary files hold back manifest deletion (measured: every
        # manifest from the first L0 flush on was kept, one more per flush/compaction).
        # They coordinate with other readers of the database; a shard has none.
        out["garbage_collector_options.boundary_files_enabled"] = False
    else:
        out["garbage_collector_options"] = None
    return out


# ---- the process-wide block cache ----------------------------------------------------

_cache: dict[str, Any] = {"bytes": DEFAULT_BLOCK_CACHE_BYTES, "cache": None}


def set_block_cache_bytes(n: int) -> None:
    """The capacity of this process's block cache (0: no cache), before any shard opens."""
    _cache["bytes"] = n
    _cache["cache"] = None


def cache_id(name: str) -> int:
    """A database's stable key in the shared cache: from its name (a shard's uuid)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, name).int & ((1 << 63) - 1)


def configure_builder(builder, name: str) -> None:
    """Give a DbBuilder this process's shared block cache. The cache is made at the first
    open, i.e. in the worker after fork (a native object, like every SlateDB handle)."""
    n = _cache["bytes"]
    if n <= 0:
        builder.with_db_cache_disabled()
        return
    if _cache["cache"] is None:
        from slatedb.uniffi import DbCache, MokaCacheOptions  # noqa: PLC0415

        _cache["cache"] = DbCache.new_moka_cache(
            MokaCacheOptions(max_capacity=n, time_to_live=None, time_to_idle=None))
    builder.with_db_cache(_cache["cache"], cache_id(name))
