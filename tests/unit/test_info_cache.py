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


# ---- GetJob from memory: the cached info and status must equal storage's ------------


def _fields(view) -> tuple:
    return (view.info, view.status, view.attempts, view.result)


async def _check_matches_storage(s: Shard, job_id: str) -> str:
    """GetJob as served (cache first) equals GetJob read from storage alone; returns the
    status name so the test can follow the job's life."""
    from silo import errors
    from silo.shard import get_job
    from silo.storage.records import STATUS_NAMES

    async def read():
        try:
            return _fields(await get_job.get_job(s, "-", job_id, True))
        except errors.SiloError as e:
            return ("error", e.code, e.message)

    served = await read()
    cached, s.info_cache = s.info_cache, InfoCache(0)  # nothing cached: storage only
    try:
        from_storage = await read()
    finally:
        s.info_cache = cached
    assert served == from_storage
    return served[0] if served[0] == "error" else STATUS_NAMES[served[1].kind]


def test_get_job_from_the_cache_equals_storage_through_a_jobs_life():
    from silo.shard import cancel, delete, expedite, get_job, import_, outcome, restart
    from silo.storage.records import ATTEMPT_FAILED, ConcurrencyLimit, RetryPolicy

    async def main():
        s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                             ShardConfig(commit_interval_ms=0))
        try:
            policy = RetryPolicy(2, 60_000, 120_000, False, 2.0)
            kw = dict(tenant="-", priority=3, start_at_ms=0, payload=b"p",
                      limits=[ConcurrencyLimit("k", 5)], metadata={"a": "b"}, task_group="g")
            await enqueue.enqueue(s, job_id="j1", retry_policy=policy, **kw)
            assert s.info_cache.status("-", "j1") is not None  # served from memory
            assert await _check_matches_storage(s, "j1") == "Scheduled"
            (t,) = await lease.lease_tasks(s, "w", 1, "g")
            assert await _check_matches_storage(s, "j1") == "Running"
            await outcome.report_outcome(s, t.lease.task.task_id, outcome.Failure("E", b"d"))
            assert await _check_matches_storage(s, "j1") == "Scheduled"  # a retry
            await expedite.expedite_job(s, "-", "j1")
            assert await _check_matches_storage(s, "j1") == "Scheduled"
            (t,) = await lease.lease_tasks(s, "w", 1, "g")
            await outcome.report_outcome(s, t.lease.task.task_id, outcome.Success(b"r"))
            assert await _check_matches_storage(s, "j1") == "Succeeded"
            await delete.delete_job(s, "-", "j1")
            assert await _check_matches_storage(s, "j1") == "error"

            await enqueue.enqueue(s, job_id="j2", retry_policy=None,
                                  **{**kw, "start_at_ms": 1 << 45})
            await cancel.cancel_job(s, "-", "j2")
            assert await _check_matches_storage(s, "j2") == "Cancelled"
            await restart.restart_job(s, "-", "j2")
            assert await _check_matches_storage(s, "j2") == "Scheduled"
            # a re-import over the queued job changes its retry policy and status
            await import_.import_jobs(s, "-", [import_.ImportJob(
                "j2", 3, 0, 0, policy, b"p", [ConcurrencyLimit("k", 5)], {"a": "b"}, "g",
                [import_.ImportedAttempt(ATTEMPT_FAILED, 1, 2, error_code="X")])])
            assert await _check_matches_storage(s, "j2") in ("Scheduled", "Failed")
            view = await get_job.get_job(s, "-", "j2", False)
            assert view.info.retry_policy == policy
        finally:
            await s.close()

    asyncio.run(main())


def test_a_status_staged_before_the_info_was_cached_is_not_served():
    c = InfoCache(budget_bytes=1 << 20)
    from silo.storage.records import JobStatus

    c.put_status("-", "1", JobStatus(1, 5))  # not cached yet: not remembered
    c.put(info(1, 10))
    assert c.status("-", "1") is None
    c.put_status("-", "1", JobStatus(1, 6))
    assert c.status("-", "1") == JobStatus(1, 6)
    c.put(info(1, 10))  # re-cached (restart): the old status is forgotten
    assert c.status("-", "1") is None
    c.put_status("-", "1", JobStatus(1, 7))
    c.discard("-", "1")
    assert c.status("-", "1") is None
