"""The shard's job counters on disk: jobs in total and finished, and per tenant how many
jobs are in each status.

They are kept in memory (Shard.total_jobs, completed_jobs, tenant_status) and written as
absolute values with every batch that changed them, by the committer's seal hook
(`seal`), so the rows on disk always describe exactly the writes before them: an open
reads a few rows instead of counting the jobs, and a crash cannot skew them.

Layout 4 (silo.storage.keys) writes one row per tenant, 0xF9 (tenant) → the five status
counts, and one per shard, 0xF0 `jobs` → [total, completed]. Layouts up to 3 wrote one
row per (tenant, status), 0xF8, and the shard counters `total_jobs` and
`completed_jobs`: a job's life moves three statuses of its tenant, so a batch wrote up to
three rows per tenant it touched, and two for the totals. Measured (bench/stream_cost.py
--keys, 16 tenants, 2 shards): with 13.7 operations per commit these counters were 2.7
of a job's 19.7 keys; a batch now writes one row per tenant it touched plus one.

Older rows are read at open and replaced by the first batch the shard writes: the new
rows are put and the old ones deleted in that one batch, so either the old rows or the
new ones are on disk, never a mix of both for one tenant (if both were found, the new
rows win).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from silo.shard import depth as depth_counters
from silo.storage import keys
from silo.storage.database import scan_prefix
from silo.storage.records import SCHEDULED, STATUS_NAMES, decode_i64, encode

if TYPE_CHECKING:
    from silo.shard.state import Shard

# The order of a tenant row's counts: the status numbers (silo.v1.JobStatus), 0..4.
NAMES = tuple(STATUS_NAMES[k] for k in sorted(STATUS_NAMES))
JOBS = "jobs"  # the shard counter row holding [total, completed]
_LEGACY_TOTALS = ("total_jobs", "completed_jobs")
_counts = msgspec.msgpack.Decoder(list[int])


async def load(shard: Shard) -> dict[str, int]:
    """At open: the counters from their rows (either layout). Returns the task-group
    depth counters found among the shard counters (silo.shard.depth)."""
    db = shard.db
    persisted: dict[str, int] = {}
    legacy: list[bytes] = []
    totals: dict[str, int] = {}
    jobs = None
    for k, v in await scan_prefix(db, keys.kind_prefix(keys.SHARD_COUNTER)):
        name, _ = keys.dec_str(k, 1)
        if depth_counters.read_counter(persisted, name, v):
            continue
        if name == JOBS:
            jobs = _counts.decode(v)
        elif name in _LEGACY_TOTALS:
            totals[name] = decode_i64(v)
            legacy.append(k)
    if jobs is not None:
        shard.total_jobs, shard.completed_jobs = jobs[0], jobs[1]
    else:
        shard.total_jobs = totals.get("total_jobs", 0)
        shard.completed_jobs = totals.get("completed_jobs", 0)
    if legacy:
        shard._dirty_shard_counters = True  # rewritten as `jobs` by the next batch
    status = shard.tenant_status
    current: set[str] = set()
    for k, v in await scan_prefix(db, keys.kind_prefix(keys.TENANT_COUNTS)):
        tenant, _ = keys.dec_str(k, 1)
        current.add(tenant)
        for name, n in zip(NAMES, _counts.decode(v), strict=False):
            if n:
                status[(tenant, name)] = n
    for k, v in await scan_prefix(db, keys.kind_prefix(keys.TENANT_STATUS_COUNTER)):
        tenant, name = keys.decode_tenant_status_counter(k)
        legacy.append(k)
        if tenant not in current:
            status[(tenant, name)] = decode_i64(v)
            shard._dirty_tenants.add(tenant)
    shard._legacy_counters = legacy
    shard.scheduled_jobs = sum(n for (_, st), n in status.items()
                               if st == STATUS_NAMES[SCHEDULED])
    return persisted


def seal(shard: Shard, writes: dict[bytes, bytes | None]) -> None:
    """Add the changed counters to a batch being sealed (the committer's on_seal)."""
    shard.depth.seal(writes)
    if shard._dirty_shard_counters:
        writes[keys.shard_counter(JOBS)] = encode([shard.total_jobs, shard.completed_jobs])
        shard._dirty_shard_counters = False
    dirty = shard._dirty_tenants
    if dirty:
        get = shard.tenant_status.get
        for tenant in dirty:
            counts = [get((tenant, name), 0) for name in NAMES]
            writes[keys.tenant_counts(tenant)] = encode(counts) if any(counts) else None
        dirty.clear()
    if shard._legacy_counters:
        for k in shard._legacy_counters:
            writes[k] = None
        shard._legacy_counters = []
