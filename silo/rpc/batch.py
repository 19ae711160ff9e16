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

from silo._proto import silo_pb2 as pb
from silo.observability import metrics, rates
from silo.rpc import convert
from silo.shard import enqueue as enqueue_op
from silo.shard import outcome as outcome_op
from silo.shard.state import Shard


class _Pass:
    """One pass over a batch's items: per item its answer (`out`), the commit it waits
    for, or its place in the unary path (`later`); the shards and task groups touched."""

    def __init__(self, n: int, blank: Any) -> None:
        self.out: list[Any] = [blank] * n
        self.staged: list[tuple[int, Awaitable[None]]] = []
        self.later: list[int] = []
        self.touched: dict[str, Shard] = {}
        self.groups: dict[str, int] = {}

    def staged_on(self, i: int, s: Shard, group: str, commit: Awaitable[None]) -> None:
        self.staged.append((i, commit))
        self.touched[s.id] = s
        self.groups[group] = self.groups.get(group, 0) + 1

    async def finish(self, svc: Any, rate: Callable[[str, int], None], items: list,
                     slow: Callable[[Any], Awaitable[Any]],
                     answer: Callable[[Any], Any]) -> list[Any]:
        """Publish the touched shards, count the rates, run the `later` items through
        `slow` concurrently (`answer` maps a reply), then wait for the staged commits;
        a failed commit fails its items."""
        for s in self.touched.values():
            svc.node.publish(s)
        for g, n in self.groups.items():
            rate(g, n)
        out = self.out
        if self.later:
            got = await asyncio.gather(*(slow(items[i]) for i in self.later),
                                       return_exceptions=True)
            for i, r in zip(self.later, got, strict=True):
                out[i] = r if isinstance(r, BaseException) else answer(r)
        for i, commit in self.staged:
            try:
                await commit
            except Exception as e:  # noqa: BLE001
                out[i] = e
        return out


async def enqueue_jobs(svc: Any, jobs: list[pb.EnqueueRequest],
                       slow: Callable[[pb.EnqueueRequest], Awaitable[Any]]
                       ) -> list[str | BaseException]:
    """Enqueue each job on its shard (all of this process): per job its id once durable,
    or the exception its unary Enqueue would have ended with. `slow(job)` is the unary
    path, for jobs that name their own id."""
    p = _Pass(len(jobs), "")
    # (shard id, tenant) -> (shard, tenant) once checked: the checks depend on nothing
    # else, and nothing changes them within this synchronous pass (a batch has few).
    checked: dict[tuple[str, str], tuple[Shard, str]] = {}
    for i, job in enumerate(jobs):
        if job.id:
            p.later.append(i)
            continue
        try:
            ck = (job.shard, job.tenant)
            hit = checked.get(ck)
            if hit is None:
                s = svc.shard(job.shard)
                tenant = svc.tenant(s, job)
                checked[ck] = (s, tenant)
            else:
                s, tenant = hit
            p.out[i] = enqueue_op.stage_new(s, tenant=tenant, **convert.enqueue_fields(job))
            commit = s.committer.commit()
        except Exception as e:  # noqa: BLE001 - answered per job, as the unary call would be
            p.out[i] = e
            continue
        p.staged_on(i, s, job.task_group, commit)
        metrics.job_enqueued(s.id, tenant)
    return await p.finish(svc, rates.enqueued, jobs, slow, lambda r: r.id)


async def report_outcomes(svc: Any, requests: list[pb.ReportOutcomeRequest],
                          slow: Callable[[pb.ReportOutcomeRequest], Awaitable[Any]]
                          ) -> list[Any]:
    """ReportOutcome for each request (shards of this process): per request None once
    durable, or the exception its unary call would have ended with. Failures go through
    `slow(request)` (the unary path, concurrently): they may read the job's retry policy
    from storage first."""
    p = _Pass(len(requests), None)
    checked: dict[tuple[str, str], Shard] = {}  # as in enqueue_jobs
    for i, req in enumerate(requests):
        try:
            ck = (req.shard, req.tenant_id)
            s = checked.get(ck)  # type: ignore[assignment]
            if s is None:
                s = svc.shard(req.shard)
                svc.worker_tenant(s, req)
                checked[ck] = s
            kind, o = convert.outcome_from_pb(req)
            if kind == "failure":
                p.later.append(i)
                continue
            lease = outcome_op.stage_final(s, req.task_id, o)  # type: ignore[arg-type]
            commit = s.committer.commit()
        except Exception as e:  # noqa: BLE001 - answered per item, as the unary call would be
            p.out[i] = e
            continue
        p.staged_on(i, s, lease.task.task_group, commit)
        metrics.job_completed(s.id, kind)
    return await p.finish(svc, rates.completed, requests, slow, lambda r: None)
