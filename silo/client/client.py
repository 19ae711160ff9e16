"""The asyncio Silo client: topology discovery, tenant routing, retries, typed errors.

    async with SiloClient(["127.0.0.1:7450"]) as client:
        handle = await client.enqueue({"to": "a@b.c"}, "emails")
        print(await handle.await_result(timeout=30))

Routing follows Silo's TypeScript client (see the package docs): the first routed call
loads the topology from GetClusterInfo (concurrent callers share that load), each tenant
goes to the shard whose hash range holds XXH64(tenant), and a call is retried up to
``max_retries`` times when the server answers NOT_FOUND "shard not found" (the shard is
re-pointed to the ``x-silo-shard-owner-addr`` trailer when present, otherwise the
topology is reloaded) or on UNAVAILABLE / DEADLINE_EXCEEDED (topology reloaded), sleeping
250 ms, then twice as long each time up to 5 s. Nothing else is retried by the client;
RESOURCE_EXHAUSTED is retried by gRPC itself (service config, 5 attempts).

Channels are grpc.aio channels, created inside the running event loop on first use, so a
client belongs to one event loop (use :mod:`silo.client.sync` from threads/scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import inspect
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.client.errors import (
    OWNER_TRAILER,
    JobNotTerminal,
    SiloError,
    TopologyError,
    from_rpc_error,
    is_connectivity,
    is_wrong_shard,
    trailers_of,
)
from silo.client.handle import JobHandle
from silo.client.routing import ShardInfo, Topology, hash_tenant
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
    decode_tolerant,
    encode,
    outcome_to_pb,
)

MAX_MESSAGE_BYTES = 128 * 1024 * 1024
SERVICE = "silo.v1.Silo"
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": SERVICE}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "5s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]},
}]})

Token = str | Callable[[], str | Awaitable[str]] | None


def default_channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Keepalive every 5 s even when idle (1 s timeout), 128 MiB messages, gRPC-level
    retry of RESOURCE_EXHAUSTED."""
    return [
        ("grpc.keepalive_time_ms", 5000),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
    ]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class ClientStats:
    wrong_shard_retries: int = 0
    connectivity_retries: int = 0
    topology_refreshes: int = 0


class _Conn:
    __slots__ = ("addr", "channel", "stub")

    def __init__(self, addr: str, channel: grpc.aio.Channel) -> None:
        self.addr = addr
        self.channel = channel
        self.stub = pb_grpc.SiloStub(channel)


def _normalize_servers(servers: str | Sequence[str | tuple[str, int]]) -> list[str]:
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]
    out = []
    for s in servers:
        out.append(f"{s[0]}:{s[1]}" if isinstance(s, tuple) else str(s))
    if not out:
        raise ValueError("SiloClient needs at least one server address")
    return out


def _query_param(v: Any) -> pb.QueryParameter:
    if v is None:
        return pb.QueryParameter(null_value=pb.QueryNull())
    if isinstance(v, bool):
        return pb.QueryParameter(bool_value=v)
    if isinstance(v, int):
        if v >= 1 << 63:
            return pb.QueryParameter(uint64_value=v)
        return pb.QueryParameter(int64_value=v)
    if isinstance(v, float):
        return pb.QueryParameter(float64_value=v)
    if isinstance(v, str):
        return pb.QueryParameter(string_value=v)
    if isinstance(v, bytes | bytearray):
        return pb.QueryParameter(bytes_value=bytes(v))
    raise TypeError(f"unsupported query parameter type: {type(v).__name__}")


class SiloClient:
    """Async client of a Silo cluster. See the module docstring for routing and retries.

    ``servers``: seed addresses ``"host:port"`` (a list, or one comma-separated string).
    ``token``: bearer token (a string, or a function/coroutine function returning one)
    sent as ``authorization: Bearer <token>``. ``tls``: True for TLS with the system
    roots, or a ``grpc.ChannelCredentials``. ``rpc_timeout_s``: deadline of each RPC
    (None = no deadline). ``address_map``: rewrites advertised addresses (a dict or a
    function). ``topology_refresh_interval_s``: periodic reload, 0 = off.
    """

    def __init__(
        self,
        servers: str | Sequence[str | tuple[str, int]],
        *,
        token: Token = None,
        tls: bool | grpc.ChannelCredentials = False,
        max_retries: int = 8,
        retry_delay_s: float = 0.25,
        max_retry_delay_s: float = 5.0,
        topology_refresh_interval_s: float = 30.0,
        topology_refresh_timeout_s: float = 10.0,
        rpc_timeout_s: float | None = 30.0,
        address_map: dict[str, str] | Callable[[str], str] | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self.seeds = _normalize_servers(servers)
        self.max_retries = max_retries
        self.retry_delay_s = retry_delay_s
        self.max_retry_delay_s = max_retry_delay_s
        self.topology_refresh_interval_s = topology_refresh_interval_s
        self.topology_refresh_timeout_s = topology_refresh_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.stats = ClientStats()
        if isinstance(address_map, dict):
            mapping = dict(address_map)
            self._address_map: Callable[[str], str] | None = lambda a: mapping.get(a, a)
        else:
            self._address_map = address_map
        if tls is True:
            self._creds: grpc.ChannelCredentials | None = grpc.ssl_channel_credentials()
        elif isinstance(tls, grpc.ChannelCredentials):
            self._creds = tls
        else:
            self._creds = None
        self._options = (list(channel_options) if channel_options is not None
                         else default_channel_options())
        self._token = token
        self._static_md: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if isinstance(token, str) else
            None if token is not None else ())
        self._conns: dict[str, _Conn] = {}
        self._rr = itertools.count()
        self._topology: Topology | None = None
        self._loading: asyncio.Future[Topology] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> SiloClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the periodic refresh and close every channel (in-flight calls are cancelled)."""
        self._closed = True
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None
        conns, self._conns = list(self._conns.values()), {}
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*(c.channel.close() for c in conns), return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # ---- connections -------------------------------------------------------------------

    def _conn(self, addr: str) -> _Conn:
        c = self._conns.get(addr)
        if c is None:
            if self._closed:
                raise SiloError("SiloClient is closed")
            if self._creds is not None:
                ch = grpc.aio.secure_channel(addr, self._creds, options=self._options)
            else:
                ch = grpc.aio.insecure_channel(addr, options=self._options)
            c = self._conns[addr] = _Conn(addr, ch)
        return c

    def _any_conn(self, index: int | None = None) -> _Conn:
        conns = list(self._conns.values())
        if not conns:
            return self._conn(self.seeds[0])
        i = next(self._rr) if index is None else index
        return conns[i % len(conns)]

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._static_md is not None:
            return self._static_md
        tok = self._token() if callable(self._token) else self._token
        if inspect.isawaitable(tok):
            tok = await tok
        return (("authorization", f"Bearer {tok}"),) if tok else ()

    @property
    def addresses(self) -> list[str]:
        """Addresses of the current connections (the advertised ones once discovered)."""
        return list(self._conns)

    # ---- topology ----------------------------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        return self._topology

    async def get_topology(self) -> Topology:
        t = self._topology
        return t if t is not None else await self.refresh_topology()

    async def refresh_topology(self) -> Topology:
        """Reload the shard map from GetClusterInfo; concurrent callers share one load."""
        fut = self._loading
        if fut is None:
            fut = self._loading = asyncio.ensure_future(self._load_topology())

            def _clear(f: asyncio.Future[Topology]) -> None:
                if self._loading is f:
                    self._loading = None
                if not f.cancelled():
                    f.exception()  # mark retrieved
            fut.add_done_callback(_clear)
        return await asyncio.shield(fut)

    async def _load_topology(self) -> Topology:
        candidates = list(self._conns) + [s for s in self.seeds if s not in self._conns]
        md = await self._metadata()
        last: grpc.RpcError | None = None
        last_addr = ""
        for addr in candidates:
            try:
                info = await self._conn(addr).stub.GetClusterInfo(
                    pb.GetClusterInfoRequest(), timeout=self.topology_refresh_timeout_s,
                    metadata=md)
            except grpc.RpcError as e:
                last, last_addr = e, addr
                continue
            self._install(Topology.from_cluster_info(info, self._address_map))
            assert self._topology is not None
            return self._topology
        detail = ""
        code = None
        if last is not None:
            err = from_rpc_error(last)
            code = err.code
            detail = f" (last: {last_addr}: {err.code_name}: {err.message})"
        raise TopologyError(f"Failed to refresh cluster topology from any server{detail}", code)

    def _install(self, topo: Topology) -> None:
        self.stats.topology_refreshes += 1
        advertised = set(topo.addresses)
        for a in topo.addresses:
            self._conn(a)
        for a in [a for a in self._conns if a not in advertised]:
            # Not advertised (e.g. a seed alias): close it, letting in-flight calls finish.
            self._spawn(self._conns.pop(a).channel.close(grace=5.0))
        self._topology = topo
        if self._periodic is None and self.topology_refresh_interval_s > 0 and not self._closed:
            self._periodic = asyncio.ensure_future(self._refresh_periodically())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.topology_refresh_interval_s)
            # On failure keep the last good topology; routed calls retry on their own.
            with contextlib.suppress(SiloError, grpc.RpcError):
                await self.refresh_topology()

    async def shard_for_tenant(self, tenant: str | None) -> ShardInfo:
        """The shard (id, owner address, range) that serves this tenant."""
        return (await self.get_topology()).shard_for_key(hash_tenant(tenant))

    async def get_cluster_info(self) -> pb.GetClusterInfoResponse:
        """The raw GetClusterInfo reply of one server (round-robin)."""
        return await self._unrouted("GetClusterInfo", pb.GetClusterInfoRequest())

    # ---- call machinery -----------------------------------------------------------------

    async def _backoff(self, attempt: int, e: grpc.RpcError, shard_id: str | None) -> None:
        """Sleep, then repair routing after a retryable error (attempt counts from 1)."""
        delay = min(self.retry_delay_s * (2 ** (attempt - 1)), self.max_retry_delay_s)
        await asyncio.sleep(delay)
        code, msg = e.code(), e.details() or ""
        if is_wrong_shard(code, msg):
            self.stats.wrong_shard_retries += 1
            owner = trailers_of(e).get(OWNER_TRAILER)
            topo = self._topology
            if owner and shard_id is not None and topo is not None and shard_id in topo.by_id:
                if self._address_map is not None:
                    owner = self._address_map(owner)
                topo.set_owner(shard_id, owner)
                self._conn(owner)
                return
        else:
            self.stats.connectivity_retries += 1
        await self.refresh_topology()

    @staticmethod
    def _retryable(e: grpc.RpcError) -> bool:
        code, msg = e.code(), e.details() or ""
        return is_wrong_shard(code, msg) or is_connectivity(code, msg)

    async def _routed(self, key: str, method: str, req: Any, *, op: str = "",
                      job_id: str | None = None, tenant: str | None = None,
                      prepare: Callable[[str], None] | None = None) -> Any:
        """Send ``req`` to the shard owning hash ``key``; its ``shard`` field is set here
        (or ``prepare(shard_id)`` is called instead)."""
        attempt = 0
        md = self._static_md if self._static_md is not None else await self._metadata()
        while True:
            topo = self._topology
            if topo is None:
                topo = await self.refresh_topology()
            shard = topo.shard_for_key(key)
            if prepare is None:
                req.shard = shard.shard_id
            else:
                prepare(shard.shard_id)
            conn = self._conns.get(shard.grpc_addr) or self._conn(shard.grpc_addr)
            try:
                return await getattr(conn.stub, method)(req, timeout=self.rpc_timeout_s,
                                                        metadata=md)
            except grpc.RpcError as e:
                if attempt >= self.max_retries or not self._retryable(e):
                    raise from_rpc_error(e, op=op, job_id=job_id, tenant=tenant) from e
                attempt += 1
                await self._backoff(attempt, e, shard.shard_id)

    async def _by_shard(self, shard_id: str, method: str, req: Any, *, op: str = "") -> Any:
        """Send ``req`` to the owner of ``shard_id`` (round-robin when it is unknown)."""
        attempt = 0
        md = self._static_md if self._static_md is not None else await self._metadata()
        while True:
            topo = self._topology
            if topo is None:
                topo = await self.refresh_topology()
            s = topo.by_id.get(shard_id)
            conn = (self._conns.get(s.grpc_addr) or self._conn(s.grpc_addr)) if s else \
                self._any_conn()
            try:
                return await getattr(conn.stub, method)(req, timeout=self.rpc_timeout_s,
                                                        metadata=md)
            except grpc.RpcError as e:
                if attempt >= self.max_retries or not self._retryable(e):
                    raise from_rpc_error(e, op=op) from e
                attempt += 1
                await self._backoff(attempt, e, shard_id)

    async def _unrouted(self, method: str, req: Any, *, index: int | None = None,
                        timeout: float | None = -1.0) -> Any:
        """Send ``req`` to one server (round-robin, or the ``index``-th connection)."""
        attempt = 0
        md = self._static_md if self._static_md is not None else await self._metadata()
        if self._topology is None:
            await self.refresh_topology()
        while True:
            conn = self._any_conn(None if index is None else index + attempt)
            try:
                return await getattr(conn.stub, method)(
                    req, timeout=self.rpc_timeout_s if timeout == -1.0 else timeout,
                    metadata=md)
            except grpc.RpcError as e:
                if attempt >= self.max_retries or not is_connectivity(e.code(),
                                                                      e.details() or ""):
                    raise from_rpc_error(e) from e
                attempt += 1
                await self._backoff(attempt, e, None)

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

    async def query(self, sql: str, tenant: str | None = None,
                    params: Sequence[Any] | None = None) -> QueryResult:
        """Run read-only SQL on the tenant's shard; rows are decoded msgpack maps."""
        req = pb.QueryRequest(sql=sql)
        if tenant:
            req.tenant = tenant
        if params:
            req.parameters.extend(_query_param(p) for p in params)
        m = await self._routed(hash_tenant(tenant), "Query", req, tenant=tenant)
        return QueryResult([(c.name, c.data_type) for c in m.columns],
                           [decode_tolerant(r.msgpack) for r in m.rows])

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

