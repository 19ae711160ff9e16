"""Leasing: hand due tasks to a worker (LeaseTasks) or one named job (LeaseTask).

A lease moves a job Scheduled → Running in one durable batch: the task row is deleted,
the status set to Running, and the lease (expiry = now + lease_ms) stored as the value
of the job's Running status-index row (Shard.put_lease). The lease is the running
attempt; the attempt row is written when the attempt ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

import msgspec

from silo import errors
from silo.ids import new_id
from silo.observability import tracing
from silo.shard import limits, pending, prefetch
from silo.shard.state import ActiveJob, Shard, scheduled_index_key
from silo.shard.validate import validate_worker_id
from silo.storage import keys
from silo.storage.records import (
    RUNNING,
    SCHEDULED,
    STATUS_NAMES,
    TERMINAL,
    JobInfo,
    JobStatus,
    Lease,
    RequestTicket,
    RunAttempt,
    Task,
    encode,
    job_info_decoder,
)

log = logging.getLogger(__name__)


class LeasedTask(NamedTuple):
    lease: Lease
    info: JobInfo | None  # None for a floating-limit refresh task


def _start_lease(shard: Shard, job: ActiveJob, task: RunAttempt, worker_id: str, priority: int,
                 now: int) -> Lease:
    lease = Lease(worker_id, task, now + shard.config.lease_ms, now, priority)
    shard.track_lease(lease)
    job.kind = RUNNING
    job.task_key = None
    job.task_id = task.task_id
    # The lease is stored as the value of the job's Running index row (Shard.put_lease).
    shard.put_status(task.tenant, task.job_id,
                     JobStatus(RUNNING, now, None, None, last_attempt=task.attempt),
                     index_value=encode(lease))
    shard.count_status(task.tenant, SCHEDULED, RUNNING)
    return lease


async def _with_infos(shard: Shard, leases: list[Lease]) -> list[LeasedTask]:
    """Pair each lease with its job's info (from the cache, else storage), once durable."""
    cache = shard.info_cache
    infos = [cache.get(ls.task.tenant, ls.task.job_id) for ls in leases]
    missing = [i for i, info in enumerate(infos) if info is None]
    if missing:
        gets = [shard.committer.get(keys.job_info(leases[i].task.tenant, leases[i].task.job_id))
                for i in missing]
        *raw, _ = await asyncio.gather(*gets, shard.committer.commit())
        for i, r in zip(missing, raw, strict=True):
            try:
                infos[i] = job_info_decoder.decode(r)
            except (TypeError, msgspec.DecodeError) as exc:
                # Not delivered: the lease expires and the reaper ends the attempt.
                log.error("job %s: its info record is unreadable: %r",
                          leases[i].task.job_id, exc)
    else:
        await shard.committer.commit()
    return [LeasedTask(ls, info) for ls, info in zip(leases, infos, strict=True)
            if info is not None]


@tracing.traced("dequeue")
async def lease_tasks(shard: Shard, worker_id: str, max_tasks: int, task_group: str
                      ) -> list[LeasedTask]:
    """Lease up to max_tasks due tasks of task_group in ready order, plus every due
    floating-limit refresh task of the group (not counted).

    Tasks come from the group's ready buffer (silo.shard.buffer); only when it holds
    fewer than asked and storage may hold more does the call wait for one refill."""
    validate_worker_id(worker_id)
    if max_tasks <= 0:
        return []
    buf = shard.buffer(task_group)
    for _ in range(8):  # a buffer smaller than the call: a few refills, then what we have
        if buf.complete or len(buf) >= max_tasks:
            break
        await buf.refill(shard)
    now = shard.now()
    refreshes = []
    for key, task in buf.pop_due(now, refresh=True):
        shard.committer.delete(key)
        refreshes.append(_lease_refresh(shard, task, worker_id, now))
    taken: list[Lease] = []
    active = shard.active
    plen = buf.prefix_len
    while len(taken) < max_tasks:
        due = buf.pop_one(now)
        if due is None:
            break
        key, task = due
        shard.committer.delete(key)
        shard.depth[task_group] = shard.depth.get(task_group, 0) - 1
        ref = (task.tenant, task.job_id)
        # The job is Scheduled with this task pending (the row existed): it was only in
        # storage; its status-index row derives from the step's start time.
        job = active.get(ref)
        if job is not None and job.kind != SCHEDULED:  # a stray task of a running job
            log.warning("dropping task %s of job %s: the job is running",
                        task.task_id, task.job_id)
            limits.release(shard, task.tenant, list(task.held_queues), task.task_id, now)
            continue
        if job is None:
            job = active[ref] = ActiveJob(SCHEDULED)
        start = getattr(task, "start_ms", None)
        if start is None:
            start = keys.task_start_ms(key, plen)
        job.index_key = scheduled_index_key(task.tenant, task.job_id, start)
        job.task_key = None
        shard.drop_pointer(key, task)
        # One job's step failing must not affect the others leased in this call: a
        # failing step ends its own job Failed (limits.fail_broken_chain) and we go on.
        try:
            if isinstance(task, RunAttempt):
                taken.append(_start_lease(shard, job, task, worker_id, key[plen + 8], now))
            elif isinstance(task, RequestTicket):
                # A limit-chain step came due: run it here. What it produces (a RunAttempt
                # due now) goes into the buffer and can be leased by this same call.
                limits.resume_ticket(shard, job, task, now)
            else:
                limits.check_rate_limit(shard, job, task, now)
        except Exception as exc:
            limits.fail_broken_chain(shard, job, task, now, exc)
        shard.settle(task.tenant, task.job_id, job)
    buf.refill_soon(shard)
    if not taken and not refreshes:
        return []
    out = await _with_infos(shard, taken) + [LeasedTask(ls, None) for ls in refreshes]
    prefetch.advance(shard, buf)  # the next scanned tasks' infos, read after we reply
    return out


def _lease_refresh(shard: Shard, task: Task, worker_id: str, now: int) -> Lease:
    lease = Lease(worker_id, task, now + shard.config.lease_ms, now, 0)
    shard.put_lease(lease)
    return lease


async def lease_task(shard: Shard, tenant: str, job_id: str, worker_id: str) -> LeasedTask:
    """Lease one named job now, even if it is future-scheduled; bypasses limits."""
    if not worker_id:
        raise errors.invalid("worker_id is required")
    validate_worker_id(worker_id)
    async with shard.job_lock(tenant, job_id):
        job, status = await pending.load(shard, tenant, job_id)
        if job is None:
            if status is None:
                raise errors.job_not_found()
            reason = ("job is already in terminal state" if status.kind in TERMINAL
                      else "job has no pending task")
            raise errors.cannot("lease", job_id, reason, STATUS_NAMES[status.kind])
        if job.cancelled_at_ms is not None:
            raise errors.cannot("lease", job_id, "job is cancelled", STATUS_NAMES[job.kind])
        if job.kind == RUNNING:
            raise errors.cannot("lease", job_id, "job is currently running", "Running")
        if job.task_key is None and job.request_key is None:
            raise errors.cannot("lease", job_id, "job has no pending task", "Scheduled")
        info = shard.info_cache.get(tenant, job_id)
        if info is None:
            raw = await shard.committer.get(keys.job_info(tenant, job_id))
            info = job_info_decoder.decode(raw)
            job, status = await pending.load(shard, tenant, job_id)
            if job is None or job.kind != SCHEDULED:
                raise errors.cannot("lease", job_id, "job changed while leasing", "Running")
        if job.request_key is not None:
            step = shard.requests.get(job.request_key)
        else:
            assert job.task_key is not None
            step = shard.buffer(info.task_group).get(job.task_key) or job.task
        assert step is not None
        now = shard.now()
        # Bypasses every limit: whatever slots the pending chain held are given back.
        limits.abandon_pending(shard, tenant, job, now)
        shard.active[(tenant, job_id)] = job
        # Upstream quirk kept: the relative attempt number equals the absolute one here.
        task = RunAttempt(new_id(), tenant, job_id, step.attempt, step.attempt,
                          info.task_group)
        lease = _start_lease(shard, job, task, worker_id, info.priority, now)
    return (await _with_infos(shard, [lease]))[0]
