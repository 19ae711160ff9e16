"""Adaptive group commit: no window when idle, one gathered batch behind a commit in
flight, and the optional cap that writes a waiting batch anyway."""

from __future__ import annotations

import asyncio

import pytest

from silo.storage.db import GroupCommitter, StorageError


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


class _SlowDb(_FakeDb):
    """Each write takes `delay` seconds (a busy, not a stalled, store); with `stuck`
    set, writes never return (a stalled one)."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.stuck = False
        self.sizes: list[int] = []

    async def write(self, batch) -> _Handle:
        self.sizes.append(len(batch))
        if self.stuck:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        return await super().write(batch)


class _Batch(dict):
    """Stands in for slatedb's WriteBatch: the committer fills it with put/delete."""

    def put(self, k: bytes, v: bytes) -> None:
        self[k] = v

    def delete(self, k: bytes) -> None:
        self[k] = None


@pytest.fixture
def dict_batches(monkeypatch):
    """The fake dbs below take a dict-like batch instead of slatedb's WriteBatch."""
    import silo.storage.db as dbmod

    monkeypatch.setattr(dbmod, "WriteBatch", _Batch)


def _committer(db, **kw) -> GroupCommitter:
    c = GroupCommitter(db, commit_interval_s=0)
    c._fill = lambda wb, writes: wb.update(writes)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_a_batch_is_sealed_at_its_key_cap_between_operations(dict_batches) -> None:
    asyncio.run(_test_a_batch_is_sealed_at_its_key_cap_between_operations())


async def _test_a_batch_is_sealed_at_its_key_cap_between_operations() -> None:
    db = _SlowDb()
    db.gate.clear()  # nothing becomes durable: everything after the first gathers
    c = _committer(db, max_batch_keys=4)
    c.put(b"first", b"1")
    waits = [asyncio.ensure_future(c.commit())]
    await _until(lambda: db.writes == 1)
    for op in range(5):  # 3 keys per operation, all in one loop pass
        for k in range(3):
            c.put(b"op%d-%d" % (op, k), b"v")
        waits.append(asyncio.ensure_future(c.commit()))
    # Sealed at the end of operations 1 and 3 (6 keys each) while the first is in
    # flight, pipelined behind it; operation 4's 3 keys still gather.
    await _until(lambda: db.writes == 3)
    assert db.sizes == [1, 6, 6]
    assert not any(w.done() for w in waits)
    db.gate.set()
    await asyncio.wait_for(asyncio.gather(*waits), 2.0)
    assert db.sizes == [1, 6, 6, 3]
    await c.close()


def test_the_byte_cap_seals_a_batch_too(dict_batches) -> None:
    asyncio.run(_test_the_byte_cap_seals_a_batch_too())


async def _test_the_byte_cap_seals_a_batch_too() -> None:
    db = _SlowDb()
    db.gate.clear()
    c = _committer(db, max_batch_bytes=1000)
    c.put(b"first", b"1")
    waits = [asyncio.ensure_future(c.commit())]
    await _until(lambda: db.writes == 1)
    for i in range(4):
        c.put(b"big%d" % i, bytes(600))
        waits.append(asyncio.ensure_future(c.commit()))
    await _until(lambda: db.writes == 3)
    assert db.sizes == [1, 2, 2]
    db.gate.set()
    await asyncio.wait_for(asyncio.gather(*waits), 2.0)
    await c.close()


def test_the_write_bound_counts_from_the_write_not_from_the_queue(dict_batches) -> None:
    asyncio.run(_test_the_write_bound_counts_from_the_write_not_from_the_queue())


async def _test_the_write_bound_counts_from_the_write_not_from_the_queue() -> None:
    # Five sealed batches each take 0.3 s to write: the last one waits ~1.2 s in the
    # queue, longer than the 1 s bound, but its own write is well within it.
    db = _SlowDb(delay=0.3)
    c = _committer(db, max_batch_keys=1, write_timeout_s=1.0)
    waits = []
    for i in range(5):
        c.put(b"k%d" % i, b"v")
        waits.append(asyncio.ensure_future(c.commit()))
    await asyncio.wait_for(asyncio.gather(*waits), 10.0)  # none failed
    assert c.stalled_since is None and db.sizes == [1] * 5
    await c.close()


def test_a_stalled_write_fails_every_batch_behind_it_at_once(dict_batches) -> None:
    asyncio.run(_test_a_stalled_write_fails_every_batch_behind_it_at_once())


async def _test_a_stalled_write_fails_every_batch_behind_it_at_once() -> None:

    db = _SlowDb()
    db.stuck = True
    stalls: list[bool] = []
    c = _committer(db, write_timeout_s=0.2)
    c.on_stall = stalls.append
    c.put(b"a", b"1")
    first = asyncio.ensure_future(c.commit())
    await _until(lambda: len(db.sizes) == 1)
    c.put(b"b", b"2")  # gathers behind the stuck write: never handed to the writer
    second = asyncio.ensure_future(c.commit())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for w in (first, second):
        with pytest.raises(StorageError):
            await asyncio.wait_for(w, 2.0)
    assert loop.time() - t0 < 1.0 and stalls == [True]
    c.put(b"c", b"3")  # while stalled, a new batch fails at once
    t0 = loop.time()
    with pytest.raises(StorageError):
        await asyncio.wait_for(c.commit(), 1.0)
    assert loop.time() - t0 < 0.1
    c._writer.cancel()


def test_flush_on_commit_slows_only_the_idle_wal_ticker() -> None:
    from silo.storage.database import FLUSH_ON_COMMIT_TICK_MS, wal_flush_interval_ms

    assert wal_flush_interval_ms(10, flush_on_commit=False) == 10
    assert wal_flush_interval_ms(10, flush_on_commit=True) == FLUSH_ON_COMMIT_TICK_MS
    assert wal_flush_interval_ms(500, flush_on_commit=True) == 500


def test_put_empty_stages_what_put_would() -> None:
    asyncio.run(_test_put_empty_stages_what_put_would())


async def _test_put_empty_stages_what_put_would() -> None:
    db = _FakeDb()
    db.gate.clear()
    c = GroupCommitter(db, commit_interval_s=0)
    c.put(b"a", b"old")
    c.put_empty([b"a", b"b", b"c"])
    c.delete(b"c")
    assert [c.staged_value(k) for k in (b"a", b"b", b"c", b"d")] == [
        (True, b""), (True, b""), (True, None), (False, None)]
    db.gate.set()
    await asyncio.wait_for(c.commit(), 1.0)
    await c.close()


def test_waiters_resume_one_loop_pass_after_the_batch_is_durable() -> None:
    """The durability wait returning resolves each operation's own future directly: the
    operation runs on in the next loop pass (through a done callback and asyncio.shield
    it took two more)."""
    asyncio.run(_test_waiters_resume_one_loop_pass_after_the_batch_is_durable())


async def _test_waiters_resume_one_loop_pass_after_the_batch_is_durable() -> None:
    loop = asyncio.get_running_loop()
    passes = [0]
    ticking = [True]

    def tick() -> None:  # one increment per loop pass
        passes[0] += 1
        if ticking[0]:
            loop.call_soon(tick)

    durable_at: list[int] = []

    class Handle:
        async def await_durable(self) -> None:
            await asyncio.sleep(0)
            durable_at.append(passes[0])

    class Db:
        async def write(self, _batch) -> Handle:
            return Handle()

    c = GroupCommitter(Db(), commit_interval_s=0)
    c._fill = lambda wb, writes: None
    loop.call_soon(tick)
    c.put(b"k", b"v")
    await c.commit()
    resumed_at = passes[0]
    ticking[0] = False
    assert durable_at and resumed_at - durable_at[0] <= 1
    await c.close()


def test_an_idle_committer_starts_writing_two_loop_passes_after_staging() -> None:
    """The pass after the staging one lets what it woke join the batch; the writer then
    seals and writes it in the next pass (a sealing callback plus a writer wake-up took
    one more)."""
    asyncio.run(_test_an_idle_committer_starts_writing_two_loop_passes_after_staging())


async def _test_an_idle_committer_starts_writing_two_loop_passes_after_staging() -> None:
    loop = asyncio.get_running_loop()
    passes = [0]
    ticking = [True]

    def tick() -> None:
        passes[0] += 1
        if ticking[0]:
            loop.call_soon(tick)

    written_at: list[int] = []
    sizes: list[int] = []

    class Db(_FakeDb):
        async def write(self, batch) -> _Handle:
            written_at.append(passes[0])
            return await super().write(batch)

    c = GroupCommitter(Db(), commit_interval_s=0)
    c._fill = lambda wb, writes: sizes.append(len(writes))
    await asyncio.sleep(0)  # the writer task is parked on its queue
    loop.call_soon(tick)
    await asyncio.sleep(0)
    staged_at = passes[0]
    c.put(b"a", b"1")
    first = c.commit()
    loop.call_soon(lambda: (c.put(b"b", b"2"), c.commit()))  # runs in the next pass
    await first
    ticking[0] = False
    assert sizes == [2]  # both in one batch
    assert written_at[0] - staged_at <= 2
    await c.close()
