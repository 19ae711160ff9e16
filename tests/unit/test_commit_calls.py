"""silo.storage.commit_calls: the committer's write and WAL flush straight through the FFI.

Each test runs a GroupCommitter over a real SlateDB database on a file store, with
flush_on_commit as the server runs it. Durability is checked the strict way: a second
opener of the same database (which replays only what reached the object store's WAL,
and fences the first) must see every committed key.
"""

from __future__ import annotations

import asyncio
import tempfile

import pytest

from silo.storage import commit_calls, ffi, wake
from silo.storage import db as sdb
from silo.storage.database import open_database

pytestmark = pytest.mark.skipif(not wake.available(), reason="silo.storage._wake not built")


async def _open(root: str):
    return await open_database(f"file://{root}", "s", flush_interval_ms=10,
                               l0_sst_size_bytes=64 << 20, flush_on_commit=True)


def _committer(db) -> sdb.GroupCommitter:
    c = sdb.GroupCommitter(db, commit_interval_s=0)
    c.flush_on_commit = True
    return c


def _forbid_generated(monkeypatch) -> None:
    """The generated Db.write / Db.flush_with_options must not run (the fast path did)."""
    mod = ffi._bindings()

    async def refuse(*_a, **_k):
        raise AssertionError("generated call used")

    monkeypatch.setattr(mod.Db, "write", refuse)
    monkeypatch.setattr(mod.Db, "flush_with_options", refuse)


def test_commits_go_through_the_fast_calls_and_are_durable(monkeypatch) -> None:
    root = tempfile.mkdtemp()

    async def main() -> None:
        assert wake.install()
        db = await _open(root)
        _forbid_generated(monkeypatch)
        c = _committer(db)
        for i in range(20):  # one at a time, then a gathered burst
            c.put(b"k%03d" % i, b"v%d" % i)
            await c.commit()
        waits = []
        for i in range(20, 60):
            c.put(b"k%03d" % i, b"v%d" % i)
            waits.append(c.commit())
        await asyncio.gather(*waits)
        assert isinstance(c._calls, commit_calls.CommitCalls)
        assert c.batches_written >= 21
        monkeypatch.undo()
        # A second opener replays the WAL from the store (the memtable was never
        # flushed to L0): everything committed is there. It fences `db`; no shutdown.
        other = await _open(root)
        for i in range(60):
            assert await other.get(b"k%03d" % i) == b"v%d" % i
        await other.shutdown()

    asyncio.run(main())


def test_a_failed_write_fails_its_batch_with_storage_error() -> None:
    root = tempfile.mkdtemp()

    async def main() -> None:
        assert wake.install()
        db = await _open(root)
        c = _committer(db)
        c.put(b"a", b"1")
        await c.commit()
        await db.shutdown()  # later writes fail inside SlateDB (Closed)
        failures = []
        c.on_failure = failures.append
        c.put(b"b", b"2")
        with pytest.raises(sdb.StorageError):
            await asyncio.wait_for(c.commit(), 10)
        assert failures and isinstance(failures[0], ffi._bindings().Error)

    asyncio.run(main())


def test_without_the_native_wake_the_generated_calls_are_used() -> None:
    root = tempfile.mkdtemp()

    async def main() -> None:
        db = await _open(root)  # wake not installed on this loop
        c = _committer(db)
        c.put(b"a", b"1")
        await c.commit()
        assert c._calls is False
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_the_lowered_flush_options_are_the_generated_bytes() -> None:
    """The argument is lowered once and replayed: it must be exactly the generated one."""
    mod = ffi._bindings()

    async def main() -> None:
        assert wake.install()
        db = await _open(tempfile.mkdtemp())
        calls = commit_calls.CommitCalls(db)
        rb = mod._UniffiFfiConverterTypeFlushOptions.lower(
            mod.FlushOptions(flush_type=mod.FlushType.WAL))
        try:
            import ctypes

            assert calls._flush_bytes == ctypes.string_at(rb.data, rb.len)
        finally:
            rb.free()
        await db.shutdown()

    asyncio.run(main())


def test_a_started_flush_is_on_its_way_before_it_is_awaited() -> None:
    """flush_wal_started() sends the flush when called (the durability task awaits it a
    loop pass later): the write is in the store's WAL although nobody awaited yet."""
    root = tempfile.mkdtemp()

    async def main() -> None:
        assert wake.install()
        # A 10 s WAL ticker: only the explicit flush can make the write durable here.
        db = await open_database(f"file://{root}", "s", flush_interval_ms=10_000,
                                 l0_sst_size_bytes=64 << 20)
        await db.put(b"k", b"v")  # in the WAL buffer, not durable
        calls = commit_calls.CommitCalls(db)
        started = calls.flush_wal_started()
        await asyncio.sleep(0.5)  # the coroutine has not run
        other = await _open(root)
        assert await other.get(b"k") == b"v"
        await started
        await other.shutdown()

    asyncio.run(main())


def test_an_early_flush_that_missed_its_write_is_followed_by_one_that_carries_it(
        monkeypatch) -> None:
    """confirm() checks the write's own handle: when the early flush did not carry the
    write (as when SlateDB holds a write back and the flush overtakes it; here the early
    flush does nothing at all), it flushes again and waits, so the batch is still durable
    before its waiters return."""
    root = tempfile.mkdtemp()

    async def no_flush() -> None:
        return None

    def flush_first(self, batch):
        return self.write_started(batch), no_flush()

    async def main() -> None:
        assert wake.install()
        db = await open_database(f"file://{root}", "s", flush_interval_ms=10_000,
                                 l0_sst_size_bytes=64 << 20, flush_on_commit=False)
        c = _committer(db)
        c.put(b"warm", b"0")
        await c.commit()
        monkeypatch.setattr(commit_calls.CommitCalls, "write_flushing", flush_first)
        for i in range(5):
            c.put(b"k%d" % i, b"v%d" % i)
            await c.commit()
        assert c._calls.late_flushes >= 1
        other = await _open(root)
        for i in range(5):
            assert await other.get(b"k%d" % i) == b"v%d" % i
        await other.shutdown()

    asyncio.run(main())
