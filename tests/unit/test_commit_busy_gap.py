"""storage.commit_busy_gap_ms: the commit gap applies only while the process's CPU is
saturated. The saturation signal is sampled at commit starts through the committer's
`cpu_clock` seam, so the tests drive it without loading the machine."""

from __future__ import annotations

import asyncio

from silo.storage import db as sdb
from silo.storage.db import GroupCommitter, commit_gap
from tests.unit.test_commit_min_gap import _two_ops_then
from tests.unit.test_group_commit import _FakeDb

GAP = 0.5


def test_commit_gap_policy() -> None:
    busy, idle = sdb.BUSY, sdb.BUSY - 0.01
    assert commit_gap(0.0, GAP, busy, 2) == GAP
    assert commit_gap(0.0, GAP, idle, 2) == 0.0
    assert commit_gap(0.0, GAP, 1.0, 1) == 0.0  # a lone operation: never a gap
    assert commit_gap(0.1, GAP, idle, 5) == 0.1  # the fixed gap still applies
    assert commit_gap(0.7, GAP, busy, 5) == 0.7  # the larger of the two
    assert commit_gap(0.0, 0.0, 1.0, 5) == 0.0  # off


async def _saturate(c: GroupCommitter, cpu) -> None:
    """Commits spread over a few busy samples, with `cpu` saying what each cost."""
    for i in range(8):  # the first sample only starts the count; then an average
        await asyncio.sleep(2 * sdb.BUSY_SAMPLE_S)
        cpu.advance()
        c.put(b"s%d" % i, b"v")
        await asyncio.wait_for(c.commit(), 5.0)


class _Cpu:
    """cpu_clock for the committer: as much CPU as wall time passed (saturated), or
    none (idle), between calls."""

    def __init__(self, loop: asyncio.AbstractEventLoop, saturated: bool) -> None:
        self.loop, self.saturated, self.t = loop, saturated, 0.0
        self._wall = loop.time()

    def advance(self) -> None:
        now = self.loop.time()
        if self.saturated:
            self.t += now - self._wall
        self._wall = now

    def __call__(self) -> float:
        self.advance()
        return self.t


async def _three_after_a_concurrent_batch(saturated: bool) -> tuple[int, float]:
    """(writes seen right after staging three operations, seconds until they were
    durable) after a two-operation batch, with the process saturated or idle."""
    loop = asyncio.get_running_loop()
    db = _FakeDb()
    c = GroupCommitter(db, commit_interval_s=0)
    c.busy_gap_s = GAP
    cpu = _Cpu(loop, saturated)
    c.cpu_clock = cpu
    await _saturate(c, cpu)
    assert (c._busy >= sdb.BUSY) is saturated
    await _two_ops_then(c)
    before = db.writes
    t0 = loop.time()
    waits = []
    for i in range(3):
        c.put(b"k%d" % i, b"v")
        waits.append(c.commit())
        await asyncio.sleep(0)
    seen = db.writes - before
    await asyncio.wait_for(asyncio.gather(*waits), 5.0)
    took = loop.time() - t0
    await c.close()
    return seen, took


def test_saturated_process_waits_for_the_gap_and_gathers() -> None:
    seen, took = asyncio.run(_three_after_a_concurrent_batch(saturated=True))
    assert seen == 0  # not written at once: the gap runs
    assert took >= GAP / 2  # the gap counts from the last commit's start


def test_idle_process_commits_at_once() -> None:
    seen, took = asyncio.run(_three_after_a_concurrent_batch(saturated=False))
    assert took < GAP / 2  # no gap below saturation
