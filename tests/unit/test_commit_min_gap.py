"""storage.commit_min_gap_ms: under concurrency an idle writer waits until the gap since
the last commit's start has passed, so more operations share a commit; a lone operation
(the last batch held one) still commits at once, and the gap off changes nothing."""

from __future__ import annotations

import asyncio

from silo.storage.db import GroupCommitter
from tests.unit.test_group_commit import _FakeDb, _until

GAP = 0.2


async def _two_ops_then(c: GroupCommitter) -> None:
    """One batch of two operations, durable: the gap is armed from its start."""
    c.put(b"a", b"1")
    f1 = c.commit()
    c.put(b"b", b"2")
    f2 = c.commit()
    await asyncio.wait_for(asyncio.gather(f1, f2), 5.0)


def test_after_a_concurrent_batch_the_next_waits_for_the_gap_and_gathers() -> None:
    asyncio.run(_test_after_a_concurrent_batch_the_next_waits_for_the_gap_and_gathers())


async def _test_after_a_concurrent_batch_the_next_waits_for_the_gap_and_gathers() -> None:
    loop = asyncio.get_running_loop()
    db = _FakeDb()
    c = GroupCommitter(db, commit_interval_s=0)
    c.min_gap_s = GAP
    await _two_ops_then(c)
    assert db.writes == 1
    started = c._last_start
    # Three operations staged one after another while the gap runs: one batch.
    waits = []
    for i in range(3):
        c.put(b"k%d" % i, b"v")
        waits.append(c.commit())
        await asyncio.sleep(0)
    assert db.writes == 1  # not written at once: the gap has not passed
    await asyncio.wait_for(asyncio.gather(*waits), 5.0)
    assert db.writes == 2  # the three shared one write
    # Timers never fire early (loop time, 1 ms resolution at worst).
    assert c._last_start - started >= GAP - 0.002
    assert loop.time() - started >= GAP - 0.002
    await c.close()


def test_a_lone_operation_still_commits_at_once() -> None:
    asyncio.run(_test_a_lone_operation_still_commits_at_once())


async def _test_a_lone_operation_still_commits_at_once() -> None:
    db = _FakeDb()
    c = GroupCommitter(db, commit_interval_s=0)
    c.min_gap_s = 60.0  # would stall the test if it applied
    for i in range(3):  # each batch holds one operation: the gap never arms
        c.put(b"k%d" % i, b"v")
        await asyncio.wait_for(c.commit(), 5.0)
    assert db.writes == 3
    await c.close()


def test_ops_gathered_behind_a_commit_wait_for_the_gap_from_its_start() -> None:
    asyncio.run(_test_ops_gathered_behind_a_commit_wait_for_the_gap_from_its_start())


async def _test_ops_gathered_behind_a_commit_wait_for_the_gap_from_its_start() -> None:
    db = _FakeDb()
    c = GroupCommitter(db, commit_interval_s=0)
    c.min_gap_s = GAP
    db.gate.clear()  # the first commit stays in flight until released
    c.put(b"a", b"1")
    f1 = c.commit()
    c.put(b"b", b"2")
    f2 = c.commit()
    await _until(lambda: db.writes == 1)
    started = c._last_start
    c.put(b"c", b"3")  # gathers behind the commit in flight
    f3 = c.commit()
    db.gate.set()
    await asyncio.wait_for(asyncio.gather(f1, f2, f3), 5.0)
    assert db.writes == 2
    assert c._last_start - started >= GAP - 0.002  # _kick waited out the gap
    await c.close()


def test_close_writes_a_batch_waiting_for_the_gap_at_once() -> None:
    asyncio.run(_test_close_writes_a_batch_waiting_for_the_gap_at_once())


async def _test_close_writes_a_batch_waiting_for_the_gap_at_once() -> None:
    db = _FakeDb()
    c = GroupCommitter(db, commit_interval_s=0)
    c.min_gap_s = 60.0
    await _two_ops_then(c)
    c.put(b"z", b"9")
    f = c.commit()
    await asyncio.wait_for(c.close(), 5.0)  # does not sit out the 60 s gap
    await asyncio.wait_for(f, 1.0)
    assert db.writes == 2


def test_the_option_reaches_every_shards_committer() -> None:
    asyncio.run(_test_the_option_reaches_every_shards_committer())


async def _test_the_option_reaches_every_shards_committer() -> None:
    import uuid

    from silo.config import Config
    from silo.runtime.worker import shard_config
    from silo.shard.state import Shard

    cfg = shard_config(Config(commit_min_gap_ms=5.0))
    assert cfg.commit_min_gap_ms == 5.0
    s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///", cfg)
    try:
        assert s.committer.min_gap_s == 0.005
    finally:
        await s.close()
    assert shard_config(Config()).commit_min_gap_ms == 0.0  # off by default
