"""A shard's LSM tree as SlateDB's admin API sees it: storage info and full compaction.

Read from the shard's latest manifest (`Admin.read_manifest`): the L0 SSTs and the
sorted runs with SlateDB's own size estimates. A full compaction is submitted through
`Admin.submit_compaction` (one tiered merge of every L0 SST and every sorted run into
the oldest run); the database's embedded compactor (on by default in slatedb 0.17)
picks it up within its poll interval and runs it in the background.
"""

from __future__ import annotations

from typing import NamedTuple

from slatedb.uniffi import AdminBuilder, CompactionSpec, ObjectStore, SourceId

from silo.storage.database import split_store_url


class SortedRun(NamedTuple):
    id: int
    sst_count: int
    estimated_size: int


class StorageInfo(NamedTuple):
    l0_sst_count: int
    total_l0_size: int
    sorted_runs: list[SortedRun]
    total_sorted_run_size: int
    manifest_id: int


def _admin(store_url: str, shard_id: str):
    root, base = split_store_url(store_url)
    name = f"shards/{shard_id}"
    return AdminBuilder(f"{base}/{name}" if base else name, ObjectStore.resolve(root)).build()


async def _manifest(store_url: str, shard_id: str):
    return await _admin(store_url, shard_id).read_manifest(None)


async def storage_info(store_url: str, shard_id: str) -> StorageInfo:
    m = await _manifest(store_url, shard_id)
    if m is None:
        return StorageInfo(0, 0, [], 0, 0)
    runs = [SortedRun(r.id, len(r.sst_views), r.estimated_size_bytes) for r in m.compacted]
    return StorageInfo(len(m.l0), sum(v.estimated_size_bytes for v in m.l0), runs,
                       sum(r.estimated_size for r in runs), m.id)


async def submit_full_compaction(store_url: str, shard_id: str, db=None) -> str:
    """Submit a merge of everything into one sorted run; returns a one-line status."""
    admin = _admin(store_url, shard_id)
    m = await admin.read_manifest(None)
    if m is None or (not m.l0 and len(m.compacted) <= 1):
        return f"shard {shard_id}: nothing to compact (already one sorted run or empty)"
    sources = ([SourceId.SST_VIEW(v.id) for v in m.l0]
               + [SourceId.SORTED_RUN(r.id) for r in m.compacted])
    destination = min((r.id for r in m.compacted), default=0)
    c = await admin.submit_compaction(CompactionSpec.TIERED(b"", sources, destination))
    return (f"submitted full compaction {c.id} of shard {shard_id}: {len(m.l0)} L0 SSTs and "
            f"{len(m.compacted)} sorted runs into sorted run {destination} "
            f"(status {c.status.name.lower()})")
