"""silo.storage.local_sync's rounds on _walsync's C threads (the default when built).

The C round itself (`_walsync.sync_wal`, `_walsync.Rounds`) is checked on real files; the
ordering around it (a waiter is answered only from its round's result, flushes that
return meanwhile wait for the next round, errors, close) with a stand-in for the C
object that the test completes by hand, running the real C round at that moment.
"""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from silo.storage import db as sdb
from silo.storage import local_sync
from tests.unit.test_local_sync import _committer, _open

_walsync = pytest.importorskip("silo.storage._walsync")


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.setattr(local_sync, "ENABLED", True)
    monkeypatch.setattr(local_sync, "NATIVE", True)
    monkeypatch.setattr(local_sync, "PASSES_ENABLED", False)
    monkeypatch.setattr(local_sync, "_open", {})
    assert local_sync.fsync is local_sync._OS_FSYNC  # no recorder: the C path is taken


def _objects(wal, ids) -> None:
    for i in ids:
        (wal / local_sync._wal_name(i)).write_bytes(b"w")


def test_c_round_syncs_from_start_until_an_id_is_missing(tmp_path) -> None:
    wal = tmp_path / "wal"
    wal.mkdir()
    _objects(wal, (1, 2, 3, 5))
    (wal / (local_sync._wal_name(4) + "#1")).write_bytes(b"upload in progress")
    fd = os.open(wal, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _walsync.sync_wal(fd, 1)[:2] == (4, 0)
        assert _walsync.sync_wal(fd, 4)[:2] == (4, 0)  # nothing at 4: nothing synced
        assert _walsync.sync_wal(fd, 5)[:2] == (6, 0)
    finally:
        os.close(fd)


def test_c_round_reports_the_errno_that_stopped_it(tmp_path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)  # a closed fd: openat fails with EBADF, not a quiet "nothing new"
    assert _walsync.sync_wal(fd, 1)[:2] == (1, errno.EBADF)
    wal = tmp_path / "wal"
    wal.mkdir()
    os.mkfifo(wal / local_sync._wal_name(1))  # opened (O_RDONLY blocks: use a writer)
    w = os.open(wal / local_sync._wal_name(1), os.O_RDWR | os.O_NONBLOCK)
    fd = os.open(wal, os.O_RDONLY | os.O_DIRECTORY)
    try:  # fsync of a fifo fails (EINVAL): the round stops there, without the dir fsync
        assert _walsync.sync_wal(fd, 1)[:2] == (1, errno.EINVAL)
    finally:
        os.close(fd)
        os.close(w)


@pytest.mark.parametrize("overlap", [True, False])
def test_rounds_deliver_results_through_the_eventfd(tmp_path, overlap) -> None:
    """Rounds at once on both threads (each may take the other's directory fsync or
    withdraw its own), one of more objects than a batch of open fds (32)."""
    wal = tmp_path / "wal"
    wal.mkdir()
    _objects(wal, [7, 8, *range(100, 140)])
    fd = os.open(wal, os.O_RDONLY | os.O_DIRECTORY)

    async def main() -> list:
        r = _walsync.Rounds(overlap=overlap)
        loop = asyncio.get_running_loop()
        got: list = []
        ready = asyncio.Event()

        def drain() -> None:
            got.extend(r.drain())
            if len(got) == 4:
                ready.set()
        loop.add_reader(r.fileno(), drain)
        r.submit(11, fd, 7)
        r.submit(12, fd, 9)
        r.submit(13, fd, 100)
        r.submit(14, fd, 8)
        await asyncio.wait_for(ready.wait(), 30)
        loop.remove_reader(r.fileno())
        r.close()
        return got

    got = asyncio.run(main())
    os.close(fd)
    assert sorted((t, n, e) for t, n, e, _ in got) == [
        (11, 9, 0), (12, 9, 0), (13, 140, 0), (14, 9, 0)]
    assert all(ns > 0 for *_, ns in got)


def test_a_forked_child_cannot_use_the_parents_rounds() -> None:
    r = _walsync.Rounds()
    pid = os.fork()
    if pid == 0:
        try:
            r.submit(1, 0, 1)
        except RuntimeError:
            os._exit(0 if not local_sync._natives else 2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    r.close()
    assert os.waitstatus_to_exitcode(status) == 0


def _newest_wal(root: str) -> int:
    names = os.listdir(os.path.join(root, "shards", "s", "wal"))
    return local_sync._wal_ids(names)[-1]


def test_commits_are_answered_after_a_c_round_covered_their_objects(tmp_path,
                                                                   monkeypatch) -> None:
    root = str(tmp_path)

    def no_pool_round(self, flushes):
        raise AssertionError("a commit's round ran in the Python pool")

    async def main() -> None:
        db = await _open(root)
        s = local_sync.of(db)
        monkeypatch.setattr(local_sync.LocalSync, "sync_wal", no_pool_round)
        c = _committer(db)
        for i in range(10):
            c.put(b"k%d" % i, b"v" * 100)
            await c.commit()
            assert s._next_wal == _newest_wal(root) + 1  # every object there was synced
        assert asyncio.get_running_loop() in local_sync._natives
        await c.close()
        await db.shutdown()

    asyncio.run(main())


class FakeRounds:
    """Stands in for wal_rounds.NativeRounds: holds each submitted round until finish()."""

    def __init__(self) -> None:
        self.jobs: list[tuple[local_sync.LocalSync, int, int]] = []

    def submit(self, s: local_sync.LocalSync, wal_fd: int, start: int) -> None:
        self.jobs.append((s, wal_fd, start))

    def finish(self, err: int = 0) -> None:
        s, fd, start = self.jobs.pop(0)
        next_id, e, ns = _walsync.sync_wal(fd, start)  # the real round, now
        s.native_done(start if err else next_id, err or e, ns)


async def _held(root: str, monkeypatch):
    db = await _open(root)
    fake = FakeRounds()
    monkeypatch.setattr(local_sync, "_native_rounds", lambda: fake)
    c = _committer(db)
    c.put(b"a", b"1")
    first = asyncio.ensure_future(c.commit())
    for _ in range(3000):
        if fake.jobs:
            break
        await asyncio.sleep(0.01)
    assert len(fake.jobs) == 1
    return db, c, fake, first


def test_flushes_during_a_c_round_wait_for_the_next_one(tmp_path, monkeypatch) -> None:
    root = str(tmp_path)

    async def main() -> None:
        db, c, fake, first = await _held(root, monkeypatch)
        c.put(b"b", b"2")
        second = asyncio.ensure_future(c.commit())
        for _ in range(3000):  # the second commit is written and flushed meanwhile
            if c.batches_written == 2 and not c._unconfirmed and c._durability_task is None:
                break
            await asyncio.sleep(0.01)
        assert c.batches_written == 2
        await asyncio.sleep(0.05)
        assert len(fake.jobs) == 1 and not first.done() and not second.done()
        order: list[str] = []
        first.add_done_callback(lambda _: order.append("first"))
        second.add_done_callback(lambda _: order.append("second"))
        fake.finish()  # the first round ended: its waiter, and a round for the second
        await asyncio.sleep(0)
        assert first.done() and not second.done() and len(fake.jobs) == 1
        fake.finish()
        await asyncio.wait_for(second, 30)
        assert order == ["first", "second"]
        s = local_sync.of(db)
        assert s._next_wal == _newest_wal(root) + 1
        closing = asyncio.ensure_future(c.close())
        await asyncio.wait_for(closing, 30)
        await db.shutdown()

    asyncio.run(main())


def test_only_one_commit_is_written_ahead_of_a_c_round(tmp_path, monkeypatch) -> None:
    """As on the pool path (test_local_sync): while a C round is held and the next
    commit's flush waits for the round after it, later writes gather unwritten; the
    held round's end starts the next round and lets them go as one commit."""
    root = str(tmp_path)

    async def main() -> None:
        db, c, fake, first = await _held(root, monkeypatch)
        s = local_sync.of(db)
        c.put(b"b", b"2")
        second = asyncio.ensure_future(c.commit())
        for _ in range(3000):  # the second commit is written and flushed (<= 30 s)
            if c.batches_written == 2 and s.backlog:
                break
            await asyncio.sleep(0.01)
        assert c.batches_written == 2 and s.backlog
        later = []
        for i in range(5):
            c.put(b"c%d" % i, b"3")
            later.append(asyncio.ensure_future(c.commit()))
            await asyncio.sleep(0.05)  # an unbounded committer writes each one at once
        assert c.batches_written == 2
        fake.finish()  # the second flush's round starts: the five may go now
        for _ in range(3000):
            if c.batches_written == 3 and len(fake.jobs) == 1 and s.backlog:
                break
            await asyncio.sleep(0.01)
        assert c.batches_written == 3 and first.done()
        fake.finish()
        fake.finish()
        await asyncio.wait_for(asyncio.gather(second, *later), 30)
        assert c.batches_written == 3
        await asyncio.wait_for(c.close(), 30)
        await db.shutdown()

    asyncio.run(main())


def test_a_failed_c_round_fails_its_waiters_and_later_rounds(tmp_path, monkeypatch) -> None:
    root = str(tmp_path)

    async def main() -> None:
        db, c, fake, first = await _held(root, monkeypatch)
        failures: list[BaseException] = []
        c.on_failure = failures.append
        fake.finish(err=errno.EIO)
        with pytest.raises(sdb.StorageError, match="Input/output error"):
            await first
        assert len(failures) == 1
        s = local_sync.of(db)
        with pytest.raises(OSError, match="earlier fsync failed"):
            s.sync_wal(1)
        s._waiting.append(([], lambda bs, e: failures.append(e)))
        s._next_round("s")  # a kept error: the round fails without being submitted
        assert not fake.jobs and "earlier fsync failed" in str(failures[-1])
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_close_during_a_c_round_leaves_the_fd_to_it(tmp_path, monkeypatch) -> None:
    """The C thread uses wal/'s fd number: closed under it, the number could be reused
    by another open and the round would fsync the wrong file."""
    root = str(tmp_path)

    async def main() -> None:
        db, c, fake, first = await _held(root, monkeypatch)
        s = local_sync.of(db)
        fd = s._wal_fd
        s.close()
        assert s._wal_fd == fd and os.fstat(fd)  # still open
        fake.finish()
        await asyncio.wait_for(first, 30)
        assert s._wal_fd is None
        with pytest.raises(OSError):
            os.fstat(fd)
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_a_c_round_that_found_nothing_new_lists_wal(tmp_path, monkeypatch) -> None:
    root = str(tmp_path)
    listed: list = []
    real = os.listdir

    async def main() -> None:
        db, c, fake, first = await _held(root, monkeypatch)
        s, fd, start = fake.jobs.pop(0)
        monkeypatch.setattr(local_sync.os, "listdir", lambda p: listed.append(p) or real(p))
        s.native_done(start, 0, 1000)  # as if probing found no object: a gap
        await asyncio.wait_for(first, 30)
        assert listed and s._next_wal == _newest_wal(root) + 1
        await c.close()
        await db.shutdown()

    asyncio.run(main())
