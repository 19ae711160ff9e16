"""Concurrency and rate limits (behaviour.md §3), one test per rule, plus a randomized
invariant test: no queue ever over its max, no job running twice, every job ends, no
slot leaks."""

from __future__ import annotations

import contextlib
import random
import uuid

import pytest

from silo.errors import SiloError
from silo.shard import cancel, get_job, lease, limits, outcome, restart
from silo.shard.reaper import reap_expired_leases
from silo.storage.records import (
    FAILED,
    SCHEDULED,
    SUCCEEDED,
    ConcurrencyLimit,
    FloatingConcurrencyLimit,
    RateLimit,
    RateLimitRetryPolicy,
    RetryPolicy,
)
from tests.unit.test_shard import T0, add, run, task_rows


def conc(key: str, n: int) -> ConcurrencyLimit:
    return ConcurrencyLimit(key, n)


def rate(name: str, limit: int, duration_ms: int, max_retries: int = 0,
         algorithm: int = 0) -> RateLimit:
    return RateLimit(name, "u", limit, duration_ms, 1, algorithm, 0,
                     RateLimitRetryPolicy(10, 1000, 2.0, max_retries))


async def ids(s, group="g", n=100, worker="w"):
    return [t for t in await lease.lease_tasks(s, worker, n, group)]


def holders(s, key: str, tenant: str = "-") -> int:
    q = s.conc.get((tenant, key))
    return len(q.holders) if q else 0


def test_concurrency_caps_running_jobs_and_grants_in_order_on_release():
    async def t(s, clock):
        for i in range(4):
            await add(s, f"j{i}", limits=[conc("q", 2)])
        first = await ids(s)
        assert [x.lease.task.job_id for x in first] == ["j0", "j1"]
        assert holders(s, "q") == 2
        await outcome.report_outcome(s, first[0].lease.task.task_id, outcome.Success(b""))
        [nxt] = await ids(s)  # granted at the release, leasable at once
        assert nxt.lease.task.job_id == "j2" and nxt.lease.task.held_queues == ["q"]
        assert await ids(s) == []
    run(t)


def test_queue_is_shared_across_task_groups_but_not_tenants():
    async def t(s, clock):
        await add(s, "a", group="g1", limits=[conc("q", 1)])
        await add(s, "b", group="g2", limits=[conc("q", 1)])
        await add(s, "c", group="g2", tenant="other", limits=[conc("q", 1)])
        assert len(await ids(s, "g1")) == 1
        got = await ids(s, "g2")
        assert [x.lease.task.job_id for x in got] == ["c"]
    run(t)


def test_each_job_uses_its_own_max():
    async def t(s, clock):
        await add(s, "one", limits=[conc("q", 1)])
        await add(s, "three", limits=[conc("q", 3)])
        assert len(await ids(s)) == 2
    run(t)


def test_future_jobs_do_not_hold_slots_early():
    async def t(s, clock):
        await add(s, "future", start_at_ms=T0 + 1000, limits=[conc("q", 1)])
        await add(s, "now", limits=[conc("q", 1)])
        assert [x.lease.task.job_id for x in await ids(s)] == ["now"]
        clock.t += 1000
        assert await ids(s) == []  # its ticket came due, found the queue full, parked
        assert len(s.requests) == 1
    run(t)


def test_failure_releases_and_retry_requeues_behind_waiters():
    async def t(s, clock):
        await add(s, "a", limits=[conc("q", 1)], retry=RetryPolicy(1, 0, 0, False, 1.0))
        await add(s, "b", limits=[conc("q", 1)])
        [ta] = await ids(s)
        await outcome.report_outcome(s, ta.lease.task.task_id, outcome.Failure("E", b""))
        got = await ids(s)
        assert [x.lease.task.job_id for x in got] == ["b"]  # the waiter first
        await outcome.report_outcome(s, got[0].lease.task.task_id, outcome.Success(b""))
        [again] = await ids(s)
        assert again.lease.task.job_id == "a" and again.lease.task.attempt == 2
    run(t)


def test_cancel_of_parked_and_of_slot_holding_jobs():
    async def t(s, clock):
        await add(s, "holder", limits=[conc("q", 1)])
        await add(s, "waiter", limits=[conc("q", 1)])
        await add(s, "waiter2", limits=[conc("q", 1)])
        await cancel.cancel_job(s, "-", "waiter")
        assert (await get_job.get_job(s, "-", "waiter", False)).status.next_attempt_starts_after_ms == T0
        await cancel.cancel_job(s, "-", "holder")  # pending RunAttempt holding the slot
        assert [x.lease.task.job_id for x in await ids(s)] == ["waiter2"]
        assert len(s.requests) == 0
    run(t)


def test_expired_lease_releases_the_slot():
    async def t(s, clock):
        await add(s, "a", limits=[conc("q", 1)])
        await add(s, "b", limits=[conc("q", 1)])
        await ids(s)
        clock.t += 10_000
        assert await reap_expired_leases(s) == 1
        assert [x.lease.task.job_id for x in await ids(s)] == ["b"]
    run(t)


def test_multiple_limits_in_order_hold_earlier_slots_while_waiting():
    async def t(s, clock):
        await add(s, "x", limits=[conc("a", 5), conc("b", 1)])
        await add(s, "y", limits=[conc("a", 5), conc("b", 1)])
        [tx] = await ids(s)
        assert tx.lease.task.held_queues == ["a", "b"]
        assert holders(s, "a") == 2 and holders(s, "b") == 1  # y holds a, waits on b
        await outcome.report_outcome(s, tx.lease.task.task_id, outcome.Success(b""))
        [ty] = await ids(s)
        assert ty.lease.task.job_id == "y" and ty.lease.task.held_queues == ["a", "b"]
        await outcome.report_outcome(s, ty.lease.task.task_id, outcome.Success(b""))
        assert holders(s, "a") == holders(s, "b") == 0
    run(t)


def test_restart_goes_through_the_limits():
    async def t(s, clock):
        await add(s, "a", limits=[conc("q", 1)])
        [ta] = await ids(s)
        await outcome.report_outcome(s, ta.lease.task.task_id, outcome.Failure("E", b""))
        await add(s, "b", limits=[conc("q", 1)])
        [tb] = await ids(s)
        await restart.restart_job(s, "-", "a")
        assert await ids(s) == []  # waits for b's slot
        await outcome.report_outcome(s, tb.lease.task.task_id, outcome.Success(b""))
        assert [x.lease.task.job_id for x in await ids(s)] == ["a"]
    run(t)


def test_drop_tenant_holders_frees_slots_and_grants():
    async def t(s, clock):
        await add(s, "a", limits=[conc("q", 1)])
        await add(s, "b", limits=[conc("q", 1)])
        await ids(s)
        assert limits.drop_tenant_holders(s, "-", clock.t) == 1
        assert [x.lease.task.job_id for x in await ids(s)] == ["b"]
        assert limits.drop_tenant_holders(s, "nobody", clock.t) == 0
    run(t)


def test_lease_task_bypasses_limits_and_frees_held_slots():
    async def t(s, clock):
        await add(s, "a", limits=[conc("q", 1)])
        await add(s, "b", limits=[conc("q", 1)])
        lt = await lease.lease_task(s, "-", "b", "w")  # parked: leased anyway
        assert lt.lease.task.held_queues == []
        assert [x.lease.task.job_id for x in await ids(s)] == ["a"]
    run(t)


def test_rate_limit_token_bucket_waits_for_the_next_window():
    async def t(s, clock):
        for i in range(3):
            await add(s, f"r{i}", limits=[rate("api", 2, 1000)])
        assert len(await ids(s)) == 2
        assert await ids(s) == []
        clock.t += 999
        assert await ids(s) == []
        clock.t += 1
        assert [x.lease.task.job_id for x in await ids(s)] == ["r2"]
    run(t)


def test_rate_limit_exhausted_retries_fail_the_job_rate_limited():
    async def t(s, clock):
        await add(s, "a-ok", limits=[rate("api", 1, 60_000, max_retries=2)])
        await add(s, "b-late", limits=[rate("api", 1, 60_000, max_retries=2)])
        assert len(await ids(s)) == 1
        for _ in range(5):
            clock.t += 1000
            await ids(s)
        v = await get_job.get_job(s, "-", "b-late", True)
        assert v.status.kind == FAILED and v.attempts[0].error_code == "RATE_LIMITED"
    run(t)


def test_rate_limit_leaky_bucket_drains_continuously():
    async def t(s, clock):
        for i in range(3):
            await add(s, f"l{i}", limits=[rate("leak", 2, 1000, algorithm=1)])
        assert len(await ids(s)) == 2
        clock.t += 500  # one unit drained
        assert [x.lease.task.job_id for x in await ids(s)] == ["l2"]
    run(t)


def test_limit_state_survives_reopen(tmp_path):
    url = f"file://{tmp_path}/objects"
    sid = str(uuid.uuid4())

    async def before(s, clock):
        for i in range(3):
            await add(s, f"j{i}", limits=[conc("q", 1), rate("api", 10, 60_000)])
        [t0] = await ids(s)
        return t0.lease.task.task_id

    tid = run(before, url, sid)

    async def after(s, clock):
        assert holders(s, "q") == 1 and len(s.requests) == 2
        await outcome.report_outcome(s, tid, outcome.Success(b""))
        assert [x.lease.task.job_id for x in await ids(s)] == ["j1"]
        assert s.rate_buckets[("api", "u")].value == 8  # two hits remembered
    run(after, url, sid)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_invariants(seed):
    rnd = random.Random(seed)

    async def t(s, clock):
        maxes = {"a": 2, "b": 3, "c": 1}
        jobs = {}
        for i in range(60):
            keys_ = rnd.sample(sorted(maxes), rnd.randint(1, 3))
            jid = f"j{i}"
            jobs[jid] = await add(
                s, jid, limits=[conc(k, maxes[k]) for k in keys_],
                retry=RetryPolicy(2, 0, 0, False, 1.0) if rnd.random() < 0.5 else None,
                start_at_ms=T0 + rnd.choice([0, 0, 0, 500]))
        running: dict[str, object] = {}
        for _step in range(2000):
            for k, m in maxes.items():
                assert holders(s, k) <= m
            live = {lt.lease.task.job_id for lt in running.values()}
            assert len(live) == len(running)  # no job runs twice at once
            act = rnd.random()
            if act < 0.4:
                for lt in await lease.lease_tasks(s, "w", rnd.randint(1, 4), "g"):
                    assert lt.lease.task.job_id not in live
                    running[lt.lease.task.task_id] = lt
            elif act < 0.75 and running:
                tid = rnd.choice(sorted(running))
                running.pop(tid)
                o = rnd.choice([outcome.Success(b""), outcome.Failure("E", b""),
                                outcome.Cancelled()])
                await outcome.report_outcome(s, tid, o)
            elif act < 0.8 and running:
                running.pop(rnd.choice(sorted(running)))  # the worker crashes
                if rnd.random() < 0.5:
                    clock.t += 10_000  # ... and its lease (and maybe others') expires
                    await reap_expired_leases(s)
                    running = {k: v for k, v in running.items() if k in s.leases}
            elif act < 0.85:
                jid = rnd.choice(sorted(jobs))
                with contextlib.suppress(SiloError):
                    await cancel.cancel_job(s, "-", jid)
            else:
                clock.t += rnd.choice([1, 10, 100])
            if not s.active and not s.scheduled_jobs and not running:
                break
        # drain: everything left ends
        for _ in range(500):
            clock.t += 10_000
            await reap_expired_leases(s)
            running = {k: v for k, v in running.items() if k in s.leases}
            for lt in await lease.lease_tasks(s, "w", 50, "g"):
                running[lt.lease.task.task_id] = lt
            for tid in list(running):
                running.pop(tid)
                with contextlib.suppress(SiloError):
                    await cancel.cancel_job(s, "-", s.leases[tid].task.job_id)
                await outcome.report_outcome(s, tid, outcome.Success(b""))
            for jid in list(jobs):
                job = s.active.get(("-", jid))
                if job is None or job.kind == SCHEDULED:  # queued (in storage) or parked
                    with contextlib.suppress(SiloError):
                        await cancel.cancel_job(s, "-", jid)
            if not s.active and not s.scheduled_jobs:
                break
        left = {k: (j.kind, j.task_key, j.request_key, j.task_id) for k, j in s.active.items()}
        assert not left and not s.leases and not s.requests, left
        assert s.scheduled_jobs == 0 and not await task_rows(s)
        for jid in jobs:
            st = (await get_job.get_job(s, "-", jid, False)).status.kind
            assert st in (SUCCEEDED, FAILED, 4)
        assert all(not q.holders for q in s.conc.values())  # no slot leaks
        assert not any(k.startswith(b"\x09") for k, _ in await s.committer.scan_prefix(b"\x09"))

    run(t)


def test_holder_rows_match_memory_after_a_run():
    async def t(s, clock):
        for i in range(5):
            await add(s, f"j{i}", limits=[conc("q", 2)])
        got = await ids(s)
        rows = await s.committer.scan_prefix(b"\x09")
        assert len(rows) == 2 == holders(s, "q")
        for lt in got:
            await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        assert len(await s.committer.scan_prefix(b"\x09")) == 2  # granted to j2, j3
    run(t)


def floating(key: str, default: int, interval: int = 1000) -> FloatingConcurrencyLimit:
    return FloatingConcurrencyLimit(key, default, interval, {"m": "1"})


def split(got):
    jobs = [x for x in got if x.info is not None]
    refresh = [x for x in got if x.info is None]
    return jobs, refresh


def test_floating_limit_state_is_created_by_the_first_job_and_shared():
    async def t(s, clock):
        await add(s, "a", group="g1", limits=[floating("f", 1)])
        await add(s, "b", group="g2", limits=[floating("f", 5)])  # later defaults ignored
        st = s.floating[("-", "f")]
        assert (st.current_max, st.default_max, st.metadata) == (1, 1, {"m": "1"})
        jobs, refresh = split(await ids(s, "g1"))
        assert [x.lease.task.job_id for x in jobs] == ["a"]
        assert refresh == []  # b waits in g2: its refresh task is in g2
        jobs, refresh = split(await ids(s, "g2", n=1))
        assert jobs == [] and len(refresh) == 1  # not counted against max_tasks
        r = refresh[0].lease.task
        assert (r.queue_key, r.current_max_concurrency, r.metadata) == ("f", 1, {"m": "1"})
    run(t)


def test_refresh_success_raises_the_max_and_grants_waiters():
    async def t(s, clock):
        for i in range(4):
            await add(s, f"j{i}", limits=[floating("f", 1)])
        jobs, refresh = split(await ids(s))
        assert len(jobs) == 1 and len(refresh) == 1
        assert s.floating[("-", "f")].refresh_scheduled
        limits.refresh_succeeded(s, refresh[0].lease.task, 3, clock.t)
        jobs, refresh = split(await ids(s))
        assert len(jobs) == 2 and refresh == []
        st = s.floating[("-", "f")]
        assert (st.current_max, st.refresh_scheduled, st.last_refreshed_at_ms) == (3, False, T0)
        with pytest.raises(SiloError, match="new_max_concurrency must be >= 1"):
            limits.refresh_succeeded(s, refresh[0].lease.task if refresh else
                                     jobs[0].lease.task, 0, clock.t)
    run(t)


def test_refresh_failure_backs_off_and_expiry_unschedules():
    async def t(s, clock):
        await add(s, "a", limits=[floating("f", 1)])
        await add(s, "b", limits=[floating("f", 1)])
        _, [r] = split(await ids(s))
        limits.refresh_failed(s, r.lease.task, clock.t)
        st = s.floating[("-", "f")]
        assert (st.retry_count, st.next_retry_at_ms, st.refresh_scheduled) == (1, T0 + 1000, True)
        assert split(await ids(s))[1] == []
        clock.t += 1000
        _, [r2] = split(await ids(s))
        clock.t += 10_000
        assert await reap_expired_leases(s) >= 1
        assert not s.floating[("-", "f")].refresh_scheduled
        assert r2.lease.task.task_id not in s.leases
    run(t)
