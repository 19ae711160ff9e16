"""Model-based stateful test of one shard's job state machine (hypothesis).

The example tests (test_shard.py) check one rule each; this one runs random sequences of
every operation on a real Shard (real SlateDB in a local directory, a fake clock, so
back-off and lease expiry are exact) against the pure model in shard_model.py, and after
every step checks what must hold whatever the sequence:

* GetJob of every job says what the model says (status, attempt numbers, next start,
  attempts listed), and a deleted job is not found;
* the counters are exact: Shard.tenant_status, total/completed jobs and the task-group
  depth in memory, and the same figures in their rows on disk (layout 4 keeps one row
  per tenant, and an open restores leases only for tenants whose Running count is above
  zero, so a count off by one loses leases at the next open);
* the status index (0x03) has exactly one row per job, under its status;
* every Scheduled job has exactly one pending step (a task row or a parked request),
  no other job has one;
* leases: the shard's RunAttempt leases are exactly the model's Running jobs, with the
  expiry the model expects; no task is leased twice;
* concurrency: a key with max N has at most N holders, holders are exactly the live
  attempts holding a slot, and no waiter is parked while a slot is free;
* close and reopen change none of the above.

Bounded for a loaded 2-core box: a few dozen short examples (the module takes well under
60 s); no database, no deadline, so a slow commit never fails it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from silo.errors import SiloError
from silo.shard import (
    cancel,
    delete,
    enqueue,
    expedite,
    get_job,
    give_back,
    lease,
    outcome,
    restart,
)
from silo.shard.counters import NAMES
from silo.shard.depth import COUNTER_PREFIX
from silo.shard.reaper import reap_expired_leases
from silo.shard.state import Shard, ShardConfig
from silo.storage import keys
from silo.storage.records import (
    CANCELLED,
    FAILED,
    RUNNING,
    SCHEDULED,
    STATUS_NAMES,
    SUCCEEDED,
    TERMINAL,
    ConcurrencyLimit,
    RetryPolicy,
    RunAttempt,
    decode_i64,
    request_decoder,
    task_decoder,
)
from tests.unit.shard_model import KEY_MAX, MJob, Model

T0 = 1_700_000_000_000
LEASE_MS = 1000
TENANTS = ["-", "t1"]
GROUPS = ["g", "h"]
JOB_IDS = ["j1", "j2", "j3"]
WORKERS = ["w1", "w2"]
POLICIES = [None, RetryPolicy(0, 0, 0, False, 1.0), RetryPolicy(2, 0, 0, False, 1.0),
            RetryPolicy(2, 300, 5000, False, 2.0)]
KEYS = [None, "k1", "k2"]
START_OFFSETS = [0, -100, 500, 3000]  # 0: start_at_ms unset (now)
STEPS = [1, 300, LEASE_MS, LEASE_MS + 1, 4000]


# Operations worth racing, by the status of the job they are drawn for.
_RACES = {
    SCHEDULED: ["cancel", "expedite", "lease_named", "lease_tasks", "delete", "restart"],
    RUNNING: ["success", "failure", "cancelled", "heartbeat", "give_back", "cancel",
              "reap", "lease_tasks"],
    SUCCEEDED: ["restart", "delete", "cancel"],
    FAILED: ["restart", "delete", "cancel", "lease_named"],
    CANCELLED: ["restart", "delete", "cancel", "expedite"],
}


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


class ShardMachine(RuleBasedStateMachine):
    """One shard and its model; every rule is one operation, applied to both."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="shard-model-")
        self.url = Path(self.dir).as_uri()
        self.sid = str(uuid.uuid4())
        self.clock = Clock()
        self.model = Model(LEASE_MS)
        self.shard: Shard | None = None
        self.cfg = ShardConfig()
        self.ended_tasks: list[str] = []  # task ids of leases that ended (stale reports)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def expect_error(self, code: str, coro) -> None:
        with pytest.raises(SiloError) as e:
            self.run(coro)
        assert e.value.code.name == code, (code, e.value)

    @property
    def s(self) -> Shard:
        assert self.shard is not None
        return self.shard

    @property
    def now(self) -> int:
        return self.clock.t

    @initialize(buffer=st.sampled_from([3, 4096]))
    def open_shard(self, buffer: int) -> None:
        """A tiny ready buffer in some examples, so refills and the buffer's bound are
        exercised (ready_buffer_size is a config option)."""
        self.cfg = ShardConfig(commit_interval_ms=0, flush_interval_ms=1, lease_ms=LEASE_MS,
                               ready_buffer_size=buffer)
        self.shard = self.run(Shard.open(self.sid, "", "", self.url, self.cfg, self.clock))

    def teardown(self) -> None:
        try:
            if self.shard is not None:
                self.run(self.shard.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- picking jobs --------------------------------------------------------------

    def pick(self, data, running: bool = False) -> MJob:
        jobs = self.model.running() if running else list(self.model.jobs.values())
        return data.draw(st.sampled_from(sorted(jobs, key=lambda j: j.ref)), label="job")

    def has_running(self) -> bool:
        return bool(self.model.running())

    def has_jobs(self) -> bool:
        return bool(self.model.jobs)

    # ---- rules ---------------------------------------------------------------------

    @rule(tenant=st.sampled_from(TENANTS), job_id=st.sampled_from([""] * 3 + JOB_IDS),
          group=st.sampled_from(GROUPS), priority=st.sampled_from([0, 50, 99]),
          offset=st.sampled_from(START_OFFSETS), policy=st.sampled_from(POLICIES),
          key=st.sampled_from(KEYS))
    def enqueue_job(self, tenant, job_id, group, priority, offset, policy, key) -> None:
        limits = [ConcurrencyLimit(key, KEY_MAX[key])] if key else []
        call = enqueue.enqueue(
            self.s, tenant=tenant, job_id=job_id, priority=priority,
            start_at_ms=self.now + offset if offset else 0, retry_policy=policy,
            payload=b"\x80", limits=limits, metadata={"m": "v"}, task_group=group)
        if job_id and (tenant, job_id) in self.model.jobs:
            self.expect_error("ALREADY_EXISTS", call)
            return
        new_id = self.run(call)
        assert not job_id or new_id == job_id
        self.model.enqueue(MJob(tenant, new_id, group, priority,
                                self.now + offset if offset else 0, policy, key), self.now)

    def _take(self, got: list[lease.LeasedTask], group: str | None, worker: str) -> None:
        """Check leases the shard handed out and record them in the model."""
        running = {j.task_id for j in self.model.running()}
        for lt in got:
            task = lt.lease.task
            assert isinstance(task, RunAttempt) and lt.info is not None
            job = self.model.jobs[(task.tenant, task.job_id)]
            assert job.status == SCHEDULED, ("leased a job that is not Scheduled", job)
            assert job.start_ms <= self.now, ("leased before its start", job)
            assert group is None or job.group == group
            assert task.task_id not in running, ("task leased twice", task)
            assert (task.attempt, task.relative_attempt) == (job.ended + 1, job.relative)
            assert list(task.held_queues) == ([job.key] if job.key else []), task
            assert lt.lease.expiry_ms == self.now + LEASE_MS
            running.add(task.task_id)
            self.model.start(job, task.task_id, worker, self.now, holds=bool(job.key))

    @rule(group=st.sampled_from(GROUPS), n=st.sampled_from([1, 2, 10]),
          worker=st.sampled_from(WORKERS))
    def lease_tasks(self, group: str, n: int, worker: str) -> None:
        got = self.run(lease.lease_tasks(self.s, worker, n, group))
        assert len(got) <= n
        self._take(got, group, worker)

    @rule(group=st.sampled_from(GROUPS))
    def drain(self, group: str) -> None:
        """Lease until nothing comes: then no due job may be left that a worker could run
        (a due job with a limit may wait only while its key's slots are all held)."""
        for _ in range(20):
            got = self.run(lease.lease_tasks(self.s, "w1", 10, group))
            self._take(got, group, "w1")
            if not got:
                break
        for job in self.model.due(group, self.now):
            assert job.key is not None, ("due job not leased", job)
            q = self.s.conc.get((job.tenant, job.key))
            assert q is not None and len(q.holders) >= KEY_MAX[job.key], (
                "due job waits while a slot is free", job)

    @precondition(has_jobs)
    @rule(data=st.data(), worker=st.sampled_from(WORKERS))
    def lease_named(self, data, worker: str) -> None:
        job = self.pick(data)
        call = lease.lease_task(self.s, job.tenant, job.job_id, worker)
        if job.status != SCHEDULED:
            self.expect_error("FAILED_PRECONDITION", call)
            return
        lt = self.run(call)
        task = lt.lease.task
        assert isinstance(task, RunAttempt) and not task.held_queues
        assert task.attempt == job.ended + 1
        # Upstream quirk (lease.py): a named lease's relative number is the absolute one.
        assert task.relative_attempt == task.attempt
        job.relative = task.attempt
        self.model.start(job, task.task_id, worker, self.now, holds=False)

    @precondition(has_running)
    @rule(data=st.data(), kind=st.sampled_from(["success", "failure", "cancelled"]))
    def report(self, data, kind: str) -> None:
        job = self.pick(data, running=True)
        out = {"success": outcome.Success(b"\xa2ok"), "failure": outcome.Failure("E", b""),
               "cancelled": outcome.Cancelled()}[kind]
        assert job.task_id is not None
        self.run(outcome.report_outcome(self.s, job.task_id, out))
        self.ended_tasks.append(job.task_id)
        self.model.end(job, kind, self.now)

    @precondition(lambda self: bool(self.ended_tasks))
    @rule(data=st.data())
    def report_stale(self, data) -> None:
        """An outcome for a lease that already ended changes nothing."""
        task_id = data.draw(st.sampled_from(self.ended_tasks))
        if any(j.task_id == task_id for j in self.model.running()):
            return  # given back and leased again under the same task id
        self.expect_error("NOT_FOUND", outcome.report_outcome(
            self.s, task_id, outcome.Success(b"")))

    @precondition(has_running)
    @rule(data=st.data(), right_worker=st.booleans())
    def heartbeat(self, data, right_worker: bool) -> None:
        job = self.pick(data, running=True)
        worker = job.worker if right_worker else job.worker + "-other"
        assert job.task_id is not None
        call = outcome.heartbeat(self.s, worker, job.task_id)
        if not right_worker:
            self.expect_error("FAILED_PRECONDITION", call)
            return
        assert self.run(call) == job.cancelled_at_ms
        job.expiry_ms = self.now + LEASE_MS

    @precondition(has_running)
    @rule(data=st.data())
    def give_back(self, data) -> None:
        job = self.pick(data, running=True)
        assert job.task_id is not None
        self.run(give_back.give_back(self.s, job.worker, job.task_id))
        if job.cancelled_at_ms is not None:
            self.ended_tasks.append(job.task_id)
        self.model.give_back(job)

    @rule(data=st.data(), missing=st.booleans())
    def cancel(self, data, missing: bool) -> None:
        if missing or not self.model.jobs:
            self.expect_error("NOT_FOUND", cancel.cancel_job(self.s, "-", "nope"))
            return
        job = self.pick(data)
        call = cancel.cancel_job(self.s, job.tenant, job.job_id)
        if job.status in TERMINAL or job.cancelled_at_ms is not None:
            self.expect_error("FAILED_PRECONDITION", call)
            return
        self.run(call)
        if job.status == RUNNING:
            job.cancelled_at_ms = self.now
        else:
            job.status = CANCELLED  # no attempt counted

    @precondition(has_jobs)
    @rule(data=st.data())
    def restart(self, data) -> None:
        job = self.pick(data)
        call = restart.restart_job(self.s, job.tenant, job.job_id)
        if job.status not in (FAILED, CANCELLED):
            self.expect_error("FAILED_PRECONDITION", call)
            return
        self.run(call)
        self.model.restart(job, self.now)

    @precondition(has_jobs)
    @rule(data=st.data())
    def expedite(self, data) -> None:
        job = self.pick(data)
        call = expedite.expedite_job(self.s, job.tenant, job.job_id)
        if job.status != SCHEDULED or job.start_ms <= self.now:
            self.expect_error("FAILED_PRECONDITION", call)
            return
        self.run(call)
        job.start_ms = self.now

    @rule(data=st.data(), missing=st.booleans())
    def delete(self, data, missing: bool) -> None:
        if missing or not self.model.jobs:
            self.run(delete.delete_job(self.s, "-", "nope"))  # idempotent
            return
        job = self.pick(data)
        call = delete.delete_job(self.s, job.tenant, job.job_id)
        if job.status not in TERMINAL:
            self.expect_error("FAILED_PRECONDITION", call)
            return
        self.run(call)
        del self.model.jobs[job.ref]

    @rule(ms=st.sampled_from(STEPS))
    def advance(self, ms: int) -> None:
        self.clock.t += ms

    @rule()
    def reap(self) -> None:
        due = [j for j in self.model.running() if j.expiry_ms <= self.now]
        assert self.run(reap_expired_leases(self.s)) == len(due)
        for job in due:
            assert job.task_id is not None
            self.ended_tasks.append(job.task_id)
            self.model.end(job, "crashed", self.now)

    def _op(self, name: str, job: MJob, worker: str):
        """One operation on `job` as a coroutine, for running two at once."""
        s, t, j = self.s, job.tenant, job.job_id
        tid = job.task_id or "no-such-task"
        return {
            "success": lambda: outcome.report_outcome(s, tid, outcome.Success(b"")),
            "failure": lambda: outcome.report_outcome(s, tid, outcome.Failure("E", b"")),
            "cancelled": lambda: outcome.report_outcome(s, tid, outcome.Cancelled()),
            "heartbeat": lambda: outcome.heartbeat(s, job.worker, tid),
            "give_back": lambda: give_back.give_back(s, job.worker, tid),
            "cancel": lambda: cancel.cancel_job(s, t, j),
            "restart": lambda: restart.restart_job(s, t, j),
            "expedite": lambda: expedite.expedite_job(s, t, j),
            "delete": lambda: delete.delete_job(s, t, j),
            "lease_named": lambda: lease.lease_task(s, t, j, worker),
            "lease_tasks": lambda: lease.lease_tasks(s, worker, 2, job.group),
            "reap": lambda: reap_expired_leases(s),
        }[name]()

    @precondition(has_jobs)
    @rule(data=st.data(), same=st.booleans(), expire=st.booleans())
    def two_at_once(self, data, same: bool, expire: bool) -> None:
        """Two operations that fit the jobs' states, interleaved on the event loop (on
        one job, or two). Which order won is the shard's: the model takes the shard's
        word for every job afterwards (resync), and the invariants then check the
        shard's own consistency (counters = index rows = pending steps = leases =
        holders). `expire`: the clock first passes the first job's lease expiry."""
        first = self.pick(data)
        second = first if same else self.pick(data)
        ops = [data.draw(st.sampled_from(_RACES[j.status]), label="op")
               for j in (first, second)]
        if expire and first.status == RUNNING:
            self.clock.t = max(self.now, first.expiry_ms)

        async def both():
            return await asyncio.gather(self._op(ops[0], first, "w1"),
                                        self._op(ops[1], second, "w2"),
                                        return_exceptions=True)

        for r in self.run(both()):
            if isinstance(r, BaseException) and not isinstance(r, SiloError):
                raise r
        self.resync()

    def resync(self) -> None:
        """Set the model from what the shard shows of each job (after a race)."""
        relative: dict[tuple[str, str], int] = {}
        for _k, task in self.task_rows():
            relative[(task.tenant, task.job_id)] = getattr(task, "relative_attempt", 1)
        for t in self.s.requests.values():
            relative[(t.tenant, t.job_id)] = t.relative_attempt
        for ref, job in list(self.model.jobs.items()):
            try:
                v = self.run(get_job.get_job(self.s, job.tenant, job.job_id, True))
            except SiloError:
                del self.model.jobs[ref]
                continue
            job.status = v.status.kind
            job.ended = len(v.attempts) - (job.status == RUNNING)  # + the running one
            job.task_id, job.holds, job.cancelled_at_ms = None, False, None
            if job.status == SCHEDULED:
                job.start_ms = v.status.next_attempt_starts_after_ms or 0
                job.relative = relative.get(ref, job.relative)
            elif job.status == RUNNING:
                active = self.s.active[ref]
                ls = self.s.leases[active.task_id]
                assert isinstance(ls.task, RunAttempt)
                job.task_id, job.worker = ls.task.task_id, ls.worker_id
                job.expiry_ms, job.started_ms = ls.expiry_ms, ls.started_at_ms
                job.holds = bool(ls.task.held_queues)
                job.relative = ls.task.relative_attempt
                job.cancelled_at_ms = active.cancelled_at_ms
        self.ended_tasks = [t for t in self.ended_tasks
                            if t not in {j.task_id for j in self.model.running()}]

    @rule()
    def reopen(self) -> None:
        holders = {k: set(q.holders) for k, q in self.s.conc.items() if q.holders}
        self.run(self.s.close())
        self.shard = None
        self.shard = self.run(Shard.open(self.sid, "", "", self.url, self.cfg, self.clock))
        after = {k: set(q.holders) for k, q in self.s.conc.items() if q.holders}
        assert after == holders, "the open changed who holds a slot"

    # ---- invariants ----------------------------------------------------------------

    @invariant()
    def jobs_read_back(self) -> None:
        if self.shard is None:
            return
        for job in self.model.jobs.values():
            v = self.run(get_job.get_job(self.s, job.tenant, job.job_id, True))
            st_ = v.status
            assert st_.kind == job.status, (job, st_)
            if job.status == SCHEDULED:
                assert (st_.current_attempt, st_.next_attempt_starts_after_ms) == (
                    job.ended + 1, job.start_ms), (job, st_)
            elif job.status == RUNNING:
                assert st_.last_attempt == job.ended + 1, (job, st_)
            else:
                assert st_.last_attempt == job.ended, (job, st_)
            assert len(v.attempts) == job.ended + (job.status == RUNNING), (job, v.attempts)

    @invariant()
    def counters_exact(self) -> None:
        if self.shard is None:
            return
        s, model = self.s, self.model
        assert {k: n for k, n in s.tenant_status.items() if n} == model.counts()
        assert (s.total_jobs, s.completed_jobs) == (len(model.jobs), model.completed())
        assert s.scheduled_jobs == sum(j.status == SCHEDULED for j in model.jobs.values())
        disk = {}
        for k, v in self.run(s.committer.scan_prefix(keys.kind_prefix(keys.TENANT_COUNTS))):
            tenant, _ = keys.dec_str(k, 1)
            for name, n in zip(NAMES, _decode_counts(v), strict=True):
                if n:
                    disk[(tenant, name)] = n
        assert disk == model.counts(), "the tenant counter rows on disk"
        jobs = self.run(s.committer.get(keys.shard_counter("jobs")))
        assert _decode_counts(jobs) == [len(model.jobs), model.completed()]

    def task_rows(self) -> list[tuple[bytes, object]]:
        rows = self.run(self.s.committer.scan_prefix(keys.kind_prefix(keys.TASK)))
        return [(k, task_decoder.decode(v)) for k, v in rows]

    @invariant()
    def rows_match(self) -> None:
        """Status index rows, pending steps and task-group depth, from storage."""
        if self.shard is None:
            return
        s, model = self.s, self.model
        index = Counter()
        for k, _ in self.run(s.committer.scan_prefix(keys.kind_prefix(keys.STATUS_INDEX))):
            tenant, name, _, job_id = keys.decode_status_index(k)
            index[(tenant, job_id, name)] += 1
        assert index == Counter((j.tenant, j.job_id, STATUS_NAMES[j.status])
                                for j in model.jobs.values()), "status index rows"
        steps: Counter = Counter()
        depth: Counter = Counter()
        for k, task in self.task_rows():
            steps[(task.tenant, task.job_id)] += 1
            depth[keys.decode_task(k)[0]] += 1
        for _k, v in self.run(s.committer.scan_prefix(
                keys.kind_prefix(keys.CONCURRENCY_REQUEST))):
            ticket = request_decoder.decode(v)
            steps[(ticket.tenant, ticket.job_id)] += 1
        assert steps == Counter(j.ref for j in model.jobs.values() if j.status == SCHEDULED), (
            "one pending step per Scheduled job")
        assert {g: n for g, n in s.depth.items() if n} == dict(depth), "depth in memory"
        for group in GROUPS:
            raw = self.run(s.committer.get(keys.shard_counter(COUNTER_PREFIX + group)))
            assert (decode_i64(raw) if raw is not None else 0) == depth[group], "depth row"

    @invariant()
    def leases_and_slots(self) -> None:
        if self.shard is None:
            return
        s, model = self.s, self.model
        leases = {tid: ls for tid, ls in s.leases.items() if isinstance(ls.task, RunAttempt)}
        expected = {j.task_id: j for j in model.running()}
        assert set(leases) == set(expected), "leases are exactly the Running jobs"
        for tid, job in expected.items():
            assert leases[tid].expiry_ms == job.expiry_ms, job
            active = s.active.get(job.ref)
            assert active is not None and active.kind == RUNNING and active.task_id == tid
            assert active.cancelled_at_ms == job.cancelled_at_ms, job
        holder_rows: dict[tuple[str, str], set[str]] = {}
        for k, _ in self.run(s.committer.scan_prefix(
                keys.kind_prefix(keys.CONCURRENCY_HOLDER))):
            tenant, queue, task_id = keys.decode_concurrency_holder(k)
            holder_rows.setdefault((tenant, queue), set()).add(task_id)
        mem = {k: set(q.holders) for k, q in s.conc.items() if q.holders}
        assert mem == holder_rows, "holders in memory = holder rows"
        queued: dict[tuple[str, str], set[str]] = {}  # granted, not leased yet
        for _k, task in self.task_rows():
            if isinstance(task, RunAttempt):
                for q in task.held_queues:
                    queued.setdefault((task.tenant, q), set()).add(task.task_id)
        for tenant in TENANTS:
            for key, n in KEY_MAX.items():
                live = model.slot_holders(tenant, key) | queued.get((tenant, key), set())
                held = mem.get((tenant, key), set())
                assert held == live, ("holders are the live attempts", tenant, key)
                assert len(held) <= n, ("limit exceeded", tenant, key, held)
                q = s.conc.get((tenant, key))
                waiting = [r for r in (q.waiting if q else []) if r in s.requests]
                assert not waiting or len(held) == n, ("a waiter parked by a free slot",
                                                       tenant, key)


def _decode_counts(raw: bytes | None) -> list[int]:
    """A counter row's counts (a shard that never counted a job has no `jobs` row)."""
    return [0, 0] if raw is None else msgspec.msgpack.decode(raw, type=list[int])


ShardMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
TestShardModel = ShardMachine.TestCase
