"""The asyncio Silo client: job operations, the worker protocol and admin calls.

    async with SiloClient(["127.0.0.1:7450"]) as client:
        handle = await client.enqueue({"to": "a@b.c"}, "emails")
        print(await handle.await_result(timeout=30))

Channels, topology discovery, tenant routing and retries are
:class:`silo.client.connection.ClusterConnection`'s (its module docstring says how calls
are routed and retried); this module adds the typed calls of ``silo.v1.Silo`` on top.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from silo._proto import silo_pb2 as pb
from silo.client import query as q
from silo.client.connection import (  # noqa: F401 - re-exported: silo.client.client's old names
    MAX_MESSAGE_BYTES,
    SERVICE,
    ClientStats,
    ClusterConnection,
    Token,
    _Conn,
    default_channel_options,
)
from silo.client.errors import JobNotTerminal, SiloError, from_rpc_error
from silo.client.handle import JobHandle
from silo.client.routing import hash_tenant
from silo.client.types import (
    ImportJob,
    ImportResult,
    Job,
    JobResult,
    JobStatus,
    LeaseResult,
    Limit,
    Outcome,
    QueryResult,
    RefreshTask,
    RetryPolicy,
    Task,
    _status,
    encode,
    outcome_to_pb,
)


def now_ms() -> int:
    return int(time.time() * 1000)


class SiloClient(ClusterConnection):
    """Async client of a Silo cluster. Routing and retries: see :mod:`silo.client.connection`.

    ``servers``: seed addresses ``"host:port"`` (a list, or one comma-separated string).
    ``token``: bearer token (a string, or a function/coroutine function returning one)
    sent as ``authorization: Bearer <token>``. ``tls``: True for TLS with the system
    roots, or a ``grpc.ChannelCredentials``. ``rpc_timeout_s``: deadline of each RPC
    (None = no deadline). ``address_map``: rewrites advertised addresses (a dict or a
    function). ``topology_refresh_interval_s``: periodic reload, 0 = off.
    """

    # ---- jobs ----------------------------------------------------------------------------

    def handle(self, job_id: str, tenant: str | None = None) -> JobHandle:
        """A handle for an existing job (no RPC)."""
        return JobHandle(self, job_id, tenant or None)

    async def enqueue(
        self,
        payload: Any,
        task_group: str,
        *,
        id: str | None = None,
        priority: int = 50,
        start_at_ms: int | None = None,
        start_at: _dt.datetime | None = None,
        retry_policy: RetryPolicy | None = None,
        limits: Iterable[Limit] | None = None,
        tenant: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> JobHandle:
        """Create a job; ``payload`` is msgpack-encoded. Runs from ``start_at_ms`` /
        ``start_at`` (default: now). Raises JobAlreadyExists for a duplicate ``id``."""
        req = self.enqueue_request(payload, task_group, id=id, priority=priority,
                                   start_at_ms=start_at_ms, start_at=start_at,
                                   retry_policy=retry_policy, limits=limits, tenant=tenant,
                                   metadata=metadata)
        resp = await self._routed(hash_tenant(tenant), "Enqueue", req, op="enqueue",
                                  job_id=id, tenant=tenant)
        return JobHandle(self, resp.id, tenant or None)

    async def enqueue_many(self, jobs: Iterable[dict[str, Any]]) -> list[JobHandle | SiloError]:
        """Create many jobs; each item holds :meth:`enqueue`'s arguments as a dict
        (``payload`` and ``task_group`` required). One result per job, in order: its
        handle (the job is durable) or the typed error it failed with. Uses the
        server's EnqueueMany (silostream.v1) when offered, else one Enqueue per job."""
        from silo.client.stream import enqueue_many  # noqa: PLC0415 - it builds on this module

        return await enqueue_many(self, list(jobs))

    def enqueue_request(
        self,
        payload: Any,
        task_group: str,
        *,
        id: str | None = None,
        priority: int = 50,
        start_at_ms: int | None = None,
        start_at: _dt.datetime | None = None,
        retry_policy: RetryPolicy | None = None,
        limits: Iterable[Limit] | None = None,
        tenant: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> pb.EnqueueRequest:
        """The EnqueueRequest of :meth:`enqueue` (its ``shard`` is set when routed)."""
        if start_at_ms is None:
            start_at_ms = int(start_at.timestamp() * 1000) if start_at is not None else now_ms()
        req = pb.EnqueueRequest(id=id or "", priority=priority, start_at_ms=start_at_ms,
                                task_group=task_group)
        req.payload.msgpack = encode(payload)
        if retry_policy is not None:
            req.retry_policy.CopyFrom(retry_policy.to_pb())
        if limits:
            req.limits.extend(lim.to_pb() for lim in limits)
        if tenant:
            req.tenant = tenant
        if metadata:
            req.metadata.update(metadata)
        return req

    def _job_req(self, cls: Any, job_id: str, tenant: str | None) -> Any:
        req = cls(id=job_id)
        if tenant:
            req.tenant = tenant
        return req

    async def _job_call(self, method: str, cls: Any, job_id: str, tenant: str | None,
                        **fields: Any) -> Any:
        req = self._job_req(cls, job_id, tenant)
        for k, v in fields.items():
            setattr(req, k, v)
        return await self._routed(hash_tenant(tenant), method, req, op="job", job_id=job_id,
                                  tenant=tenant)

    async def get_job(self, job_id: str, tenant: str | None = None, *,
                      include_attempts: bool = False) -> Job:
        """The job's definition and status; ``include_attempts`` adds its attempts."""
        m = await self._job_call("GetJob", pb.GetJobRequest, job_id, tenant,
                                 include_attempts=include_attempts)
        return Job.from_pb(m, tenant or None)

    async def get_job_status(self, job_id: str, tenant: str | None = None) -> JobStatus:
        return (await self.get_job(job_id, tenant)).status  # type: ignore[return-value]

    async def _try_job_result(self, job_id: str, tenant: str | None) -> JobResult | None:
        """The result, or None while the job is not terminal (no extra GetJob)."""
        try:
            m = await self._job_call("GetJobResult", pb.GetJobResultRequest, job_id, tenant)
        except SiloError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                return None
            raise
        st = _status(m.status)
        if isinstance(st, JobStatus) and not st.terminal:
            return None
        return JobResult.from_pb(m)

    async def get_job_result(self, job_id: str, tenant: str | None = None) -> JobResult:
        """The outcome of a finished job; JobNotTerminal (with its status) otherwise."""
        r = await self._try_job_result(job_id, tenant)
        if r is None:
            status = await self.get_job_status(job_id, tenant)
            raise JobNotTerminal(job_id, status)
        return r

    async def cancel_job(self, job_id: str, tenant: str | None = None) -> None:
        await self._job_call("CancelJob", pb.CancelJobRequest, job_id, tenant)

    async def restart_job(self, job_id: str, tenant: str | None = None) -> None:
        await self._job_call("RestartJob", pb.RestartJobRequest, job_id, tenant)

    async def expedite_job(self, job_id: str, tenant: str | None = None) -> None:
        await self._job_call("ExpediteJob", pb.ExpediteJobRequest, job_id, tenant)

    async def delete_job(self, job_id: str, tenant: str | None = None) -> None:
        """Delete a finished job; a missing job is not an error."""
        await self._job_call("DeleteJob", pb.DeleteJobRequest, job_id, tenant)

    async def import_jobs(self, jobs: Sequence[ImportJob]) -> list[ImportResult]:
        """Import jobs with their history; one call per shard, results in input order."""
        groups: dict[str, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault(j.tenant or "", []).append(i)
        out: list[ImportResult | None] = [None] * len(jobs)

        async def one(tenant: str, idx: list[int]) -> None:
            req = pb.ImportJobsRequest()
            for i in idx:
                j = jobs[i]
                m = req.jobs.add(id=j.id, priority=j.priority, enqueue_time_ms=j.enqueue_time_ms,
                                 start_at_ms=j.start_at_ms, task_group=j.task_group)
                m.payload.msgpack = encode(j.payload)
                if j.retry_policy is not None:
                    m.retry_policy.CopyFrom(j.retry_policy.to_pb())
                m.limits.extend(lim.to_pb() for lim in j.limits)
                if tenant:
                    m.tenant = tenant
                m.metadata.update(j.metadata)
                m.attempts.extend(a.to_pb() for a in j.attempts)

            def set_shard(shard_id: str) -> None:
                for m in req.jobs:
                    m.shard = shard_id

            resp = await self._routed(hash_tenant(tenant), "ImportJobs", req, tenant=tenant,
                                      prepare=set_shard)
            for i, r in zip(idx, resp.results, strict=False):
                out[i] = ImportResult(r.id, r.success, r.error if r.HasField("error") else None,
                                      _status(r.status))

        await asyncio.gather(*(one(t, idx) for t, idx in groups.items()))
        return [r for r in out if r is not None]

    async def query(self, sql: str, *args: Any, tenant: str | None = None,
                    params: Sequence[Any] | None = None, shard: str | None = None,
                    all_shards: bool = False) -> QueryResult:
        """Run read-only SQL on the tenant's shard (or a named shard, or every shard of
        one server with ``all_shards``); ``$1, $2 …`` bind ``args`` (or ``params``).
        Rows are decoded msgpack maps."""
        values = list(args) + list(params or ())
        if all_shards:
            return await q.query_all(self, sql, values)
        if shard is not None:
            return await q.query_shard(self, sql, values, shard)
        req = pb.QueryRequest(sql=sql)
        if tenant:
            req.tenant = tenant
        req.parameters.extend(q.query_param(p) for p in values)
        m = await self._routed(hash_tenant(tenant), "Query", req, tenant=tenant)
        return q.result_of(m)

    async def query_arrow(self, sql: str, *args: Any, tenant: str | None = None,
                          shard: str | None = None) -> Any:
        """Run read-only SQL through QueryArrow; the result as a ``pyarrow.Table``."""
        return await q.query_arrow(self, sql, args, tenant=tenant, shard=shard)

    # ---- worker protocol ------------------------------------------------------------------

    async def lease_task(self, job_id: str, worker_id: str,
                         tenant: str | None = None) -> Task:
        """Lease one specific job now, ignoring its schedule and limits (testing aid)."""
        m = await self._job_call("LeaseTask", pb.LeaseTaskRequest, job_id, tenant,
                                 worker_id=worker_id)
        return Task(m.task)

    async def lease_tasks(self, worker_id: str, max_tasks: int, task_group: str, *,
                          shard: str | None = None,
                          server_index: int | None = None) -> LeaseResult:
        """Lease up to ``max_tasks`` ready tasks of ``task_group``. Without ``shard`` the
        request goes to one server (round-robin, or the ``server_index``-th connection),
        which leases from every shard it owns."""
        req = pb.LeaseTasksRequest(worker_id=worker_id, max_tasks=max_tasks,
                                   task_group=task_group)
        if shard is not None:
            req.shard = shard
            m = await self._by_shard(shard, "LeaseTasks", req)
        else:
            m = await self._unrouted("LeaseTasks", req, index=server_index)
        return LeaseResult([Task(t) for t in m.tasks],
                           [RefreshTask.from_pb(t) for t in m.refresh_tasks])

    async def heartbeat(self, worker_id: str, task_id: str, shard: str,
                        tenant: str | None = None) -> bool:
        """Extend a lease; True when the job has been cancelled. LeaseLost when the lease
        is gone or held by another worker."""
        req = pb.HeartbeatRequest(shard=shard, worker_id=worker_id, task_id=task_id)
        if tenant:
            req.tenant_id = tenant
        m = await self._by_shard(shard, "Heartbeat", req, op="lease")
        return m.cancelled

    async def report_outcome(self, task_id: str, shard: str, outcome: Outcome | Any,
                             tenant: str | None = None) -> None:
        """Finish a task: ``Success(result)`` (or any plain value), ``Failure(code,
        data)`` or ``Cancelled()``."""
        req = pb.ReportOutcomeRequest(shard=shard, task_id=task_id)
        outcome_to_pb(req, outcome)
        if tenant:
            req.tenant_id = tenant
        await self._by_shard(shard, "ReportOutcome", req, op="lease")

    async def report_refresh_outcome(self, task_id: str, shard: str, *,
                                     new_max_concurrency: int | None = None,
                                     error_code: str = "", error_message: str = "",
                                     tenant: str | None = None) -> None:
        req = pb.ReportRefreshOutcomeRequest(shard=shard, task_id=task_id)
        if new_max_concurrency is not None:
            req.success.new_max_concurrency = new_max_concurrency
        else:
            req.failure.code = error_code
            req.failure.message = error_message
        if tenant:
            req.tenant_id = tenant
        await self._by_shard(shard, "ReportRefreshOutcome", req, op="lease")

    # ---- admin ------------------------------------------------------------------------------

    async def reset_shards(self) -> int:
        """Wipe every shard on every known server (dev mode only); shards reset in total."""
        await self.get_topology()
        md = await self._metadata()

        async def one(c: _Conn) -> int:
            try:
                r = await c.stub.ResetShards(pb.ResetShardsRequest(),
                                             timeout=self.rpc_timeout_s, metadata=md)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from e
            return r.shards_reset

        return sum(await asyncio.gather(*(one(c) for c in list(self._conns.values()))))

