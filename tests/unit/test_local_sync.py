"""silo.storage.local_sync: fsync of SlateDB's local store before a commit is answered.

Every test records fsyncs through the module's seam (`local_sync.fsync`, called with the
open fd and the path it names) over a real SlateDB database on a tmp directory, and
compares what was synced with what is on disk.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest
from slatedb.uniffi import FlushOptions, FlushType

from silo.storage import db as sdb
from silo.storage import local_sync
from silo.storage.database import open_database


class Recorder:
    """The seam: records (path, thread id) of each fsync, optionally fails or blocks."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail: tuple[str, OSError] | None = None  # (path part, error) to raise
        self.hold: threading.Event | None = None  # WAL object fsyncs wait for it
        self.entered: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()

    def __call__(self, fd: int, path: str) -> None:
        if self.fail is not None and self.fail[0] in path:
            raise self.fail[1]
        if self.hold is not None and path.endswith(".sst") and "/wal/" in path:
            assert self.loop is not None and self.entered is not None
            self.loop.call_soon_threadsafe(self.entered.set)
            assert self.hold.wait(30)
        os.fsync(fd)
        with self.lock:
            self.calls.append((path, threading.get_ident()))

    def paths(self) -> set[str]:
        with self.lock:
            return {p for p, _ in self.calls}

    def paths_under(self, root) -> set[str]:
        return {p for p in self.paths() if p.startswith(str(root) + os.sep)}

    def threads(self) -> set[int]:
        with self.lock:
            return {t for _, t in self.calls}


@pytest.fixture
def rec(monkeypatch) -> Recorder:
    r = Recorder()
    monkeypatch.setattr(local_sync, "fsync", r)
    monkeypatch.setattr(local_sync, "ENABLED", True)
    # The background thread (started by any open in this process) must not pass while
    # a test compares: each test runs its own passes, over its own databases only.
    monkeypatch.setattr(local_sync, "PASSES_ENABLED", False)
    monkeypatch.setattr(local_sync, "_open", {})
    return r


async def _open(root: str):
    return await open_database(f"file://{root}", "shards/s", flush_interval_ms=10,
                               l0_sst_size_bytes=64 << 20, flush_on_commit=True)


def _committer(db) -> sdb.GroupCommitter:
    c = sdb.GroupCommitter(db, commit_interval_s=0)
    c.flush_on_commit = True
    return c


def _wal_files(root: str) -> set[str]:
    wal = os.path.join(root, "shards", "s", "wal")
    return {os.path.join(wal, n) for n in os.listdir(wal) if "#" not in n}


def test_every_wal_object_is_synced_before_its_commit_is_answered(tmp_path, rec) -> None:
    root = str(tmp_path)
    wal_dir = os.path.join(root, "shards", "s", "wal")

    async def main() -> None:
        db = await _open(root)
        assert local_sync.of(db) is not None
        # The open: its fencing WAL object and every directory up to the store's parent.
        assert _wal_files(root) <= rec.paths()
        for d in (wal_dir, os.path.join(root, "shards", "s"), os.path.join(root, "shards"),
                  root, os.path.dirname(root)):
            assert d in rec.paths(), d
        c = _committer(db)
        for i in range(15):  # one at a time: nothing else is in flight at the check
            before = len(rec.calls)
            c.put(b"k%03d" % i, b"v" * 100)
            await c.commit()
            present = _wal_files(root)
            assert present <= rec.paths(), present - rec.paths()
            new = [p for p, _ in rec.calls[before:]]
            assert new and new[-1] == wal_dir  # the directory entry after the objects
        waits = []
        for i in range(40):  # a burst: gathered into a few commits
            c.put(b"b%03d" % i, b"v")
            waits.append(c.commit())
        await asyncio.gather(*waits)
        assert _wal_files(root) <= rec.paths()
        await c.close()
        await db.shutdown()

    asyncio.run(main())


async def _commit_held_in_its_fsync(root: str, rec: Recorder):
    """A database, its committer, and a commit whose round is held in its WAL fsync."""
    db = await _open(root)
    c = _committer(db)
    rec.loop = asyncio.get_running_loop()
    rec.entered = asyncio.Event()
    rec.hold = threading.Event()
    c.put(b"a", b"1")
    f = asyncio.ensure_future(c.commit())
    await asyncio.wait_for(rec.entered.wait(), 30)
    return db, c, f


def test_a_waiter_is_answered_only_after_its_fsync(tmp_path, rec) -> None:
    """The WAL object's fsync is held: the commit's waiters stay pending until it ends,
    and the event loop keeps running meanwhile (the fsync is not on its thread)."""
    root = str(tmp_path)

    async def main() -> None:
        db, c, f = await _commit_held_in_its_fsync(root, rec)
        ticks = 0
        for _ in range(5):  # the loop is free while the fsync is held
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not f.done()
        rec.hold.set()
        await asyncio.wait_for(f, 30)
        assert _wal_files(root) <= rec.paths()
        rec.hold = None
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_the_next_commit_is_written_and_flushed_while_a_round_runs(tmp_path, rec) -> None:
    """A held round does not hold up the next commit's write and flush; its waiters are
    answered after its own round, which runs after the held one (commit order)."""
    root = str(tmp_path)

    async def main() -> None:
        db, c, first = await _commit_held_in_its_fsync(root, rec)
        wal_before = _wal_files(root)
        c.put(b"b", b"2")
        second = asyncio.ensure_future(c.commit())
        for _ in range(3000):  # the second commit's flush lands its own WAL object (≤ 30 s)
            if c.batches_written == 2 and len(_wal_files(root)) > len(wal_before):
                break
            await asyncio.sleep(0.01)
        assert c.batches_written == 2 and len(_wal_files(root)) > len(wal_before)
        assert not first.done() and not second.done()
        order: list[str] = []
        first.add_done_callback(lambda _: order.append("first"))
        second.add_done_callback(lambda _: order.append("second"))
        rec.hold.set()
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert order == ["first", "second"]
        assert _wal_files(root) <= rec.paths()
        rec.hold = None
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_only_one_commit_is_written_ahead_of_a_round(tmp_path, rec) -> None:
    """While a round is held and the next commit's flush already waits for the round
    after it, further writes are not written as commits of their own: they gather into
    one batch, written once the waiting flush's round starts. Without the bound, a busy
    shard wrote a WAL object per few operations during a round, and each object costs
    the round its own fsync (h2load Enqueue: 2.5 operations per commit, rounds of ~20
    objects taking ~50 ms)."""
    root = str(tmp_path)

    async def main() -> None:
        db, c, first = await _commit_held_in_its_fsync(root, rec)
        c.put(b"b", b"2")
        second = asyncio.ensure_future(c.commit())
        for _ in range(3000):  # the second commit is written and flushed (<= 30 s)
            if c.batches_written == 2 and local_sync.of(db).backlog:
                break
            await asyncio.sleep(0.01)
        assert c.batches_written == 2 and local_sync.of(db).backlog
        later = []
        for i in range(5):  # writes arriving one by one while the round is held
            c.put(b"c%d" % i, b"3")
            later.append(asyncio.ensure_future(c.commit()))
            await asyncio.sleep(0.05)  # an unbounded committer writes each one at once
        assert c.batches_written == 2
        rec.hold.set()
        await asyncio.wait_for(asyncio.gather(first, second, *later), 30)
        assert c.batches_written == 3  # the five gathered into one commit
        assert _wal_files(root) <= rec.paths()
        rec.hold = None
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_a_round_that_synced_the_next_flush_spares_its_round_a_listing(tmp_path, rec,
                                                                      monkeypatch) -> None:
    wal = tmp_path / "s" / "wal"
    wal.mkdir(parents=True)
    s = local_sync.LocalSync(str(tmp_path / "s"), str(tmp_path))
    listed = []
    real = os.listdir
    monkeypatch.setattr(local_sync.os, "listdir", lambda p: listed.append(p) or real(p))
    for i in (1, 2):  # round 1 finds its own object and the next commit's
        (wal / local_sync._wal_name(i)).write_bytes(b"w")
    s.sync_wal(1)
    s.sync_wal(1)  # round 2: its object was synced already, no listing
    assert listed == []
    s.sync_wal(1)  # a third round finding nothing: a gap, so it lists
    assert len(listed) == 1
    s.close()


def test_no_fsync_runs_on_the_event_loop_thread(tmp_path, rec) -> None:
    root = str(tmp_path)

    async def main() -> None:
        db = await _open(root)
        c = _committer(db)
        for i in range(5):
            c.put(b"k%d" % i, b"v")
            await c.commit()
        await c.close()
        await db.shutdown()
        await local_sync.final_pass([db])

    asyncio.run(main())
    assert rec.calls
    assert threading.get_ident() not in rec.threads()


def test_option_off_or_another_store_means_no_fsync(tmp_path, rec, monkeypatch) -> None:
    async def main() -> None:
        local_sync.configure(False)
        try:
            db = await _open(str(tmp_path))
        finally:
            local_sync.configure(True)
        mem = await open_database("memory:///", "m", flush_interval_ms=10,
                                  l0_sst_size_bytes=64 << 20, flush_on_commit=True)
        for d in (db, mem):
            assert local_sync.of(d) is None
            c = _committer(d)
            c.put(b"k", b"v")
            await c.commit()
            await c.close()
            await d.shutdown()

    asyncio.run(main())
    assert rec.calls == []


def test_a_failed_fsync_fails_the_waiting_writes_like_a_failed_flush(tmp_path, rec) -> None:
    """Nothing of the batch is acknowledged; the committer is failed (its owner told once)
    and refuses new writes, as after a failed WAL flush."""
    root = str(tmp_path)

    async def main() -> None:
        db = await _open(root)
        c = _committer(db)
        failures: list[BaseException] = []
        c.on_failure = failures.append
        c.put(b"ok", b"1")
        await c.commit()
        rec.fail = ("/wal/", OSError(errno.EIO, "Input/output error"))
        waits = []
        for i in range(5):
            c.put(b"k%d" % i, b"v")
            waits.append(c.commit())
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(r, sdb.StorageError) for r in results), results
        assert all("durability wait failed" in str(r) and "Input/output error" in str(r)
                   for r in results)
        assert len(failures) == 1 and isinstance(failures[0], OSError)
        with pytest.raises(sdb.StorageError, match="shard storage failed"):
            c.put(b"later", b"v")
        # The error stays: a later round raises it without trying again.
        rec.fail = None
        with pytest.raises(OSError, match="earlier fsync failed"):
            local_sync.of(db).sync_wal(1)
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_a_failed_background_fsync_fails_the_next_commit(tmp_path, rec) -> None:
    root = str(tmp_path)

    async def main() -> None:
        db = await _open(root)
        c = _committer(db)
        rec.fail = ("/manifest/", OSError(errno.EIO, "Input/output error"))
        local_sync.of(db).sync_background()
        c.put(b"k", b"v")
        with pytest.raises(sdb.StorageError, match="earlier fsync failed"):
            await c.commit()
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_background_files_are_synced_by_the_passes(tmp_path, rec) -> None:
    """L0 SSTs and manifests (SlateDB's threads write them) are synced by the next
    background pass, each file once; the final pass covers what a close wrote."""
    root = str(tmp_path)
    shard = os.path.join(root, "shards", "s")

    def files(sub: str) -> set[str]:
        d = os.path.join(shard, sub)
        return {os.path.join(d, n) for n in os.listdir(d) if "#" not in n}

    async def main() -> None:
        db = await _open(root)
        s = local_sync.of(db)
        c = _committer(db)
        c.put(b"k", b"v" * 1000)
        await c.commit()
        s.sync_background()
        assert files("manifest") <= rec.paths() and files("compactions") <= rec.paths()
        n = len(rec.calls)
        s.sync_background()  # nothing new: nothing synced
        assert len(rec.calls) == n
        await db.flush_with_options(FlushOptions(flush_type=FlushType.MEM_TABLE))
        ssts = files("compacted")
        assert ssts and not ssts & rec.paths()
        s.sync_background()
        assert ssts <= rec.paths()
        assert os.path.join(shard, "compacted") in rec.paths()  # its entries changed
        assert shard in rec.paths()  # a new subdirectory appeared in it
        await c.close()
        await db.shutdown()
        await local_sync.final_pass([db])
        assert files("manifest") <= rec.paths()
        assert local_sync.of(db)._wal_fd is None  # closed and forgotten

    asyncio.run(main())


def test_background_pass_syncs_new_files_and_changed_directories(tmp_path, rec) -> None:
    shard = tmp_path / "s"
    (shard / "manifest").mkdir(parents=True)
    (shard / "wal").mkdir()
    (shard / "manifest" / "1.manifest").write_bytes(b"m")
    (shard / "manifest" / "2.manifest#1").write_bytes(b"upload in progress")
    (shard / "wal" / "00000000000000000001.sst").write_bytes(b"w")
    s = local_sync.LocalSync(str(shard), str(tmp_path))
    s.sync_background()
    assert rec.paths_under(tmp_path) == {str(shard / "manifest" / "1.manifest"),
                                         str(shard / "manifest"), str(shard)}
    # (not wal/'s objects: the commit path's; not an upload in progress)
    rec.calls.clear()
    (shard / "manifest" / "1.manifest").unlink()  # a GC deletion: the directory only
    s.sync_background()
    assert rec.paths_under(tmp_path) == {str(shard / "manifest")}
    rec.calls.clear()
    (shard / "manifest" / "3.manifest").write_bytes(b"m")
    s.sync_background()
    assert [p for p, _ in rec.calls if p.startswith(str(tmp_path))] == [
        str(shard / "manifest" / "3.manifest"), str(shard / "manifest")]


def test_a_gap_in_wal_ids_is_found_by_listing(tmp_path, rec) -> None:
    wal = tmp_path / "s" / "wal"
    wal.mkdir(parents=True)
    for i in (1, 2, 4):
        (wal / local_sync._wal_name(i)).write_bytes(b"w")
    (wal / (local_sync._wal_name(5) + "#1")).write_bytes(b"upload")
    s = local_sync.LocalSync(str(tmp_path / "s"), str(tmp_path))
    s.sync_wal(0)  # 1, 2 by probing; 3 is missing
    assert rec.paths_under(tmp_path) == {str(wal / local_sync._wal_name(i))
                                         for i in (1, 2)} | {str(wal)}
    rec.calls.clear()
    s.sync_wal(0)  # a round that wrote nothing does not list
    assert rec.paths_under(tmp_path) == set()
    s.sync_wal(1)  # a round that wrote and found nothing new lists
    assert rec.paths_under(tmp_path) == {str(wal / local_sync._wal_name(4)), str(wal)}
    rec.calls.clear()
    (wal / local_sync._wal_name(5)).write_bytes(b"w")
    s.sync_wal(1)  # probing again from 5
    assert [p for p, _ in rec.calls if p.startswith(str(tmp_path))] == [
        str(wal / local_sync._wal_name(5)), str(wal)]
    s.close()


def test_local_dir_only_for_file_stores() -> None:
    assert local_sync.local_dir("file:///data/objects", "shards/x") == (
        "/data/objects/shards/x", "/data/objects")
    assert local_sync.local_dir("file:///data%20dir/", "a") == ("/data dir/a", "/data dir")
    assert local_sync.local_dir("memory:///", "a") is None
    assert local_sync.local_dir("s3://bucket/p", "a") is None


def test_a_forked_child_starts_its_own_pool_and_thread() -> None:
    """Threads do not survive fork: the child must not hand rounds to the parent's pool."""
    local_sync._pool()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit, nothing that could need another thread
        ok = local_sync._state["pool"] is None and local_sync._state["thread"] is None
        os._exit(0 if ok and not local_sync._open else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
