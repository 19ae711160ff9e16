"""Bugs the model-based test (test_shard_model.py) found, each kept as the explicit
minimal sequence that showed it, so it stays fixed whatever hypothesis draws later.

Each test drives a real Shard on a local SlateDB directory with a fake clock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from silo.shard import enqueue, give_back, lease, outcome
from silo.shard.cancel import cancel_job
from silo.shard.reaper import reap_expired_leases
from silo.shard.state import Shard, ShardConfig
from silo.storage import keys
from silo.storage.records import (
    CANCELLED,
    RUNNING,
    SCHEDULED,
    ConcurrencyLimit,
    RetryPolicy,
    job_status_decoder,
)

T0 = 1_700_000_000_000
CFG = ShardConfig(commit_interval_ms=0, flush_interval_ms=1, lease_ms=1000)
RETRY_AT_ONCE = RetryPolicy(2, 0, 0, False, 1.0)


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


def run(tmp_path, body: Callable[[Callable[[], Awaitable[Shard]], Clock], Awaitable[None]]
        ) -> None:
    """body(open_shard, clock): open_shard() opens (or reopens) one shard directory."""
    url, sid, clock = (tmp_path / "store").as_uri(), str(uuid.uuid4()), Clock()

    async def open_shard() -> Shard:
        return await Shard.open(sid, "", "", url, CFG, clock)

    asyncio.run(body(open_shard, clock))


async def add(s: Shard, *, key: str | None = None, retry: RetryPolicy | None = None,
              group: str = "g", job_id: str = "") -> str:
    return await enqueue.enqueue(
        s, tenant="-", job_id=job_id, priority=50, start_at_ms=0, retry_policy=retry,
        payload=b"\x80", limits=[ConcurrencyLimit(key, 1)] if key else [], metadata={},
        task_group=group)


async def index_rows(s: Shard, job_id: str) -> list[str]:
    """The status names of a job's status-index rows (exactly one is right)."""
    rows = await s.committer.scan_prefix(keys.kind_prefix(keys.STATUS_INDEX))
    return [keys.decode_status_index(k)[1] for k, _ in rows
            if keys.decode_status_index(k)[3] == job_id]


def test_a_retry_granted_at_once_leaves_no_running_index_row(tmp_path):
    """enqueue (limit k1 max 1, immediate retries), lease, report failure.

    The retry joined its queue and was granted at once; the grant settled the job out
    of memory before the retry wrote its Scheduled status, so the Running index row
    (which holds the lease since layout 4) stayed. At the next open, with another job
    of the tenant Running, that row came back as a live lease of a Scheduled job.
    """
    async def body(open_shard, clock):
        s = await open_shard()
        jid = await add(s, key="k1", retry=RETRY_AT_ONCE, group="h")
        await add(s, group="g", job_id="other")
        [lt] = await lease.lease_tasks(s, "w", 1, "h")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        [other] = await lease.lease_tasks(s, "w", 1, "g")
        assert await index_rows(s, jid) == ["Scheduled"]
        await s.close()
        s = await open_shard()
        assert set(s.leases) == {other.lease.task.task_id}
        assert (s.active.get(("-", jid)) is None
                or s.active[("-", jid)].kind == SCHEDULED)
        [again] = await lease.lease_tasks(s, "w", 1, "h")
        assert (again.lease.task.job_id, again.lease.task.attempt) == (jid, 2)
        await s.close()
    run(tmp_path, body)


def test_a_reaped_retry_granted_at_once_leaves_no_running_index_row(tmp_path):
    """The same through the reaper: lease, let it expire, reap (WORKER_CRASHED)."""
    async def body(open_shard, clock):
        s = await open_shard()
        jid = await add(s, key="k1", retry=RETRY_AT_ONCE)
        await lease.lease_tasks(s, "w", 1, "g")
        clock.t += 1000
        assert await reap_expired_leases(s) == 1
        assert await index_rows(s, jid) == ["Scheduled"]
        assert s.tenant_status.get(("-", "Running"), 0) == 0
        await s.close()
    run(tmp_path, body)


def test_a_given_back_named_lease_goes_through_its_limit_again(tmp_path):
    """enqueue (limit k1 max 1), LeaseTask of that job (bypasses limits), give it back,
    LeaseTasks.

    The named lease held no slot; give back requeued that slot-less RunAttempt, so
    LeaseTasks ran the job without its concurrency slot: with another job holding k1's
    one slot, two jobs of k1 ran at once.
    """
    async def body(open_shard, clock):
        s = await open_shard()
        first = await add(s, key="k1", job_id="first")
        named = await lease.lease_task(s, "-", first, "w")
        second = await add(s, key="k1", job_id="second")
        [holder] = await lease.lease_tasks(s, "w", 1, "g")
        assert holder.lease.task.job_id == second
        await give_back.give_back(s, "w", named.lease.task.task_id)
        assert await lease.lease_tasks(s, "w", 5, "g") == []  # k1's one slot is held
        await outcome.report_outcome(s, holder.lease.task.task_id, outcome.Success(b""))
        [again] = await lease.lease_tasks(s, "w", 5, "g")
        assert again.lease.task.job_id == first and list(again.lease.task.held_queues) == [
            "k1"]
        assert again.lease.task.attempt == 1
        assert s.active[("-", first)].kind == RUNNING
        await s.close()
    run(tmp_path, body)


def test_a_job_cancelled_while_give_back_reads_its_info_ends_cancelled(tmp_path):
    """enqueue, LeaseTasks, evict the job's info from the cache, give back, and cancel
    the job while give back reads that info from storage.

    Give back checked for a cancel only before its read, so the cancel that came in
    during it was lost: the job went back to Scheduled and ran again.
    """
    async def body(open_shard, clock):
        s = await open_shard()
        jid = await add(s)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        s.info_cache.clear()
        real_get = s.committer.get

        async def get_then_cancel(key: bytes):
            raw = await real_get(key)
            await cancel_job(s, "-", jid)
            return raw

        s.committer.get = get_then_cancel
        await give_back.give_back(s, "w", lt.lease.task.task_id)
        s.committer.get = real_get
        assert ("-", jid) not in s.active or s.active[("-", jid)].kind != SCHEDULED
        assert await lease.lease_tasks(s, "w", 5, "g") == []
        raw = await s.committer.get(keys.job_status("-", jid))
        assert job_status_decoder.decode(raw).kind == CANCELLED
        assert await index_rows(s, jid) == ["Cancelled"]
        await s.close()
    run(tmp_path, body)
