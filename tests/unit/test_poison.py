"""Poison jobs (issue 14 item 1): numbers the limit and retry math cannot take are
refused at Enqueue, and jobs stored with them before that (validation bypassed here)
can never wedge LeaseTasks, a grant loop or GetJob."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silo.errors import SiloError
from silo.rpc import convert
from silo.shard import enqueue, get_job, lease, limits, outcome, pending, ratelimit
from silo.shard.validate import MAX_INTERVAL_MS, MAX_TIME_MS, validate_job_fields
from silo.storage.records import (
    FAILED,
    RUNNING,
    SCHEDULED,
    ConcurrencyLimit,
    RateLimit,
    RateLimitRetryPolicy,
    RateLimitState,
    RetryPolicy,
)
from tests.unit.test_shard import add, run, task_rows


def rate(name="api", limit=1, duration_ms=60_000, *, initial=100, max_backoff=30_000,
         mult=2.0, max_retries=0, hits=1) -> RateLimit:
    return RateLimit(name, "u", limit, duration_ms, hits, 0, 0,
                     RateLimitRetryPolicy(initial, max_backoff, mult, max_retries))


def retry(**kw) -> RetryPolicy:
    base = dict(retry_count=3, initial_interval_ms=1000, max_interval_ms=60_000,
                randomize_interval=False, backoff_factor=2.0)
    base.update(kw)
    return RetryPolicy(**base)


def check(**kw) -> None:
    args = dict(job_id="j", priority=50, task_group="g", metadata={}, limits=[],
                retry_policy=None, start_at_ms=0)
    args.update(kw)
    validate_job_fields(**args)


# ---- validation at Enqueue ---------------------------------------------------------


@pytest.mark.parametrize("mult", [math.nan, math.inf, -math.inf, 1e308, -1.0])
def test_bad_rate_limit_multiplier_is_invalid_argument_naming_the_field(mult):
    async def t(s, clock):
        with pytest.raises(SiloError) as e:
            await add(s, "p", limits=[rate(mult=mult)])
        assert e.value.code.name == "INVALID_ARGUMENT"
        assert "limits[0].rate_limit.retry_policy.backoff_multiplier" in e.value.message
        assert s.active == {} and await task_rows(s) == []  # nothing changed
    run(t)


@pytest.mark.parametrize("field,value", [
    ("initial_interval_ms", 2**62), ("initial_interval_ms", 2**63 - 1),
    ("max_interval_ms", 2**63 - 1), ("initial_interval_ms", -1),
    ("max_interval_ms", MAX_INTERVAL_MS + 1),
    ("backoff_factor", math.nan), ("backoff_factor", math.inf), ("backoff_factor", 1e308),
])
def test_huge_or_bad_retry_policy_is_invalid_argument_naming_the_field(field, value):
    async def t(s, clock):
        with pytest.raises(SiloError) as e:
            await add(s, "p", retry=retry(**{field: value}))
        assert e.value.code.name == "INVALID_ARGUMENT"
        assert f"retry_policy.{field}" in e.value.message
    run(t)


@pytest.mark.parametrize("kw,field", [
    (dict(priority=100), "priority"),
    (dict(start_at_ms=MAX_TIME_MS + 1), "start_at_ms"),
    (dict(limits=[rate(limit=2**62)]), "rate_limit.limit"),
    (dict(limits=[rate(duration_ms=2**62)]), "rate_limit.duration_ms"),
    (dict(limits=[rate(hits=-1)]), "rate_limit.hits"),
    (dict(limits=[rate(initial=-5)]), "initial_backoff_ms"),
    (dict(limits=[rate(max_backoff=2**63 - 1)]), "max_backoff_ms"),
    (dict(limits=[rate(name="n" * 2000)]), "rate_limit.name"),
    (dict(limits=[ConcurrencyLimit("k" * 2000, 1)]), "concurrency.key"),
    (dict(limits=[ConcurrencyLimit("k", 1)] * 65), "too many limits"),
    (dict(job_id="x" * 129), "job id"),
    (dict(task_group="g" * 65), "task_group"),
])
def test_other_bounds(kw, field):
    with pytest.raises(SiloError) as e:
        check(**kw)
    assert e.value.code.name == "INVALID_ARGUMENT" and field in e.value.message
    assert len(e.value.message) < 300  # never echoes the long value


def test_values_clients_send_stay_accepted():
    check()
    check(priority=0, start_at_ms=-5, retry_policy=retry(backoff_factor=0.0, max_interval_ms=0))
    check(retry_policy=retry(backoff_factor=0.5, initial_interval_ms=0))
    check(retry_policy=retry(retry_count=2**32 - 1, max_interval_ms=365 * 86_400_000))
    check(limits=[rate(mult=0.0, initial=0, max_backoff=0, hits=0), rate(limit=10**12),
                  ConcurrencyLimit("", 2**32 - 1)])
    check(job_id="", metadata={"k": "v"})


# ---- stored poison (validation bypassed) -----------------------------------------


@pytest.fixture
def unvalidated(monkeypatch):
    """Enqueue as before this fix: no bounds on numbers."""
    monkeypatch.setattr(enqueue, "validate_job", lambda *a, **k: None)


@pytest.mark.parametrize("mult", [math.nan, 1e308, math.inf])
def test_poison_rate_limit_does_not_wedge_lease_tasks(unvalidated, mult):
    async def t(s, clock):
        # a-first takes the only token of a 10-minute window; p-poison re-checks every
        # <= 1 s with a multiplier the back-off math used to raise on.
        await add(s, "a-first", limits=[rate(duration_ms=600_000)])
        await add(s, "p-poison", limits=[rate(duration_ms=600_000, max_backoff=1000,
                                              mult=mult)])
        [first] = await lease.lease_tasks(s, "w", 10, "g")
        assert first.lease.task.job_id == "a-first"
        # Others due at the same moments as the poison job's re-checks, behind it in order.
        for i in range(3):
            clock.t += 1000
            await add(s, f"z{i}", start_at_ms=clock.t, priority=60)
            got = await lease.lease_tasks(s, "w", 10, "g")
            assert [x.lease.task.job_id for x in got] == [f"z{i}"]
            v = await get_job.get_job(s, "-", "p-poison", True)
            job, _ = await pending.load(s, "-", "p-poison")
            assert v.status.kind == SCHEDULED and job is not None and job.task_key
            convert.job_to_pb(v)
        # Once the window resets, the poison job is admitted like any other.
        clock.t += 600_000
        got = await lease.lease_tasks(s, "w", 10, "g")
        assert [x.lease.task.job_id for x in got] == ["p-poison"]
    run(t)


def test_huge_stored_retry_intervals_keep_get_job_working(unvalidated):
    async def t(s, clock):
        await add(s, "p", retry=retry(initial_interval_ms=2**62, max_interval_ms=2**63 - 1))
        [x] = await lease.lease_tasks(s, "w", 10, "g")
        await outcome.report_outcome(s, x.lease.task.task_id, outcome.Failure("E", b""))
        v = await get_job.get_job(s, "-", "p", True)
        assert v.status.kind == SCHEDULED
        assert clock.t < v.status.next_attempt_starts_after_ms <= MAX_TIME_MS
        m = convert.job_to_pb(v)
        assert m.next_attempt_starts_after_ms == v.status.next_attempt_starts_after_ms
    run(t)


def test_get_job_of_a_record_already_stored_past_int64():
    async def t(s, clock):
        await add(s, "p")
        v = await get_job.get_job(s, "-", "p", False)
        v.status.next_attempt_starts_after_ms = 2**64 - 1  # what the old math could store
        assert convert.job_to_pb(v).next_attempt_starts_after_ms == 2**63 - 1
    run(t)


def test_a_chain_step_that_raises_fails_only_its_own_job(monkeypatch):
    real = ratelimit.check

    def boom(state, **kw):
        if kw["limit"] == 7:
            raise ArithmeticError("poison")
        return real(state, **kw)

    monkeypatch.setattr(ratelimit, "check", boom)

    async def t(s, clock):
        await add(s, "a-poison", limits=[ConcurrencyLimit("q", 1), rate(limit=7)])
        await add(s, "b-waiter", limits=[ConcurrencyLimit("q", 1)])
        for i in range(3):
            await add(s, f"c{i}")
        got = await lease.lease_tasks(s, "w", 10, "g")
        # The poison job's slot on q was given back and granted to b in the same call.
        assert sorted(x.lease.task.job_id for x in got) == ["b-waiter", "c0", "c1", "c2"]
        v = await get_job.get_job(s, "-", "a-poison", True)
        assert v.status.kind == FAILED
        assert v.attempts[-1].error_code == limits.BROKEN_CHAIN
        convert.job_to_pb(v)
        assert ("-", "a-poison") not in s.active
        for x in got:
            assert s.active[("-", x.lease.task.job_id)].kind == RUNNING
        assert s.tenant_status.get(("-", "Failed")) == 1
    run(t)


def test_a_waiter_that_raises_when_granted_does_not_stop_the_grant_loop(monkeypatch):
    real = limits.walk

    def walk(shard, job, chain, index, now, join_queue=False):
        if chain.job_id == "w1-poison":
            shard.committer.put(b"\xffhalf-done", b"")  # a step that fails midway
            raise ValueError("poison")
        return real(shard, job, chain, index, now, join_queue)

    async def t(s, clock):
        await add(s, "h", limits=[ConcurrencyLimit("q", 1)])
        await add(s, "w1-poison", limits=[ConcurrencyLimit("q", 1)])
        await add(s, "w2", limits=[ConcurrencyLimit("q", 1)])
        [h] = await lease.lease_tasks(s, "w", 10, "g")
        monkeypatch.setattr(limits, "walk", walk)
        await outcome.report_outcome(s, h.lease.task.task_id, outcome.Success(b""))
        monkeypatch.setattr(limits, "walk", real)
        [w2] = await lease.lease_tasks(s, "w", 10, "g")
        assert w2.lease.task.job_id == "w2"
        assert s.conc[("-", "q")].holders == {w2.lease.task.task_id}
        v = await get_job.get_job(s, "-", "w1-poison", True)
        assert v.status.kind == FAILED
    run(t)


_F = st.floats(allow_nan=True, allow_infinity=True)
_I = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=300)
@given(_I, _I, _F, st.integers(0, 2**32), _I, _I, st.integers(-(2**31), 2**31 - 1),
       st.integers(0, 3), st.none() | st.tuples(_F, _I, _I))
def test_rate_limit_math_is_total(initial, max_backoff, mult, n, limit, duration, hits,
                                  algorithm, state):
    """Whatever a stored limit holds, the limiter answers with valid times, never raises."""
    now = 1_700_000_000_000
    st_ = RateLimitState(*state) if state is not None else None
    d = ratelimit.check(st_, limit=limit, duration_ms=duration, hits=hits,
                        algorithm=algorithm, now=now)
    assert 0 <= d.reset_ms <= MAX_TIME_MS
    policy = RateLimitRetryPolicy(initial, max_backoff, mult, n)
    assert 0 <= ratelimit.backoff_ms(policy, n) <= MAX_INTERVAL_MS
    at = ratelimit.next_check_ms(policy, n, d.reset_ms, now)
    assert now < at <= MAX_TIME_MS


def test_a_huge_worker_id_is_refused_before_anything_is_leased():
    async def t(s, clock):
        await add(s, "a")
        for call in (lambda: lease.lease_tasks(s, "w" * 5000, 10, "g"),
                     lambda: lease.lease_task(s, "-", "a", "w" * 5000)):
            with pytest.raises(SiloError) as e:
                await call()
            assert e.value.code.name == "INVALID_ARGUMENT" and "worker_id" in e.value.message
        assert s.leases == {}
        assert len(await lease.lease_tasks(s, "w" * 1024, 10, "g")) == 1
    run(t)


def test_negative_infinite_back_off_saturates_to_zero():
    # Found by the property above: -846575 × 2e302 = -inf.
    p = RateLimitRetryPolicy(-846575, 0, 2.1234895134658075e302, 1)
    assert ratelimit.backoff_ms(p, 1) == 0
    assert ratelimit.next_check_ms(p, 1, 0, 1000) == 1001
