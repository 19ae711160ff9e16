"""The reading statement's share of the loop (silo.query.pace), on a fake CPU clock."""

from __future__ import annotations

import asyncio

from silo.query import pace
from silo.storage.db import GroupCommitter


def _fake(monkeypatch) -> tuple[list[float], list[float], list[float]]:
    cpu = [100.0]
    wall = [1000.0]
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(s):
        slept.append(s)
        wall[0] += s
        await real_sleep(0)

    monkeypatch.setattr(pace.time, "thread_time", lambda: cpu[0])
    monkeypatch.setattr(pace.time, "monotonic", lambda: wall[0])
    monkeypatch.setattr(pace.asyncio, "sleep", sleep)
    monkeypatch.setattr(GroupCommitter, "started", 0)
    return cpu, wall, slept


def _commit_started() -> None:
    GroupCommitter.started += 1


def test_while_commits_start_rests_as_long_as_it_worked_after_the_free_allowance(monkeypatch):
    cpu, _, slept = _fake(monkeypatch)

    async def main():
        with pace.paced():
            cpu[0] += pace.FREE_S * 0.9  # an indexed lookup: never rests
            _commit_started()
            await pace.tick()
            assert slept == []
            cpu[0] += pace.FREE_S * 0.1 + 0.003  # now 3 ms past the allowance
            await pace.tick()
            assert len(slept) == 1
            assert abs(slept[0] - 0.003 * (1 / pace.LOOP_SHARE - 1)) < 1e-9
            cpu[0] += pace.BUDGET_S / 2  # under the budget since the rest
            await pace.tick()
            assert len(slept) == 1
            cpu[0] += 1.0  # a long slice: the rest is capped
            _commit_started()
            await pace.tick()
            assert slept[-1] == pace._MAX_REST_S
        await pace.tick()  # outside a statement: a plain yield
        assert slept[-1] == 0
    asyncio.run(main())


def test_with_no_commit_in_this_process_it_only_yields(monkeypatch):
    cpu, _, slept = _fake(monkeypatch)

    async def main():
        with pace.paced():
            for _ in range(50):
                cpu[0] += pace.BUDGET_S * 3
                await pace.tick()
    asyncio.run(main())
    assert set(slept) == {0}  # one turn per slice, never a rest


def test_a_commit_makes_it_rest_for_the_hold_then_it_goes_on(monkeypatch):
    cpu, wall, slept = _fake(monkeypatch)

    async def rested() -> bool:
        n = len(slept)
        cpu[0] += pace.BUDGET_S * 2
        await pace.tick()
        return any(s > 0 for s in slept[n:])

    async def main():
        with pace.paced():
            cpu[0] += pace.FREE_S
            assert not await rested()
            _commit_started()  # an Enqueue committed
            assert await rested()
            assert await rested()  # no new commit, but within the hold
            wall[0] += pace.BUSY_HOLD_S
            assert not await rested()
    asyncio.run(main())


def test_a_full_scan_rests_on_the_loop(monkeypatch):
    """A statement reading a whole tenant goes through the pacer between slices."""
    import uuid

    from silo.query.engine import query_shard
    from silo.shard import enqueue as enq
    from silo.shard.state import Shard, ShardConfig
    from silo.storage.records import JobInfo

    ticks = [0]
    real = pace.Pacer.tick

    async def counted(self):
        ticks[0] += 1
        await real(self)

    monkeypatch.setattr(pace.Pacer, "tick", counted)

    async def main():
        s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                             ShardConfig(commit_interval_ms=0, flush_interval_ms=1))
        try:
            for i in range(1000):
                enq._stage(s, JobInfo(f"j{i}", "t", 1, 0, b"\x80", None, {}, [], "g"))
            await s.committer.commit()
            await query_shard(s, "SELECT COUNT(*) FROM jobs WHERE tenant = 't' AND "
                                 "priority >= 0", [])
        finally:
            await s.close()
    asyncio.run(main())
    # 1000 info rows (no status column needed: no status rows) in 128-row slices,
    # then 128-row build chunks
    assert ticks[0] >= 1000 // 128 + 1000 // 128
