"""The bounded ready buffer: queued jobs live in storage, memory holds the earliest few.

Every test runs with a buffer far smaller than the queue, so leasing goes through many
refills; each checks that memory stays bounded (buffer ≤ 2 × size, `active` ≤ what
runs) while every job is still leased exactly once, in ready order (start time, then
priority, then job id).
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from silo.errors import SiloError
from silo.shard import cancel, delete, enqueue, expedite, lease, outcome
from silo.shard.ready import next_due_ms
from silo.shard.state import Shard, ShardConfig
from silo.storage.records import CANCELLED, SCHEDULED
from tests.unit.test_shard import T0, Clock, status, task_rows

SIZE = 8


async def open_shard(store_url: str, shard_id: str, clock: Clock, size: int = SIZE) -> Shard:
    return await Shard.open(shard_id, "", "", store_url,
                            ShardConfig(commit_interval_ms=0, flush_interval_ms=1,
                                        ready_buffer_size=size), clock)


def run(coro_fn, store_url="memory:///", size: int = SIZE):
    async def main():
        clock = Clock()
        s = await open_shard(store_url, str(uuid.uuid4()), clock, size)
        try:
            return await coro_fn(s, clock)
        finally:
            await s.close()
    return asyncio.run(main())


async def put(s: Shard, job_id: str, start: int = 0, priority: int = 50, group: str = "g"):
    await enqueue.enqueue(s, tenant="-", job_id=job_id, priority=priority, start_at_ms=start,
                          retry_policy=None, payload=b"x", limits=[], metadata={},
                          task_group=group)


def bounded(s: Shard, running: int, max_tasks: int = 6) -> None:
    for b in s.buffers.values():
        assert len(b.tasks) <= max(2 * b.size, b.size + max_tasks), (len(b.tasks), b.size)
    assert len(s.active) <= running, (len(s.active), running)


async def drain(s: Shard, clock: Clock, batch: int = 5, group: str = "g", also_running: int = 0
                ) -> list[str]:
    """Lease everything due, finishing each batch; check the bounds at every step."""
    out: list[str] = []
    while True:
        got = await lease.lease_tasks(s, "w", batch, group)
        bounded(s, len(got) + also_running)
        if not got:
            return out
        for lt in got:
            out.append(lt.lease.task.job_id)
            await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        bounded(s, also_running)


def test_deep_queue_is_leased_once_in_ready_order_with_bounded_memory():
    async def t(s, clock):
        rnd = random.Random(7)
        jobs = []
        for i in range(300):
            start = T0 - rnd.randrange(0, 50)
            prio = rnd.randrange(0, 5)
            jobs.append((start, prio, f"j{i:03d}"))
            await put(s, f"j{i:03d}", start, prio)
            bounded(s, 0)
        got = await drain(s, clock)
        assert got == [j for _, _, j in sorted(jobs)]
        assert s.buffers["g"].refills > 300 // SIZE  # it really went through storage
        assert await task_rows(s) == []
    run(t)


def test_jobs_queued_beyond_the_buffer_survive_a_restart_and_open_reads_no_backlog(tmp_path):
    async def main():
        clock = Clock()
        url, sid = f"file://{tmp_path}", str(uuid.uuid4())
        s = await open_shard(url, sid, clock)
        for i in range(200):
            await put(s, f"j{i:03d}", T0 - 1000 + i)
        [first] = await lease.lease_tasks(s, "w", 1, "g")  # running across the restart
        await s.close()
        s = await open_shard(url, sid, clock)
        try:
            assert s.buffers == {} and len(s.active) == 1 and len(s.leases) == 1
            assert s.scheduled_jobs == 199
            got = await drain(s, clock, also_running=1)
            assert got == [f"j{i:03d}" for i in range(1, 200)]
            assert first.lease.task.task_id in s.leases
        finally:
            await s.close()
    asyncio.run(main())


def test_cancel_and_delete_of_a_buffered_and_of_a_stored_job():
    async def t(s, clock):
        for i in range(40):
            await put(s, f"j{i:02d}", T0 - 100 + i)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")  # fills the buffer with the next few
        assert lt.lease.task.job_id == "j00"
        buf = s.buffers["g"]
        buffered = {t.job_id for t in buf.tasks.values()}
        assert "j01" in buffered and "j39" not in buffered
        with pytest.raises(SiloError) as e:
            await delete.delete_job(s, "-", "j39")  # queued: not deletable
        assert e.value.code.name == "FAILED_PRECONDITION"
        await cancel.cancel_job(s, "-", "j01")  # in the buffer
        await cancel.cancel_job(s, "-", "j39")  # only in storage
        with pytest.raises(SiloError) as e:
            await cancel.cancel_job(s, "-", "j39")
        assert e.value.code.name == "FAILED_PRECONDITION"
        for jid in ("j01", "j39"):
            v = await status(s, jid)
            assert v.status.kind == CANCELLED
            await delete.delete_job(s, "-", jid)
        got = await drain(s, clock, also_running=1)
        assert got == [f"j{i:02d}" for i in range(2, 39)]
        assert s.scheduled_jobs == 0
    run(t)


def test_expedite_and_lease_by_id_of_a_job_beyond_the_buffer():
    async def t(s, clock):
        for i in range(30):
            await put(s, f"now{i:02d}", T0 - 100 + i)
        await put(s, "later", T0 + 3_600_000)
        await put(s, "byid", T0 + 3_600_000)
        await lease.lease_tasks(s, "w", 1, "g")
        await expedite.expedite_job(s, "-", "later")
        v = await status(s, "later")
        assert v.status.kind == SCHEDULED and v.status.next_attempt_starts_after_ms == T0
        lt = await lease.lease_task(s, "-", "byid", "w")
        assert lt.lease.task.job_id == "byid" and ("-", "byid") in s.active
        got = await drain(s, clock, also_running=2)
        assert got == [f"now{i:02d}" for i in range(1, 30)] + ["later"]
        assert await task_rows(s) == []
    run(t)


def test_future_tasks_wake_at_their_start_time():
    async def t(s, clock):
        for i in range(20):
            await put(s, f"f{i:02d}", T0 + 1000 + i)
        s.buffers.clear()  # as after a restart: nothing read yet
        assert next_due_ms(s, "g") is None  # unknown yet: a refill starts, waiters wait
        for _ in range(500):
            if s.buffer("g").refills:
                break
            await asyncio.sleep(0.01)
        assert next_due_ms(s, "g") == T0 + 1000  # the buffer head, read from storage
        assert await lease.lease_tasks(s, "w", 5, "g") == []
        clock.t = T0 + 1004
        got = await drain(s, clock)
        assert got == [f"f{i:02d}" for i in range(5)]
        assert next_due_ms(s, "g") == T0 + 1005
    run(t)


def test_enqueues_racing_refills_lose_nothing():
    """Enqueues and leases interleave while refills are awaited (the scan journal)."""
    async def t(s, clock):
        rnd = random.Random(3)
        seen: list[str] = []

        async def producer(n: int) -> None:
            for i in range(60):
                await put(s, f"p{n}-{i:02d}", T0 - rnd.randrange(0, 200), rnd.randrange(3))

        async def consumer() -> None:
            for _ in range(400):
                for lt in await lease.lease_tasks(s, "w", 3, "g"):
                    seen.append(lt.lease.task.job_id)
                    await outcome.report_outcome(s, lt.lease.task.task_id,
                                                 outcome.Success(b""))
                await asyncio.sleep(0)

        await asyncio.gather(producer(0), producer(1), producer(2), consumer())
        seen += await drain(s, clock)
        assert sorted(seen) == sorted(f"p{n}-{i:02d}" for n in range(3) for i in range(60))
        assert len(seen) == len(set(seen))
    run(t)


OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(-50, 50), st.integers(0, 3)),
    st.tuples(st.just("lease"), st.integers(1, 6)),
    st.tuples(st.just("cancel"), st.integers(0, 200)),
    st.tuples(st.just("tick"), st.integers(1, 40)),
), max_size=80)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, size=st.integers(1, 6))
def test_buffer_and_storage_match_a_simple_model(ops, size):
    """Against a sorted list of pending (start, priority, job id): LeaseTasks returns
    exactly the n earliest due ones, whatever the buffer size and cancels."""
    async def t(s, clock):
        model: dict[str, tuple[int, int, str]] = {}
        n = 0
        for op in ops:
            if op[0] == "add":
                jid = f"j{n:03d}"
                n += 1
                start = clock.t + op[1]
                await put(s, jid, start, op[2])
                model[jid] = (start, op[2], jid)
            elif op[0] == "lease":
                got = await lease.lease_tasks(s, "w", op[1], "g")
                want = sorted(k for k in model.values() if k[0] <= clock.t)[: op[1]]
                assert [lt.lease.task.job_id for lt in got] == [k[2] for k in want]
                for lt in got:
                    del model[lt.lease.task.job_id]
                    await outcome.report_outcome(s, lt.lease.task.task_id,
                                                 outcome.Success(b""))
                bounded(s, 0)
            elif op[0] == "cancel" and model:
                jid = sorted(model)[op[1] % len(model)]
                await cancel.cancel_job(s, "-", jid)
                del model[jid]
            else:
                clock.t += op[1] if op[0] == "tick" else 0
        assert s.scheduled_jobs == len(model)
    run(t, size=size)
