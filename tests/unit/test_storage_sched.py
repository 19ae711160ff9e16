"""silo.storage.sched: with storage.slatedb_sched_batch on, SlateDB's threads run under
SCHED_BATCH (they do not preempt the event loop when a commit wakes them), set when a
database opens and again by the committer for threads started later; without it (the
default) they are left alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile

import pytest

from silo.storage import db as sdb
from silo.storage import sched
from silo.storage.database import open_database

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")


@pytest.fixture
def opted_in(monkeypatch):
    monkeypatch.setitem(sched._state, "on", True)
    assert sched.enabled()


def _slatedb_threads() -> dict[int, int]:
    """tid -> scheduling policy, for this process's SlateDB threads."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        if sched._comm(tid).startswith(sched.THREAD_PREFIXES):
            with contextlib.suppress(OSError):  # ended meanwhile
                out[int(tid)] = os.sched_getscheduler(int(tid))
    return out


async def _open():
    return await open_database(f"file://{tempfile.mkdtemp()}", "s",
                               flush_interval_ms=10, l0_sst_size_bytes=64 << 20,
                               flush_on_commit=True)


def test_opening_a_database_puts_slatedb_threads_under_sched_batch(opted_in) -> None:
    async def main() -> None:
        db = await _open()
        await db.put(b"k", b"v")
        threads = _slatedb_threads()
        assert threads, "no SlateDB thread found by name"
        assert set(threads.values()) == {os.SCHED_BATCH}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the loop's thread is not
        await db.shutdown()

    asyncio.run(main())


def test_the_committer_sets_threads_started_later(opted_in) -> None:
    async def main() -> None:
        db = await _open()
        c = sdb.GroupCommitter(db, commit_interval_s=0)
        c.flush_on_commit = True
        tid = next(iter(_slatedb_threads()))
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))  # as if new
        c.put(b"a", b"1")
        await c.commit()  # the first batch scans
        assert os.sched_getscheduler(tid) == os.SCHED_BATCH
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        c.put(b"b", b"2")
        await c.commit()  # within RESCAN_S of the last scan: none
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        c._sched_at = 0.0  # the interval has passed
        c.put(b"c", b"3")
        await c.commit()
        assert os.sched_getscheduler(tid) == os.SCHED_BATCH
        await c.close()
        await db.shutdown()

    asyncio.run(main())


def test_off_by_default(monkeypatch) -> None:
    assert not sched.enabled()
    for tid in _slatedb_threads():  # threads of earlier tests in this process
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))

    async def main() -> None:
        db = await _open()
        await db.put(b"k", b"v")
        assert set(_slatedb_threads().values()) == {os.SCHED_OTHER}
        assert sched.apply() == 0
        await db.shutdown()

    asyncio.run(main())


def test_the_option_reaches_the_process_setting() -> None:
    from silo.config import load_config

    assert load_config({}, {}, None).slatedb_sched_batch is False
    assert load_config({}, {"SILO_SLATEDB_SCHED_BATCH": "1"}, None).slatedb_sched_batch is True
    assert load_config({"slatedb_sched_batch": True}, {}, None).slatedb_sched_batch is True
