"""Queue depth per task group is kept as shard counters, so an open never counts the queue.

A reopened shard's depth must equal its task rows exactly, without a single read of the
task range at open (a counting wrapper around the database sees every scan); an older
shard without the counters counts once, only when asked to, from the snapshot of its
open (adds and removes made before the count started are not counted twice), and then
writes the counters.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import silo.shard.state as state_mod
from silo.shard import cancel, delete, depth, lease, outcome
from silo.shard.state import Shard, ShardConfig
from silo.storage import keys
from silo.storage.database import scan_prefix
from tests.unit.test_shard import Clock, add, task_rows

TASK = keys.kind_prefix(keys.TASK)


class CountingDb:
    """The real database, with every scan's start key recorded."""

    def __init__(self, db) -> None:
        self._db = db
        self.scans: list[bytes] = []

    def __getattr__(self, name):
        return getattr(self._db, name)

    async def scan(self, kr):
        self.scans.append(bytes(kr.start or b""))
        return await self._db.scan(kr)

    def task_scans(self) -> int:
        return sum(1 for s in self.scans if s.startswith(TASK))


async def open_counted(url: str, sid: str, clock: Clock, monkeypatch, **kw) -> tuple[Shard, CountingDb]:
    made: list[CountingDb] = []
    real = state_mod.open_database

    async def wrapped(*a, **k):
        made.append(CountingDb(await real(*a, **k)))
        return made[-1]

    monkeypatch.setattr(state_mod, "open_database", wrapped)
    try:
        s = await Shard.open(sid, "", "", url, ShardConfig(commit_interval_ms=0,
                                                          flush_interval_ms=1), clock, **kw)
    finally:
        monkeypatch.setattr(state_mod, "open_database", real)
    return s, made[0]


async def truth(s: Shard) -> dict[str, int]:
    """Task rows per group, as storage holds them (refresh tasks excluded)."""
    out: Counter[str] = Counter()
    for k, _ in await task_rows(s):
        group, pos = keys.dec_str(k, 1)
        job_id, _ = keys.dec_str(k, pos + 9)
        if not job_id.startswith("floating_refresh:"):
            out[group] += 1
    return dict(out)


def live(s: Shard) -> dict[str, int]:
    return {g: n for g, n in s.depth.items() if n}


async def workload(s: Shard) -> None:
    """Adds, leases, outcomes, a cancel and a delete over three groups."""
    ids = [await add(s, f"j{i}", group=f"g{i % 3}") for i in range(30)]
    for g in ("g0", "g1"):
        for lt in await lease.lease_tasks(s, "w", 4, g):
            await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
    await cancel.cancel_job(s, "-", ids[2])
    await cancel.cancel_job(s, "-", ids[5])
    await delete.delete_job(s, "-", ids[5])


def test_reopen_reads_the_counters_and_never_scans_the_queue(tmp_path, monkeypatch):
    url, sid, clock = f"file://{tmp_path}/o", str(uuid.uuid4()), Clock()

    async def main():
        s, _ = await open_counted(url, sid, clock, monkeypatch)
        await workload(s)
        want = await truth(s)
        assert want == {"g0": 6, "g1": 6, "g2": 8} and live(s) == want
        await s.close()
        s, db = await open_counted(url, sid, clock, monkeypatch)
        try:
            assert db.task_scans() == 0, db.scans  # no task row was read at open
            assert s._depth_count is None and s.depth_scan is None
            assert live(s) == want
            # still kept after the reopen: a lease and an add move the counters
            got = await lease.lease_tasks(s, "w", 2, "g2")
            await add(s, "late", group="g3")
            assert live(s) == await truth(s) == {"g0": 6, "g1": 6, "g2": 6, "g3": 1}
            assert len(got) == 2
        finally:
            await s.close()
        s, db = await open_counted(url, sid, clock, monkeypatch)
        try:
            assert db.task_scans() == 0
            assert live(s) == await truth(s)
        finally:
            await s.close()

    asyncio.run(main())


def test_older_shard_counts_once_when_asked_then_keeps_counters(tmp_path, monkeypatch):
    url, sid, clock = f"file://{tmp_path}/o", str(uuid.uuid4()), Clock()

    async def main():
        s, _ = await open_counted(url, sid, clock, monkeypatch)
        await workload(s)
        # What a release before the counters wrote: no counter rows, no meta row.
        for k, _ in await scan_prefix(s.db, keys.kind_prefix(keys.SHARD_COUNTER)):
            if keys.dec_str(k, 1)[0].startswith(depth.COUNTER_PREFIX):
                s.committer.delete(k)
        s.committer.delete(keys.shard_meta(depth.META))
        await s.committer.commit()
        await s.close()

        s, db = await open_counted(url, sid, clock, monkeypatch, count_depth=False)
        try:
            # Open took the snapshot but read no task row; the count waits to be started.
            assert s.depth_scan is not None and s._depth_count is None
            assert db.task_scans() == 1 and not s.depth
            # Changes before the count starts are counted live, not twice by the scan.
            got = await lease.lease_tasks(s, "w", 3, "g0")
            await add(s, "new", group="g2")
            assert len(got) == 3
            await depth.start_count(s)
            assert live(s) == await truth(s) == {"g0": 3, "g1": 6, "g2": 9}
            rows = await scan_prefix(s.db, keys.kind_prefix(keys.SHARD_COUNTER))
            assert len([k for k, _ in rows
                        if keys.dec_str(k, 1)[0].startswith(depth.COUNTER_PREFIX)]) == 3
        finally:
            await s.close()
        s, db = await open_counted(url, sid, clock, monkeypatch, count_depth=False)
        try:
            assert db.task_scans() == 0 and s.depth_scan is None
            assert live(s) == await truth(s)
        finally:
            await s.close()

    asyncio.run(main())


def test_wipe_leaves_complete_zero_counters(tmp_path, monkeypatch):
    url, sid, clock = f"file://{tmp_path}/o", str(uuid.uuid4()), Clock()

    async def main():
        s, _ = await open_counted(url, sid, clock, monkeypatch)
        await workload(s)
        await s.wipe()
        await add(s, "after", group="g1")
        await s.close()
        s, db = await open_counted(url, sid, clock, monkeypatch)
        try:
            assert db.task_scans() == 0
            assert live(s) == await truth(s) == {"g1": 1}
        finally:
            await s.close()

    asyncio.run(main())
