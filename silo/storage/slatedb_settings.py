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

A pure function of the values, so the mapping is tested without opening a database.
"""

from __future__ import annotations

from typing import NamedTuple


class StorageTuning(NamedTuple):
    compactor_poll_interval_ms: int = 5000  # 0: no compactor
    gc_interval_s: int = 30  # 0: no garbage collector
    gc_min_age_s: int = 30  # WAL objects, manifests, compactions files
    gc_sst_min_age_s: int = 60  # SSTs no longer in the manifest (SlateDB: 300)
    compactor_min_sources: int = 2  # SlateDB: 4


def _ms(n: int) -> str:
    return f"{n}ms"


def _s(n: int) -> str:
    return f"{n}s"


def slatedb_settings(t: StorageTuning) -> dict[str, object]:
    """SlateDB setting (dotted key) -> value, applied over SlateDB's defaults."""
    out: dict[str, object] = {}
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
