"""Adaptive group commit: no window when idle, one gathered batch behind a commit in
flight, and the optional cap that writes a waiting batch anyway."""

from __future__ import annotations

import asyncio

from silo.storage.db import GroupCommitter


class _Handle:
    def __init__(self, gate: asyncio.Event) -> None:
        self._gate = gate

    async def await_durable(self) -> None:
        await self._gate.wait()


class _FakeDb:
    """A database whose durability the test releases by hand."""

    def __init__(self) -> None:
        self.writes = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, _batch) -> _Handle:
        self.writes += 1
        return _Handle(self.gate)


async def _until(cond, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


def test_an_idle_committer_writes_at_once() -> None:
    asyncio.run(_test_an_idle_committer_writes_at_once())


async def _test_an_idle_committer_writes_at_once() -> None:
    db = _FakeDb()
    c = GroupCommitter(db, commit_interval_s=0)
    c.put(b"k", b"v")
    await asyncio.wait_for(c.commit(), 1.0)
    assert db.writes == 1
    await c.close()


def test_ops_gather_behind_a_commit_in_flight() -> None:
    asyncio.run(_test_ops_gather_behind_a_commit_in_flight())


async def _test_ops_gather_behind_a_commit_in_flight() -> None:
    db = _FakeDb()
    db.gate.clear()
    c = GroupCommitter(db, commit_interval_s=0)
    c.put(b"a", b"1")
    first = asyncio.ensure_future(c.commit())
    await _until(lambda: db.writes == 1)
    later = []
    for i in range(5):  # one per loop pass: each would be its own batch without gating
        c.put(b"b%d" % i, b"2")
        later.append(asyncio.ensure_future(c.commit()))
        await asyncio.sleep(0.005)
    assert db.writes == 1 and not first.done()
    db.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 1.0)
    assert db.writes == 2 and c.batches_written == 2 and c.ops_written == 6
    await c.close()


def test_the_cap_writes_a_waiting_batch_behind_the_one_in_flight() -> None:
    asyncio.run(_test_the_cap_writes_a_waiting_batch_behind_the_one_in_flight())


async def _test_the_cap_writes_a_waiting_batch_behind_the_one_in_flight() -> None:
    db = _FakeDb()
    db.gate.clear()
    c = GroupCommitter(db, commit_interval_s=0.01)
    c.put(b"a", b"1")
    first = asyncio.ensure_future(c.commit())
    await _until(lambda: db.writes == 1)
    c.put(b"b", b"2")
    second = asyncio.ensure_future(c.commit())
    await _until(lambda: db.writes == 2)  # written after the cap, first not durable yet
    assert not first.done() and not second.done()
    db.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1.0)
    await c.close()
