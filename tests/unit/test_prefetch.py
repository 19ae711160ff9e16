"""Reading the infos of the next scanned tasks ahead of their leases (silo.shard.prefetch)."""

from __future__ import annotations

import asyncio
import uuid

from silo.shard import enqueue, lease, outcome, prefetch
from silo.shard.buffer import ReadyBuffer
from silo.shard.info_cache import InfoCache
from silo.shard.state import Shard, ShardConfig
from silo.storage import keys
from silo.storage.records import JobInfo

CFG = ShardConfig(ready_buffer_size=64, commit_interval_ms=0, flush_interval_ms=1)


def _info(job_id: str, payload: bytes = b"\x80") -> JobInfo:
    return JobInfo(job_id, "t", 50, 0, payload, None, {}, [], "g")


async def _filled(url: str, n: int) -> tuple[str, list[str]]:
    """A shard dir with n queued jobs, closed: reopened, its info cache is empty."""
    sid = str(uuid.uuid4())
    s = await Shard.open(sid, "", "", url, CFG)
    ids = [await enqueue.enqueue(s, tenant="t", job_id="", priority=50, start_at_ms=0,
                                 retry_policy=None, payload=b"\x81\xa1i\x01", limits=[],
                                 metadata={}, task_group="g") for _ in range(n)]
    await s.close()
    return sid, ids


def _counting_gets(s: Shard) -> list[bytes]:
    seen: list[bytes] = []
    real = s.committer.get

    async def get(key: bytes):
        seen.append(key)
        return await real(key)

    s.committer.get = get  # type: ignore[method-assign]
    return seen


def test_after_a_lease_the_next_scanned_tasks_infos_are_read_ahead(tmp_path):
    async def main():
        url = f"file://{tmp_path}"
        sid, ids = await _filled(url, 200)
        s = await Shard.open(sid, "", "", url, CFG)
        try:
            assert len(s.info_cache) == 0
            gets = _counting_gets(s)
            [first] = await lease.lease_tasks(s, "w", 1, "g")  # reads its own info
            assert keys.job_info("t", first.lease.task.job_id) in gets
            await asyncio.gather(*s.prefetches)
            buf = s.buffer("g")
            ahead = [buf.tasks[k].job_id for k in list(buf.scanned)[:prefetch.AHEAD]]
            assert len(ahead) == prefetch.AHEAD
            assert all(s.info_cache.get("t", j) is not None for j in ahead)
            # the next leases find their infos in memory: no read of theirs on the path
            gets.clear()
            for want in ahead[: prefetch.AHEAD // 2]:
                [lt] = await lease.lease_tasks(s, "w", 1, "g")
                assert lt.lease.task.job_id == want and lt.info is not None
                assert lt.info.payload == b"\x81\xa1i\x01"
                assert keys.job_info("t", want) not in gets
                await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
            # and the read-ahead moved on with them
            await asyncio.gather(*s.prefetches)
            nxt = [buf.tasks[k].job_id for k in list(buf.scanned)[:prefetch.AHEAD]]
            assert all(s.info_cache.get("t", j) is not None for j in nxt)
        finally:
            await s.close()
    asyncio.run(main())


def test_tasks_enqueued_at_runtime_are_not_tracked(tmp_path):
    async def main():
        s = await Shard.open(str(uuid.uuid4()), "", "", f"file://{tmp_path}", CFG)
        try:
            for _ in range(10):
                await enqueue.enqueue(s, tenant="t", job_id="", priority=50, start_at_ms=0,
                                      retry_policy=None, payload=b"\x80", limits=[],
                                      metadata={}, task_group="g")
            await lease.lease_tasks(s, "w", 1, "g")
            # the first refill scanned what was in storage; those infos are cached
            # already (written by enqueue), so nothing is read ahead
            assert not s.prefetches
        finally:
            await s.close()
    asyncio.run(main())


def test_a_job_put_or_discarded_during_its_read_keeps_what_changed_it():
    c = InfoCache(1 << 20)
    ref = ("t", "j1")
    assert c.begin_fetch(ref)
    assert not c.begin_fetch(ref)  # one read at a time
    c.put(_info("j1", b"\x81\xa1v\x02"))  # re-enqueued (or imported) meanwhile
    c.put_fetched(_info("j1", b"\x81\xa1v\x01"))  # the older read comes back
    assert c.get("t", "j1").payload == b"\x81\xa1v\x02"
    assert c.begin_fetch(ref)
    c.discard("t", "j1")  # deleted meanwhile
    c.put_fetched(_info("j1"))
    assert c.get("t", "j1") is None
    assert c.begin_fetch(ref)
    c.put_fetched(_info("j1"))  # nothing changed: cached
    assert c.get("t", "j1") is not None


def test_the_scanned_queue_stays_bounded_by_the_buffer():
    buf = ReadyBuffer("g", 8)
    for round_ in range(10):
        batch = [b"k%03d-%02d" % (round_, i) for i in range(8)]
        buf._note_scanned(list(batch))
        buf.tasks = {k: None for k in batch}  # type: ignore[misc] - only the last is live
    assert len(buf.scanned) <= 2 * 8 + 8
    assert list(buf.scanned)[-8:] == sorted(buf.tasks)


def test_close_cancels_reads_in_flight(tmp_path):
    async def main():
        url = f"file://{tmp_path}"
        sid, _ = await _filled(url, 100)
        s = await Shard.open(sid, "", "", url, CFG)
        real = s.committer.get
        blocked = asyncio.Event()

        async def get(key: bytes):
            if s.prefetches:  # the read-ahead: never answers
                await blocked.wait()
            return await real(key)

        s.committer.get = get  # type: ignore[method-assign]
        await lease.lease_tasks(s, "w", 1, "g")
        futs = list(s.prefetches)
        assert futs
        await asyncio.sleep(0)
        await s.close()
        await asyncio.gather(*futs, return_exceptions=True)
        assert all(f.cancelled() for f in futs)
        assert not s.info_cache._fetching
    asyncio.run(main())
