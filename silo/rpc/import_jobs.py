"""The ImportJobs RPC: per-job validation, grouping by (shard, tenant), results in order.

A job that fails validation (bad shard id, tenant, fields, attempts) or that the shard
refuses becomes a per-job result `{id, success=false, error, status=FAILED}`; the RPC
itself fails only when a job of a group is Running (FAILED_PRECONDITION, as upstream).
A group whose shard lives in another worker process of this node is forwarded to it as
one smaller ImportJobs call.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from silo import errors
from silo._proto import silo_pb2 as pb
from silo.rpc import convert
from silo.shard import import_
from silo.shard.state import Shard
from silo.shard.validate import validate_job_fields
from silo.storage.records import ATTEMPT_CANCELLED, ATTEMPT_FAILED, ATTEMPT_SUCCEEDED, FAILED

_ATTEMPT_STATUS = {pb.ATTEMPT_STATUS_SUCCEEDED: ATTEMPT_SUCCEEDED,
                   pb.ATTEMPT_STATUS_FAILED: ATTEMPT_FAILED,
                   pb.ATTEMPT_STATUS_CANCELLED: ATTEMPT_CANCELLED}


class Service(Protocol):
    """What this module needs of silo.rpc.service.SiloService."""

    node: object

    def shard(self, shard_id: str) -> Shard: ...

    def tenant(self, shard: Shard, request) -> str: ...


def validate_import_job(job: import_.ImportJob) -> None:
    """The per-job field checks of behaviour.md §1.2 ImportJobs (shard and tenant apart):
    enqueue's checks and bounds, without the task-group length check (as upstream)."""
    if not job.id:
        raise errors.invalid("job id is required for import")
    validate_job_fields(job.id, job.priority, job.task_group, job.metadata, job.limits,
                        job.retry_policy, job.start_at_ms, max_task_group_chars=None)


def job_from_pb(req: pb.ImportJobRequest) -> import_.ImportJob:
    attempts = []
    for a in req.attempts:
        if a.status == pb.ATTEMPT_STATUS_RUNNING:
            raise errors.invalid("import attempts must be terminal (not Running)")
        status = _ATTEMPT_STATUS.get(a.status)
        if status is None:
            raise errors.invalid("invalid attempt status")
        attempts.append(import_.ImportedAttempt(
            status, a.started_at_ms, a.finished_at_ms,
            a.result.msgpack if a.HasField("result") else b"",
            a.error_code if a.HasField("error_code") else "",
            a.error_data.msgpack if a.HasField("error_data") else b""))
    return import_.ImportJob(
        req.id, req.priority, req.enqueue_time_ms, req.start_at_ms,
        convert.retry_policy_from_pb(req.retry_policy) if req.HasField("retry_policy") else None,
        req.payload.msgpack, convert.limits_from_pb(req.limits), convert.map_to_dict(req.metadata),
        req.task_group, attempts)


def _refused(job_id: str, e: errors.SiloError) -> pb.ImportJobResult:
    return pb.ImportJobResult(id=job_id, success=False, error=e.message, status=FAILED)


async def serve(service: Service, request: pb.ImportJobsRequest,
                owned_elsewhere: type[Exception]) -> pb.ImportJobsResponse:
    """Answer one ImportJobs call (owned_elsewhere: the service's 'forward me' signal)."""
    jobs = list(request.jobs)
    results: list[pb.ImportJobResult | None] = [None] * len(jobs)
    by_shard: dict[str, list[int]] = {}
    for i, req in enumerate(jobs):
        try:
            uuid.UUID(req.shard)
        except ValueError:
            results[i] = _refused(req.id, errors.invalid(f"invalid shard ID: {req.shard}"))
            continue
        by_shard.setdefault(req.shard, []).append(i)
    for shard_id, indexes in by_shard.items():
        try:
            shard = service.shard(shard_id)
        except owned_elsewhere as e:
            await _forward(service, e, jobs, indexes, results)
            continue
        except errors.SiloError as e:
            for i in indexes:
                results[i] = _refused(jobs[i].id, e)
            continue
        groups: dict[str, list[tuple[int, import_.ImportJob]]] = {}
        for i in indexes:
            try:
                tenant = service.tenant(shard, jobs[i])
                if not jobs[i].id:
                    raise errors.invalid("job id is required for import")
                job = job_from_pb(jobs[i])
                validate_import_job(job)
                groups.setdefault(tenant, []).append((i, job))
            except errors.SiloError as e:
                results[i] = _refused(jobs[i].id, e)
        for tenant, group in groups.items():
            done = await import_.import_jobs(shard, tenant, [job for _, job in group])
            for (i, _), r in zip(group, done, strict=True):
                results[i] = pb.ImportJobResult(id=r.job_id, success=r.success, status=r.status)
                if r.error is not None:
                    results[i].error = r.error
        service.node.publish(shard)  # type: ignore[attr-defined]
    return pb.ImportJobsResponse(results=results)


async def _forward(service: Service, signal: Exception, jobs: list[pb.ImportJobRequest],
                   indexes: list[int], results: list[pb.ImportJobResult | None]) -> None:
    sub = pb.ImportJobsRequest(jobs=[jobs[i] for i in indexes])
    peer = service.node.peers[signal.owner]  # type: ignore[attr-defined]
    out = pb.ImportJobsResponse.FromString(await peer.call("ImportJobs", sub.SerializeToString()))
    for i, r in zip(indexes, out.results, strict=True):
        results[i] = r
