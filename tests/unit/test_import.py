"""ImportJobs on a real shard (memory store, fake clock): every rule of behaviour.md §1.2.

Status from the history, attempt rows, validation, re-import matching and refusals,
limits on import, counters; plus the pure policy functions on their own.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from silo.errors import SiloError
from silo.shard import cancel, delete, get_job, import_, lease, outcome, restart
from silo.shard.import_ import ImportedAttempt, ImportJob, decide_status
from silo.storage import keys
from silo.storage.records import (
    ATTEMPT_CANCELLED,
    ATTEMPT_FAILED,
    ATTEMPT_SUCCEEDED,
    CANCELLED,
    FAILED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    ConcurrencyLimit,
    RetryPolicy,
)
from tests.unit.test_shard import T0, add, code, run, task_rows

POLICY = RetryPolicy(3, 1000, 60_000, False, 2.0)


def failed(at: int, code_: str = "E", data: bytes = b"\xa1x") -> ImportedAttempt:
    return ImportedAttempt(ATTEMPT_FAILED, at - 100, at, error_code=code_, error_data=data)


def succeeded(at: int, result: bytes = b"\xa2ok") -> ImportedAttempt:
    return ImportedAttempt(ATTEMPT_SUCCEEDED, at - 100, at, result=result)


def cancelled(at: int) -> ImportedAttempt:
    return ImportedAttempt(ATTEMPT_CANCELLED, at - 100, at)


def job(job_id: str, *attempts: ImportedAttempt, policy: RetryPolicy | None = POLICY,
        start_at_ms: int = 0, enqueue_time_ms: int = T0 - 60_000, limits=None,
        metadata=None, priority: int = 20, group: str = "g") -> ImportJob:
    return ImportJob(job_id, priority, enqueue_time_ms, start_at_ms, policy, b"\x81\xa1k\x01",
                     limits or [], metadata or {}, group, list(attempts))


async def imp(s, *jobs: ImportJob, tenant: str = "-"):
    return await import_.import_jobs(s, tenant, list(jobs))


async def view(s, job_id: str, tenant: str = "-"):
    return await get_job.get_job(s, tenant, job_id, True)


def counts(s, tenant: str = "-") -> dict[str, int]:
    return {name: n for (t, name), n in s.tenant_status.items() if t == tenant and n}


# ---- status from the history -------------------------------------------------------------


def test_no_attempts_is_scheduled_for_attempt_one_and_leasable():
    async def t(s, clock):
        [r] = await imp(s, job("a", metadata={"src": "legacy"}))
        assert (r.job_id, r.success, r.error, r.status) == ("a", True, None, SCHEDULED)
        v = await view(s, "a")
        assert (v.status.kind, v.status.current_attempt) == (SCHEDULED, 1)
        assert v.status.next_attempt_starts_after_ms == T0  # start_at 0 = now
        assert v.info.enqueue_time_ms == T0 - 60_000 and v.info.priority == 20
        assert v.info.metadata == {"src": "legacy"} and v.attempts == []
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert (lt.lease.task.attempt, lt.lease.task.relative_attempt) == (1, 1)
    run(t)


def test_future_start_and_zero_enqueue_time():
    async def t(s, clock):
        await imp(s, job("a", start_at_ms=T0 + 5000, enqueue_time_ms=0))
        v = await view(s, "a")
        assert v.info.enqueue_time_ms == T0 and v.status.next_attempt_starts_after_ms == T0 + 5000
        assert await lease.lease_tasks(s, "w", 5, "g") == []
        clock.t += 5000
        assert len(await lease.lease_tasks(s, "w", 5, "g")) == 1
    run(t)


def test_succeeded_attempt_makes_a_succeeded_job_with_its_result():
    async def t(s, clock):
        [r] = await imp(s, job("a", succeeded(T0 - 40_000)))
        assert r.status == SUCCEEDED
        v = await view(s, "a")
        assert v.status.kind == SUCCEEDED and v.status.changed_at_ms == T0 - 40_000
        assert v.result == b"\xa2ok"
        [a] = v.attempts
        assert (a.attempt, a.relative_attempt, a.status, a.started_at_ms, a.finished_at_ms) == (
            1, 1, ATTEMPT_SUCCEEDED, T0 - 40_100, T0 - 40_000)
        res = await get_job.get_job_result(s, "-", "a")
        assert (res.status, res.result, res.finished_at_ms) == (SUCCEEDED, b"\xa2ok", T0 - 40_000)
        assert await lease.lease_tasks(s, "w", 5, "g") == []
    run(t)


def test_cancelled_last_attempt_is_cancelled_without_a_cancel_flag():
    async def t(s, clock):
        [r] = await imp(s, job("a", failed(T0 - 9), cancelled(T0 - 5)))
        assert r.status == CANCELLED
        v = await view(s, "a")
        assert v.status.kind == CANCELLED and v.status.changed_at_ms == T0 - 5
        assert await s.committer.get(keys.cancellation("-", "a")) is None
        assert [a.status for a in v.attempts] == [ATTEMPT_FAILED, ATTEMPT_CANCELLED]
    run(t)


def test_failed_with_retries_left_is_scheduled_for_the_next_attempt():
    async def t(s, clock):
        [r] = await imp(s, job("a", failed(T0 - 90_000, "TIMEOUT"), failed(T0 - 70_000)))
        assert r.status == SCHEDULED
        v = await view(s, "a")
        assert (v.status.current_attempt, v.status.last_attempt) == (3, 2)
        assert v.attempts[0].error_code == "TIMEOUT" and v.attempts[0].error_data == b"\xa1x"
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert (lt.lease.task.attempt, lt.lease.task.relative_attempt) == (3, 3)
    run(t)


def test_failed_with_retries_spent_or_no_policy_is_failed():
    async def t(s, clock):
        four = [failed(T0 - 10 * i) for i in (4, 3, 2, 1)]  # retry_count 3: 4 failures spend it
        r = await imp(s, job("spent", *four), job("nopolicy", failed(T0 - 3), policy=None))
        assert [x.status for x in r] == [FAILED, FAILED]
        v = await view(s, "spent")
        assert v.status.changed_at_ms == T0 - 10 and v.status.last_attempt == 4
        assert await lease.lease_tasks(s, "w", 5, "g") == []
        res = await get_job.get_job_result(s, "-", "nopolicy")
        assert (res.status, res.error_code) == (FAILED, "E")
    run(t)


def test_imported_retry_continues_the_budget_until_it_is_spent():
    async def t(s, clock):
        policy = RetryPolicy(2, 10, 10, False, 1.0)
        await imp(s, job("a", failed(T0 - 20), failed(T0 - 10), policy=policy))
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert lt.lease.task.attempt == 3
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        v = await view(s, "a")  # relative attempt 3 > retry_count 2: no more retries
        assert v.status.kind == FAILED and len(v.attempts) == 3
    run(t)


@given(st.lists(st.sampled_from([ATTEMPT_FAILED]), max_size=6),
       st.sampled_from([None, ATTEMPT_SUCCEEDED, ATTEMPT_CANCELLED, ATTEMPT_FAILED]),
       st.none() | st.integers(0, 6))
def test_decide_status_arithmetic(prefix, last, retry_count):
    attempts = [ImportedAttempt(x, 1, 2) for x in prefix]
    if last is not None:
        attempts.append(ImportedAttempt(last, 3, 4))
    policy = None if retry_count is None else RetryPolicy(retry_count, 1, 1, False, 1.0)
    st_ = decide_status(attempts, policy, now=100, start_ms=200)
    n, nfailed = len(attempts), sum(a.status == ATTEMPT_FAILED for a in attempts)
    if n == 0:
        assert (st_.kind, st_.current_attempt, st_.next_attempt_starts_after_ms) == (
            SCHEDULED, 1, 200)
    elif last == ATTEMPT_SUCCEEDED:
        assert (st_.kind, st_.changed_at_ms) == (SUCCEEDED, 4)
    elif last == ATTEMPT_CANCELLED:
        assert st_.kind == CANCELLED
    elif retry_count is None or nfailed > retry_count:
        assert (st_.kind, st_.changed_at_ms, st_.last_attempt) == (FAILED, attempts[-1][2], n)
    else:
        assert (st_.kind, st_.current_attempt, st_.changed_at_ms) == (SCHEDULED, n + 1, 100)


# ---- validation: per-job results, nothing written -----------------------------------------


@pytest.mark.parametrize(("attempts", "msg"), [
    ([ImportedAttempt(0, 1, 2)], "import attempts must be terminal (not Running)"),
    ([ImportedAttempt(ATTEMPT_SUCCEEDED, 1, 2), failed(5)],
     "import attempt 1 must be Failed (only the last attempt may be non-Failed)"),
    ([cancelled(3), succeeded(5)], "import attempt 1 must be Failed"),
])
def test_bad_history_is_a_per_job_error(attempts, msg):
    async def t(s, clock):
        r = await imp(s, job("bad", *attempts), job("good"))
        assert (r[0].success, r[0].status) == (False, FAILED) and msg in r[0].error
        assert r[1].success and r[1].job_id == "good"
        with pytest.raises(SiloError):
            await view(s, "bad")
        assert (s.total_jobs, s.completed_jobs) == (1, 0)
    run(t)


def test_empty_id_is_a_per_job_error():
    async def t(s, clock):
        [r] = await imp(s, job(""))
        assert not r.success and r.error == "job id is required for import"
        assert s.total_jobs == 0
    run(t)


def test_batch_results_in_request_order_with_partial_failure():
    async def t(s, clock):
        r = await imp(s, job("j1"), job("j2", succeeded(T0 - 1)), job("j3", cancelled(1),
                                                                      failed(2)), job("j4"))
        assert [(x.job_id, x.success, x.status) for x in r] == [
            ("j1", True, SCHEDULED), ("j2", True, SUCCEEDED), ("j3", False, FAILED),
            ("j4", True, SCHEDULED)]
    run(t)


# ---- limits and counters ------------------------------------------------------------------


def test_non_terminal_import_goes_through_the_concurrency_limit():
    async def t(s, clock):
        lim = [ConcurrencyLimit("q", 1)]
        await imp(s, job("a", limits=lim), job("b", limits=lim), job("done", succeeded(1),
                                                                     limits=lim))
        assert len(s.conc[("-", "q")].holders) == 1 and len(s.requests) == 1
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert lt.lease.task.job_id == "a" and lt.lease.task.held_queues == ["q"]
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        [lt] = await lease.lease_tasks(s, "w", 5, "g")  # b was granted the released slot
        assert lt.lease.task.job_id == "b"
    run(t)


def test_counters_for_every_imported_status():
    async def t(s, clock):
        await imp(s, job("s"), job("ok", succeeded(1)), job("f", failed(1), policy=None),
                  job("c", cancelled(1)), job("r", failed(1)))
        assert (s.total_jobs, s.completed_jobs) == (5, 3)
        assert counts(s) == {"Scheduled": 2, "Succeeded": 1, "Failed": 1, "Cancelled": 1}
        await imp(s, job("other", succeeded(1)), tenant="t2")
        assert counts(s, "t2") == {"Succeeded": 1} and counts(s)["Succeeded"] == 1
    run(t)


def test_imported_jobs_cancel_restart_and_delete_like_any_other():
    async def t(s, clock):
        await imp(s, job("sched"), job("f", failed(1), policy=None), job("ok", succeeded(1)))
        await cancel.cancel_job(s, "-", "sched")
        await restart.restart_job(s, "-", "f")
        v = await view(s, "f")
        assert v.status.kind == SCHEDULED and v.status.current_attempt == 2
        await delete.delete_job(s, "-", "ok")
        assert (s.total_jobs, s.completed_jobs) == (2, 1)
        assert counts(s) == {"Cancelled": 1, "Scheduled": 1}
    run(t)


# ---- re-import ----------------------------------------------------------------------------


def test_reimport_adds_attempts_and_recomputes_the_status():
    async def t(s, clock):
        await imp(s, job("a", policy=None))
        assert len(await task_rows(s)) == 1
        [r] = await imp(s, job("a", failed(T0 - 5), policy=None))
        assert (r.success, r.status) == (True, FAILED)
        assert await task_rows(s) == [] and ("-", "a") not in s.active and s.scheduled_jobs == 0
        assert (s.total_jobs, s.completed_jobs) == (1, 1) and counts(s) == {"Failed": 1}
    run(t)


def test_reimport_scheduled_to_scheduled_replaces_the_pending_task():
    async def t(s, clock):
        await imp(s, job("a", failed(T0 - 9)))
        [r] = await imp(s, job("a", failed(T0 - 9), failed(T0 - 5)))
        assert r.status == SCHEDULED and len(await task_rows(s)) == 1
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert lt.lease.task.attempt == 3
        assert counts(s) == {"Running": 1}
    run(t)


def test_reimport_of_a_failed_job_with_a_new_policy_schedules_it():
    async def t(s, clock):
        await imp(s, job("a", failed(T0 - 9), policy=None))
        [r] = await imp(s, job("a", failed(T0 - 9), failed(T0 - 5)))
        assert r.status == SCHEDULED
        v = await view(s, "a")
        assert v.info.retry_policy == POLICY and v.info.priority == 20
        assert (s.total_jobs, s.completed_jobs) == (1, 0)
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
        assert (await view(s, "a")).status.kind == SCHEDULED  # the new policy decides
    run(t)


def test_reimport_keeps_every_field_but_the_retry_policy():
    async def t(s, clock):
        await imp(s, job("a", policy=None, priority=7, metadata={"k": "v"}))
        other = ImportJob("a", 90, 5, 0, POLICY, b"new", [], {"x": "y"}, "h", [failed(1)])
        [r] = await imp(s, other)
        assert r.success
        v = await view(s, "a")
        assert (v.info.priority, v.info.payload, v.info.metadata, v.info.task_group) == (
            7, b"\x81\xa1k\x01", {"k": "v"}, "g")
        assert v.info.retry_policy == POLICY
    run(t)


def test_reimport_of_a_job_processed_here_matches_its_stored_attempts():
    async def t(s, clock):
        await imp(s, job("a"))
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        clock.t += 7
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b"\xa1x"))
        mine = ImportedAttempt(ATTEMPT_FAILED, T0, T0 + 7, error_code="E", error_data=b"\xa1x")
        [r] = await imp(s, job("a", mine, succeeded(T0 + 9)))
        assert (r.success, r.status) == (True, SUCCEEDED)
        v = await view(s, "a")
        assert [a.status for a in v.attempts] == [ATTEMPT_FAILED, ATTEMPT_SUCCEEDED]
        assert await task_rows(s) == [] and counts(s) == {"Succeeded": 1}
    run(t)


def test_reimport_refusals():
    async def t(s, clock):
        await imp(s, job("ok", succeeded(5)), job("f", failed(5), failed(6), policy=None))
        cases = [
            (job("ok", succeeded(5), succeeded(9)), "job already succeeded (status: Succeeded)"),
            (job("f", failed(5), policy=None), "reimport has 1 attempts but job has 2"),
            (job("f", failed(5), failed(6, data=b"other"), failed(7)),
             "existing attempt 2 does not match reimport data"),
            (job("f", failed(5), succeeded(6), failed(7)),
             "existing attempt 2 does not match reimport data"),
            (job("f", failed(5), failed(6)), "reimport must include at least one new attempt"),
            (job("f", failed(5), failed(6), succeeded(7), failed(8)),
             "import attempt 1 must be Failed"),
        ]
        for j, msg in cases:
            [r] = await imp(s, j)
            assert not r.success and r.status == FAILED and msg in r.error, (msg, r.error)
            assert r.error.startswith(f"cannot reimport job {j.id}:") or "import attempt" in msg
        assert (s.total_jobs, s.completed_jobs) == (2, 2)
        assert counts(s) == {"Succeeded": 1, "Failed": 1}
        assert len((await view(s, "f")).attempts) == 2
    run(t)


def test_reimport_of_a_running_job_fails_the_whole_call():
    async def t(s, clock):
        await imp(s, job("run"))
        await lease.lease_tasks(s, "w", 5, "g")
        with pytest.raises(SiloError, match="cannot reimport job run: job is currently running "
                                            r"\(status: Running\)") as e:
            await imp(s, job("new"), job("run", failed(1)))
        assert code(e) == "FAILED_PRECONDITION"
        with pytest.raises(SiloError):
            await view(s, "new")  # nothing of the call was imported
        assert counts(s) == {"Running": 1}
    run(t)


def test_reimport_releases_held_slots_and_clears_the_cancel_flag():
    async def t(s, clock):
        lim = [ConcurrencyLimit("q", 1)]
        await add(s, "holder", limits=lim)  # holds the only slot, not leased yet
        await add(s, "waiter", limits=lim)
        assert len(s.requests) == 1
        await imp(s, job("holder", succeeded(T0)))  # an enqueued job has no attempts yet
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert lt.lease.task.job_id == "waiter"
        await add(s, "c")
        await cancel.cancel_job(s, "-", "c")
        assert await s.committer.get(keys.cancellation("-", "c")) is not None
        [r] = await imp(s, job("c", failed(T0)))
        assert r.status == SCHEDULED
        assert await s.committer.get(keys.cancellation("-", "c")) is None
        assert counts(s) == {"Succeeded": 1, "Running": 1, "Scheduled": 1}
        assert s.completed_jobs == 1
    run(t)


def test_running_stored_attempt_is_not_a_match_but_a_refusal():
    async def t(s, clock):
        await add(s, "a")
        [lt] = await lease.lease_tasks(s, "w", 5, "g")
        assert lt.lease.task.job_id == "a"
        v = await view(s, "a")
        assert v.status.kind == RUNNING
        with pytest.raises(SiloError, match="currently running"):
            await imp(s, job("a", failed(1)))
    run(t)
