"""The L0 flush policy (silo.shard.memtable_flush.due) without I/O, and both flushes on a
real shard: every interval while written, never while idle, and a burst of writes one
quiet look after it ends, not 30 s later."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from silo.shard import enqueue
from silo.shard.memtable_flush import IDLE_FLUSH_BYTES, Seen, due, maybe_flush_memtable
from silo.shard.state import Shard, ShardConfig
from tests.unit.test_storage_gc import churn, files

MB = 1 << 20
PAYLOAD = b"\xc6" + (65536).to_bytes(4, "big") + b"x" * 65536  # msgpack bin 32


def test_the_interval_flushes_what_was_written():
    flush, seen = due(30.0, Seen(0.0, 5, 100, 6), batches=7, nbytes=200, interval_s=30)
    assert flush and seen == Seen(30.0, 7, 200, 7)


def test_nothing_written_never_flushes_and_an_idle_interval_starts_over():
    flush, seen = due(31.0, Seen(0.0, 5, 100, 5), batches=5, nbytes=100, interval_s=30)
    assert not flush and seen.at == 31.0  # a later write waits up to a whole interval
    flush, seen = due(40.0, seen, batches=6, nbytes=150, interval_s=30)
    assert not flush


def test_a_burst_flushes_one_quiet_look_after_it_ends():
    seen = Seen(0.0, 0, 0, 0)
    flush, seen = due(1.0, seen, batches=900, nbytes=2 * MB, interval_s=30)
    assert not flush  # still being written at this look
    flush, seen = due(2.0, seen, batches=950, nbytes=3 * MB, interval_s=30)
    assert not flush
    flush, seen = due(3.0, seen, batches=950, nbytes=3 * MB, interval_s=30)
    assert flush and seen == Seen(3.0, 950, 3 * MB, 950)


def test_a_small_burst_waits_for_the_interval():
    seen = Seen(0.0, 0, 0, 0)
    _, seen = due(1.0, seen, batches=3, nbytes=IDLE_FLUSH_BYTES - 1, interval_s=30)
    flush, seen = due(2.0, seen, batches=3, nbytes=IDLE_FLUSH_BYTES - 1, interval_s=30)
    assert not flush  # sparse writes make no small SSTs
    flush, _ = due(30.0, seen, batches=3, nbytes=IDLE_FLUSH_BYTES - 1, interval_s=30)
    assert flush


@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 50), st.integers(0, 4 * MB)),
                max_size=40))
def test_a_flush_always_carries_something_new(steps):
    """Whatever the looks see, a flush happens only with batches written since the last
    flush, and every look is remembered."""
    t, batches, nbytes = 0.0, 0, 0
    seen = Seen(0.0, 0, 0, 0)
    for dt, db, dn in steps:
        t, batches, nbytes = t + dt, batches + db, nbytes + (dn if db else 0)
        before = seen
        flush, seen = due(t, seen, batches, nbytes, interval_s=30)
        if flush:
            assert batches > before.batches
            assert seen == Seen(t, batches, nbytes, batches)
        else:
            assert seen.batches == before.batches and seen.looked == batches


@contextlib.asynccontextmanager
async def memtable_shard(tmp_path: Path, l0_flush_interval_s: float) -> AsyncIterator[Shard]:
    """A shard on a local store under tmp_path/store, one commit per write."""
    s = await Shard.open(str(uuid.uuid4()), "", "", (tmp_path / "store").as_uri(), ShardConfig(
        commit_interval_ms=0, flush_interval_ms=1, flush_on_commit=True,
        l0_flush_interval_s=l0_flush_interval_s))
    try:
        yield s
    finally:
        await s.close()


def l0_ssts(tmp_path: Path) -> set[str]:
    return files(tmp_path / "store").get("compacted", set())


def test_memtable_goes_to_l0_every_interval_while_written_and_not_when_idle(tmp_path):
    async def main():
        async with memtable_shard(tmp_path, 0.05) as s:
            assert await maybe_flush_memtable(s) is False  # first look only records
            await churn(s, 5)
            assert not l0_ssts(tmp_path)  # 8 MiB memtable, far from full: no L0
            await asyncio.sleep(0.06)
            assert await maybe_flush_memtable(s) is True
            assert len(l0_ssts(tmp_path)) == 1
            await asyncio.sleep(0.06)
            assert await maybe_flush_memtable(s) is False  # nothing written since
            s.config.l0_flush_interval_s = 3600
            await churn(s, 1)
            assert await maybe_flush_memtable(s) is False  # interval not over yet
    asyncio.run(main())


def test_an_ended_burst_reaches_l0_at_the_next_quiet_look(tmp_path: Path):
    async def main():
        async with memtable_shard(tmp_path, 3600) as s:
            assert await maybe_flush_memtable(s) is False  # the first look only records
            for i in range(24):  # ~1.5 MiB, far below the 8 MiB memtable
                await enqueue.enqueue(s, tenant="-", job_id=f"j{i}", priority=50,
                                      start_at_ms=0, retry_policy=None,
                                      payload=PAYLOAD, limits=[],
                                      metadata={}, task_group="g")
            assert s.committer.bytes_written >= IDLE_FLUSH_BYTES
            assert not l0_ssts(tmp_path)
            assert await maybe_flush_memtable(s) is False  # written since the last look
            assert await maybe_flush_memtable(s) is True  # quiet: the burst ended
            assert len(l0_ssts(tmp_path)) == 1
            assert await maybe_flush_memtable(s) is False  # nothing new
    asyncio.run(main())
