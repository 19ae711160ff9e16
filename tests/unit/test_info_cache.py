"""The job-info cache is bounded and never needed for correctness."""

import asyncio
import uuid

from silo.shard import enqueue, lease
from silo.shard.info_cache import _ENTRY_OVERHEAD, InfoCache
from silo.shard.state import Shard, ShardConfig
from silo.storage.records import JobInfo


def info(i: int, size: int) -> JobInfo:
    return JobInfo(str(i), "-", 0, 0, b"x" * size, None, {}, [], "g")


def test_budget_evicts_oldest_first():
    c = InfoCache(budget_bytes=3 * (100 + _ENTRY_OVERHEAD))
    for i in range(5):
        c.put(info(i, 100))
    assert len(c) == 3
    assert c.get("-", "0") is None and c.get("-", "4") is not None
    c.discard("-", "4")
    assert c.get("-", "4") is None and len(c) == 2


def test_oversized_payload_is_not_cached():
    c = InfoCache(budget_bytes=1000)
    c.put(info(1, 5000))
    assert len(c) == 0


def test_leasing_reads_storage_when_the_cache_has_nothing():
    async def main():
        s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                             ShardConfig(commit_interval_ms=0, info_cache_bytes=0))
        try:
            for i in range(3):
                await enqueue.enqueue(s, tenant="-", job_id=f"j{i}", priority=1, start_at_ms=0,
                                      retry_policy=None, payload=bytes([i]) * 10, limits=[],
                                      metadata={}, task_group="g")
            assert len(s.info_cache) == 0
            got = await lease.lease_tasks(s, "w", 10, "g")
            assert [t.info.payload for t in got] == [bytes([i]) * 10 for i in range(3)]
        finally:
            await s.close()
    asyncio.run(main())
