"""The job state machine, one test per rule, against an in-memory object store.

Each test drives a real Shard (real SlateDB on `memory:///`) with a fake clock, so
timing rules (retry back-off, lease expiry, future start) are exact and instant.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from silo.errors import SiloError
from silo.shard import (
    cancel,
    delete,
    enqueue,
    expedite,
    get_job,
    lease,
    limits,
    outcome,
    restart,
)
from silo.shard.reaper import reap_expired_leases
from silo.shard.state import Shard, ShardConfig
from silo.storage import keys
from silo.storage.records import (
    ATTEMPT_CANCELLED,
    ATTEMPT_FAILED,
    ATTEMPT_RUNNING,
    ATTEMPT_SUCCEEDED,
    CANCELLED,
    FAILED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    ConcurrencyLimit,
    RetryPolicy,
)

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


async def task_rows(s: Shard) -> list[tuple[bytes, bytes]]:
    """The pending task rows as the shard sees them (the backlog lives in storage)."""
    return await s.committer.scan_prefix(keys.kind_prefix(keys.TASK))


def run(coro_fn, store_url="memory:///", shard_id=None):
    """Run coro_fn(shard, clock) against a freshly opened shard, then close it."""
    async def main():
        clock = Clock()
        s = await Shard.open(shard_id or str(uuid.uuid4()), "", "", store_url,
                             ShardConfig(commit_interval_ms=0, flush_interval_ms=1), clock)
        try:
            return await coro_fn(s, clock)
        finally:
            await s.close()
    return asyncio.run(main())


def run_populated(populate, body):
    """run(): populate(shard, clock) first, then return body(shard, clock)."""
    async def both(s, clock):
        await populate(s, clock)
        return await body(s, clock)
    return run(both)


async def add(s: Shard, job_id="", *, tenant="-", priority=50, start_at_ms=0, retry=None,
              group="g", payload=b"\x80", limits=None, metadata=None) -> str:
    return await enqueue.enqueue(
        s, tenant=tenant, job_id=job_id, priority=priority, start_at_ms=start_at_ms,
        retry_policy=retry, payload=payload, limits=limits or [], metadata=metadata or {},
        task_group=group)


async def status(s: Shard, job_id: str, tenant="-"):
    return (await get_job.get_job(s, tenant, job_id, True))


def code(e: pytest.ExceptionInfo) -> str:
    return e.value.code.name


RETRY = RetryPolicy(2, 1000, 60_000, False, 2.0)


def test_enqueue_then_lease_then_success():
    async def t(s, clock):
        jid = await add(s, payload=b"\x81\xa1a\x01")
        v = await status(s, jid)
        assert v.status.kind == SCHEDULED and v.status.current_attempt == 1
        assert v.status.next_attempt_starts_after_ms == T0 and v.info.enqueue_time_ms == T0
        [lt] = await lease.lease_tasks(s, "w1", 10, "g")
        assert lt.info.payload == b"\x81\xa1a\x01" and lt.lease.task.attempt == 1
        v = await status(s, jid)
        assert v.status.kind == RUNNING and v.status.next_attempt_starts_after_ms is None
        assert [a.status for a in v.attempts] == [ATTEMPT_RUNNING]
        clock.t += 5
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b"\xa2ok"))
        v = await status(s, jid)
        assert v.status.kind == SUCCEEDED and v.result == b"\xa2ok"
        assert [(a.status, a.finished_at_ms) for a in v.attempts] == [(ATTEMPT_SUCCEEDED, T0 + 5)]
        r = await get_job.get_job_result(s, "-", jid)
        assert (r.status, r.result, r.finished_at_ms) == (SUCCEEDED, b"\xa2ok", T0 + 5)
        assert (s.total_jobs, s.completed_jobs) == (1, 1)
    run(t)


def test_second_report_is_lease_not_found():
    async def t(s, clock):
        await add(s)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        with pytest.raises(SiloError, match="lease not found") as e:
            await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        assert code(e) == "NOT_FOUND"
    run(t)


def test_failure_retries_with_backoff_then_fails():
    async def t(s, clock):
        jid = await add(s, retry=RETRY)
        for n, wait in ((1, 2000), (2, 4000)):
            [lt] = await lease.lease_tasks(s, "w", 1, "g")
            assert lt.lease.task.attempt == n and lt.lease.task.relative_attempt == n
            await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b"x"))
            v = await status(s, jid)
            assert v.status.kind == SCHEDULED and v.status.current_attempt == n + 1
            assert v.status.next_attempt_starts_after_ms == clock.t + wait
            clock.t += wait - 1
            assert await lease.lease_tasks(s, "w", 1, "g") == []  # not due yet
            clock.t += 1
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        assert lt.lease.task.attempt == 3
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("BOOM", b"d"))
        v = await status(s, jid)
        assert v.status.kind == FAILED
        assert [a.status for a in v.attempts] == [ATTEMPT_FAILED] * 3
        assert len({a.task_id for a in v.attempts}) == 3
        r = await get_job.get_job_result(s, "-", jid)
        assert (r.status, r.error_code, r.error_data) == (FAILED, "BOOM", b"d")
    run(t)


def test_failure_without_policy_fails_at_once():
    async def t(s, clock):
        jid = await add(s)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        assert (await status(s, jid)).status.kind == FAILED
    run(t)


def test_ready_order_is_start_then_priority_then_id():
    async def t(s, clock):
        await add(s, "b", priority=10, start_at_ms=T0)
        await add(s, "a", priority=10, start_at_ms=T0)
        await add(s, "c", priority=1, start_at_ms=T0)
        await add(s, "early-low", priority=99, start_at_ms=T0 - 1)
        got = await lease.lease_tasks(s, "w", 10, "g")
        assert [x.lease.task.job_id for x in got] == ["early-low", "c", "a", "b"]
    run(t)


def test_future_jobs_are_not_leasable_until_due():
    async def t(s, clock):
        await add(s, "f", start_at_ms=T0 + 1000)
        assert await lease.lease_tasks(s, "w", 10, "g") == []
        clock.t += 1000
        assert len(await lease.lease_tasks(s, "w", 10, "g")) == 1
    run(t)


def test_task_groups_are_isolated_and_max_tasks_honoured():
    async def t(s, clock):
        for i in range(5):
            await add(s, f"j{i}", group="a")
        await add(s, "other", group="b")
        assert len(await lease.lease_tasks(s, "w", 3, "a")) == 3
        assert [x.lease.task.job_id for x in await lease.lease_tasks(s, "w", 9, "b")] == ["other"]
        assert await lease.lease_tasks(s, "w", 0, "a") == []
        assert len(await lease.lease_tasks(s, "w", 9, "a")) == 2
    run(t)


def test_duplicate_id_is_already_exists_and_changes_nothing():
    async def t(s, clock):
        await add(s, "dup", payload=b"1")
        with pytest.raises(SiloError) as e:
            await add(s, "dup", payload=b"2")
        assert code(e) == "ALREADY_EXISTS"
        assert (await status(s, "dup")).info.payload == b"1"
        assert s.total_jobs == 1 and len(await task_rows(s)) == 1
        await add(s, "dup", tenant="other")  # same id, other tenant: allowed
    run(t)


def test_concurrent_same_id_enqueues_exactly_one_wins():
    async def t(s, clock):
        res = await asyncio.gather(*(add(s, "same") for _ in range(10)), return_exceptions=True)
        assert sum(1 for r in res if r == "same") == 1
        assert all(isinstance(r, SiloError) for r in res if r != "same")
    run(t)


@pytest.mark.parametrize("kw,msg", [
    (dict(priority=100), "priority must be between 0 and 99"),
    (dict(group=""), "task_group is required"),
    (dict(group="x" * 65), "task_group too long"),
    (dict(job_id="x" * 129), "job id too long"),
    (dict(metadata={str(i): "v" for i in range(17)}), "too many entries"),
    (dict(metadata={"k" * 64: "v"}), "metadata key too long"),
    (dict(metadata={"k": "v" * 65535}), "metadata value too long"),
    (dict(limits=[ConcurrencyLimit("q", 0)]), "max_concurrency must be >= 1"),
])
def test_enqueue_validation(kw, msg):
    async def t(s, clock):
        with pytest.raises(SiloError, match=msg) as e:
            await add(s, **kw)
        assert code(e) == "INVALID_ARGUMENT" and s.total_jobs == 0
    run(t)


def test_cancel_scheduled_job_keeps_scheduling_fields():
    async def t(s, clock):
        jid = await add(s, start_at_ms=T0 + 5000)
        clock.t += 1
        await cancel.cancel_job(s, "-", jid)
        v = await status(s, jid)
        assert v.status.kind == CANCELLED and v.status.next_attempt_starts_after_ms == T0 + 5000
        clock.t += 10_000
        assert await lease.lease_tasks(s, "w", 10, "g") == []
        r = await get_job.get_job_result(s, "-", jid)
        assert (r.status, r.finished_at_ms) == (CANCELLED, T0 + 1)
        with pytest.raises(SiloError, match="already cancelled"):
            await cancel.cancel_job(s, "-", jid)
    run(t)


def test_cancel_running_job_flags_it_and_heartbeat_reports_it():
    async def t(s, clock):
        jid = await add(s)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        tid = lt.lease.task.task_id
        assert await outcome.heartbeat(s, "w", tid) is None
        await cancel.cancel_job(s, "-", jid)
        assert (await status(s, jid)).status.kind == RUNNING
        assert await outcome.heartbeat(s, "w", tid) == T0
        await outcome.report_outcome(s, tid, outcome.Cancelled())
        v = await status(s, jid)
        assert v.status.kind == CANCELLED and v.attempts[-1].status == ATTEMPT_CANCELLED
    run(t)


def test_failure_after_cancel_request_ends_cancelled_without_retry():
    async def t(s, clock):
        jid = await add(s, retry=RETRY)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await cancel.cancel_job(s, "-", jid)
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        assert (await status(s, jid)).status.kind == CANCELLED
        assert await task_rows(s) == []
    run(t)


def test_cancel_terminal_and_missing():
    async def t(s, clock):
        jid = await add(s)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        with pytest.raises(SiloError, match="terminal state") as e:
            await cancel.cancel_job(s, "-", jid)
        assert code(e) == "FAILED_PRECONDITION"
        with pytest.raises(SiloError, match="job not found") as e:
            await cancel.cancel_job(s, "-", "nope")
        assert code(e) == "NOT_FOUND"
    run(t)


def test_job_cancelled_during_backoff_reports_cancelled():
    async def t(s, clock):
        jid = await add(s, retry=RETRY)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        clock.t += 10
        await cancel.cancel_job(s, "-", jid)
        r = await get_job.get_job_result(s, "-", jid)
        assert (r.status, r.finished_at_ms) == (CANCELLED, T0 + 10)
    run(t)


def test_heartbeat_errors():
    async def t(s, clock):
        await add(s)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        with pytest.raises(SiloError, match="lease owner mismatch") as e:
            await outcome.heartbeat(s, "other", lt.lease.task.task_id)
        assert code(e) == "FAILED_PRECONDITION"
        with pytest.raises(SiloError, match="lease not found"):
            await outcome.heartbeat(s, "w", "no-such-task")
    run(t)


def test_expired_lease_is_retried_as_worker_crashed():
    async def t(s, clock):
        jid = await add(s, retry=RETRY)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        clock.t += 9_999
        assert await reap_expired_leases(s) == 0
        await outcome.heartbeat(s, "w", lt.lease.task.task_id)  # extends to now + 10 s
        clock.t += 9_999
        assert await reap_expired_leases(s) == 0
        clock.t += 1
        assert await reap_expired_leases(s) == 1
        v = await status(s, jid)
        assert v.status.kind == SCHEDULED and v.status.current_attempt == 2
        assert v.attempts[0].error_code == "WORKER_CRASHED"
        with pytest.raises(SiloError, match="lease not found"):
            await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
    run(t)


def test_expired_lease_of_cancelled_job_ends_cancelled():
    async def t(s, clock):
        jid = await add(s, retry=RETRY)
        await lease.lease_tasks(s, "w", 1, "g")
        await cancel.cancel_job(s, "-", jid)
        clock.t += 10_000
        assert await reap_expired_leases(s) == 1
        assert (await status(s, jid)).status.kind == CANCELLED
    run(t)


def test_restart_failed_job_gets_next_attempt_number_and_fresh_budget():
    async def t(s, clock):
        jid = await add(s, retry=RetryPolicy(0, 1, 1, False, 1.0))
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        await restart.restart_job(s, "-", jid)
        v = await status(s, jid)
        assert v.status.kind == SCHEDULED and v.status.current_attempt == 2
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        assert (lt.lease.task.attempt, lt.lease.task.relative_attempt) == (2, 1)
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        with pytest.raises(SiloError, match="already succeeded"):
            await restart.restart_job(s, "-", jid)
        assert s.completed_jobs == 1
    run(t)


def test_restart_refuses_in_progress_and_missing():
    async def t(s, clock):
        jid = await add(s)
        with pytest.raises(SiloError, match="still in progress"):
            await restart.restart_job(s, "-", jid)
        with pytest.raises(SiloError, match="job not found"):
            await restart.restart_job(s, "-", "missing")
    run(t)


def test_restart_cancelled_job_clears_cancel_flag():
    async def t(s, clock):
        jid = await add(s)
        await cancel.cancel_job(s, "-", jid)
        await restart.restart_job(s, "-", jid)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        assert await outcome.heartbeat(s, "w", lt.lease.task.task_id) is None
    run(t)


def test_expedite_future_job_and_errors():
    async def t(s, clock):
        jid = await add(s, start_at_ms=T0 + 60_000)
        await expedite.expedite_job(s, "-", jid)
        v = await status(s, jid)
        assert v.status.next_attempt_starts_after_ms == T0
        with pytest.raises(SiloError, match="already ready to run"):
            await expedite.expedite_job(s, "-", jid)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        assert lt.lease.task.attempt == 1
        with pytest.raises(SiloError, match="currently running"):
            await expedite.expedite_job(s, "-", jid)
        with pytest.raises(SiloError, match="job not found"):
            await expedite.expedite_job(s, "-", "missing")
    run(t)


def test_expedite_retry_backoff():
    async def t(s, clock):
        jid = await add(s, retry=RETRY)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        await expedite.expedite_job(s, "-", jid)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        assert lt.lease.task.attempt == 2
    run(t)


def test_lease_task_leases_a_future_job_with_relative_equal_absolute():
    async def t(s, clock):
        jid = await add(s, start_at_ms=T0 + 60_000)
        with pytest.raises(SiloError, match="worker_id is required"):
            await lease.lease_task(s, "-", jid, "")
        lt = await lease.lease_task(s, "-", jid, "w")
        assert lt.lease.task.job_id == jid and lt.lease.task.attempt == 1
        with pytest.raises(SiloError, match="currently running"):
            await lease.lease_task(s, "-", jid, "w")
        assert await lease.lease_tasks(s, "w", 9, "g") == []
    run(t)


def test_delete_rules():
    async def t(s, clock):
        jid = await add(s)
        with pytest.raises(SiloError, match="currently running or has pending") as e:
            await delete.delete_job(s, "-", jid)
        assert code(e) == "FAILED_PRECONDITION"
        await delete.delete_job(s, "-", "never-existed")  # idempotent
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b"r"))
        await delete.delete_job(s, "-", jid)
        with pytest.raises(SiloError, match="job not found"):
            await get_job.get_job(s, "-", jid, True)
        rows = await s.committer.scan_prefix(b"\x07")
        assert rows == []  # attempts are deleted too
        assert (s.total_jobs, s.completed_jobs) == (0, 0)
    run(t)


def test_get_job_result_of_unfinished_job():
    async def t(s, clock):
        jid = await add(s)
        with pytest.raises(SiloError, match="job is not complete: status is Scheduled") as e:
            await get_job.get_job_result(s, "-", jid)
        assert code(e) == "FAILED_PRECONDITION"
    run(t)


def test_state_survives_reopen(tmp_path):
    url = f"file://{tmp_path}/objects"
    sid = str(uuid.uuid4())

    async def before(s, clock):
        await add(s, "queued", priority=7)
        await add(s, "running")
        await add(s, "future", start_at_ms=T0 + 60_000)
        got = await lease.lease_tasks(s, "w", 1, "g")
        assert got[0].lease.task.job_id == "queued"
        return got[0].lease.task.task_id

    tid = run(before, url, sid)

    async def after(s, clock):
        assert s.total_jobs == 3
        assert (await status(s, "queued")).status.kind == RUNNING
        await outcome.heartbeat(s, "w", tid)
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert lt.lease.task.job_id == "running"
        clock.t += 60_000
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert lt.lease.task.job_id == "future"
        assert s.tenant_status[("-", "Running")] == 3
    run(after, url, sid)


def test_an_operation_that_stages_nothing_still_commits():
    async def t(s, clock):
        await s.committer.commit()  # nothing written yet
        await add(s)
        await s.committer.commit()  # after a write: waits for its durability
        assert limits.drop_tenant_holders(s, "-", clock.t) == 0
        await s.committer.commit()
        await add(s)  # storage still healthy
    run(t)


def test_cancelled_future_tasks_do_not_pile_up_in_the_ready_heap():
    async def t(s, clock):
        await asyncio.gather(*(add(s, f"f{i}", start_at_ms=T0 + 3_600_000)
                               for i in range(3000)))
        await add(s, "now")
        await asyncio.gather(*(cancel.cancel_job(s, "-", f"f{i}") for i in range(3000)))
        q = s.buffer("g")
        assert len(q.heap) < 2000  # compacted, not 3001 entries waiting an hour
        [lt] = await lease.lease_tasks(s, "w", 10, "g")
        assert lt.lease.task.job_id == "now"
    run(t)
