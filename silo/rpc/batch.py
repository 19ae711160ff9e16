"""Many items of one kind on this process's shards, in one pass: EnqueueMany's jobs and a
worker stream's outcomes.

The unary handlers serve one item per call: each job of a batch used to run as its own
asyncio task through `SiloService.Enqueue` (its wrapper layers, a reply message, a
shielded commit wait per task), which a profile of the stream saturation bench showed as
the largest share of the RPC side. Here each item is checked exactly as its unary twin
checks it (the same service helpers and shard validation, in the same order, so the
same status code and phrase per bad item), staged into its shard's open group commit
synchronously, and the pass then waits for the commits: one coroutine per batch, no task
per item. Items whose operation has to wait for storage before it can stage (an Enqueue
naming its own job id reads whether that id exists; a failure outcome may read the job's
retry policy) go through the unary handler as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from silo import errors
from silo._proto import silo_pb2 as pb
from silo.ids import new_id
from silo.observability import metrics, rates
from silo.rpc import convert
from silo.shard import enqueue as enqueue_op
from silo.shard import outcome as outcome_op
from silo.shard.state import Shard
from silo.storage.records import JobInfo, RunAttempt

# A staged item: (index, the commit it waits for).
_Staged = list[tuple[int, Awaitable[None]]]


async def enqueue_jobs(svc: Any, jobs: list[pb.EnqueueRequest],
                       slow: Callable[[pb.EnqueueRequest], Awaitable[Any]]
                       ) -> list[str | BaseException]:
    """Enqueue each job on its shard (all of this process): per job its id once durable,
    or the exception its unary Enqueue would have ended with. `slow(job)` is the unary
    path, for jobs that name their own id."""
    out: list[Any] = [""] * len(jobs)
    staged: _Staged = []
    later: list[int] = []
    touched: dict[str, Shard] = {}
    groups: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if job.id:
            later.append(i)
            continue
        try:
            s = svc.shard(job.shard)
            tenant = svc.tenant(s, job)
            out[i] = _stage_job(s, tenant, job)
            staged.append((i, s.committer.commit()))
        except Exception as e:  # noqa: BLE001 - answered per job, as the unary call would be
            out[i] = e
            continue
        touched[s.id] = s
        metrics.job_enqueued(s.id, tenant)
        groups[job.task_group] = groups.get(job.task_group, 0) + 1
    for s in touched.values():
        svc.node.publish(s)
    for g, n in groups.items():
        rates.enqueued(g, n)
    if later:
        got = await asyncio.gather(*(slow(jobs[i]) for i in later), return_exceptions=True)
        for i, r in zip(later, got, strict=True):
            out[i] = r if isinstance(r, BaseException) else r.id
    await _settle(staged, out)
    return out


def _stage_job(s: Shard, tenant: str, job: pb.EnqueueRequest) -> str:
    """`SiloService.Enqueue` then `silo.shard.enqueue.enqueue` for a job without an id,
    up to the commit wait: the same conversions, checks (in their order) and writes."""
    retry_policy = (convert.retry_policy_from_pb(job.retry_policy)
                    if job.HasField("retry_policy") else None)
    limits = convert.limits_from_pb(job.limits) if job.limits else []
    metadata = dict(job.metadata)
    enqueue_op.validate_job("", job.priority, job.task_group, metadata, limits, retry_policy,
                            job.start_at_ms)
    info = JobInfo(new_id(), tenant, job.priority, job.start_at_ms, job.payload.msgpack,
                   retry_policy, metadata, limits, job.task_group)
    enqueue_op._stage(s, info)  # noqa: SLF001 - the op's own staging step, shared on purpose
    return info.id


async def report_outcomes(svc: Any, requests: list[pb.ReportOutcomeRequest],
                          slow: Callable[[pb.ReportOutcomeRequest], Awaitable[Any]]
                          ) -> list[Any]:
    """ReportOutcome for each request (shards of this process): per request None once
    durable, or the exception its unary call would have ended with. Failures go through
    `slow(request)` (the unary path, concurrently): they may read the job's retry policy
    from storage first."""
    out: list[Any] = [None] * len(requests)
    staged: _Staged = []
    later: list[int] = []
    touched: dict[str, Shard] = {}
    groups: dict[str, int] = {}
    for i, req in enumerate(requests):
        try:
            s = svc.shard(req.shard)
            svc.worker_tenant(s, req)
            kind = req.WhichOneof("outcome")
            if kind is None:
                raise errors.invalid("missing outcome")
            if kind == "failure":
                later.append(i)
                continue
            o: outcome_op.Outcome = (outcome_op.Success(req.success.msgpack)
                                     if kind == "success" else outcome_op.Cancelled())
            # silo.shard.outcome.report_outcome, up to its commit wait
            lease = s.leases.get(req.task_id)
            if lease is None or not isinstance(lease.task, RunAttempt):
                raise errors.lease_not_found()
            await outcome_op.finish_attempt(s, lease, o)  # never waits for these two kinds
            staged.append((i, s.committer.commit()))
        except Exception as e:  # noqa: BLE001 - answered per item, as the unary call would be
            out[i] = e
            continue
        touched[s.id] = s
        metrics.job_completed(s.id, kind)
        g = lease.task.task_group
        groups[g] = groups.get(g, 0) + 1
    for s in touched.values():
        svc.node.publish(s)
    for g, n in groups.items():
        rates.completed(g, n)
    if later:
        got = await asyncio.gather(*(slow(requests[i]) for i in later), return_exceptions=True)
        for i, r in zip(later, got, strict=True):
            out[i] = r if isinstance(r, BaseException) else None
    await _settle(staged, out)
    return out


async def _settle(staged: _Staged, out: list[Any]) -> None:
    """Wait for each staged item's commit; a failed commit fails its items."""
    for i, commit in staged:
        try:
            await commit
        except Exception as e:  # noqa: BLE001
            out[i] = e
