"""The web UI's only way to the data: the gRPC service's own handlers, called in process.

A page calls `Backend.call("CancelJob", request)` with the protobuf request a client
would send. It runs through the same `rpc` wrapper as a network call (auth check,
forwarding to the worker process that owns the shard, error mapping), with a minimal
stand-in for the gRPC servicer context, so the web UI cannot drift from the API and
never touches storage itself. A refused call raises `BackendError` carrying the gRPC
status and message, which pages show as they are, with the matching HTTP status.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pyarrow as pa

from silo._proto import silo_pb2 as pb
from silo.errors import SiloError
from silo.storage.db import StorageError

# gRPC status → the HTTP status of the page that shows it.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class BackendError(Exception):
    """The service refused the call: its gRPC status and message, unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class _Context:
    """Just enough of grpc.aio.ServicerContext for the service's handlers."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata
        self.trailing: tuple = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, trailers) -> None:
        self.trailing = tuple(trailers)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def peer(self) -> str:
        return "web-ui"

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        raise BackendError(code, details)


CALL_TIMEOUT_S = 10.0


class Backend:
    """Calls SiloService methods by name, as an in-process client.

    Every call has a deadline, like a client's: a page must answer (504) even when the
    worker process that owns the shard is stuck."""

    def __init__(self, service: Any, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.service = service
        self.timeout_s = timeout_s
        token = getattr(service, "auth_token", "")
        # The operator already proved the token to the web UI; the call carries it on.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    @property
    def node(self) -> Any:
        """The node's static facts (shard map, owners, tenancy): never storage."""
        return self.service.node

    async def call(self, method: str, request: Any) -> Any:
        ctx = _Context(self._metadata)
        try:
            out = await asyncio.wait_for(getattr(self.service, method)(request, ctx),
                                         self.timeout_s)
        except TimeoutError:
            raise BackendError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"{method} did not answer within {self.timeout_s:g} s") from None
        if ctx.code not in (None, grpc.StatusCode.OK):
            raise BackendError(ctx.code, ctx.details)
        return out

    def as_caller(self) -> None:
        """Calls this task forwards to other worker processes (the cluster query's shard
        reads, the task-group figures) carry the token, as a client's call's would."""
        from silo.runtime import forward  # noqa: PLC0415

        forward.enter_call(_Context(self._metadata))

    async def query_all(self, sql: str, params: list | None = None) -> pa.Table:
        """One SQL statement over every shard of the node (silo.query.cluster), with
        parameters bound by the engine ($1..$n), never formatted into the text."""
        from silo.query import cluster  # noqa: PLC0415 - the engine loads on first use

        try:
            self.as_caller()
            return await asyncio.wait_for(cluster.query_all(self.node, sql, params or []),
                                          self.timeout_s)
        except SiloError as e:
            raise BackendError(e.code, e.message) from None
        except StorageError as e:
            raise BackendError(grpc.StatusCode.UNAVAILABLE,
                               f"shard storage unavailable: {e}") from None
        except TimeoutError:
            raise BackendError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"the query did not answer within {self.timeout_s:g} s") from None

    async def query_shard(self, shard: str, sql: str, params: list | None = None
                          ) -> pb.QueryResponse:
        """One statement over one shard, through the Query RPC (forwarded to its owner)."""
        from silo.query import cluster  # noqa: PLC0415

        return await self.call("Query", pb.QueryRequest(
            shard=shard, sql=sql, parameters=cluster.params_to_pb(params or [])))

    # ---- the calls pages make ------------------------------------------------------

    async def cluster_info(self) -> pb.GetClusterInfoResponse:
        return await self.call("GetClusterInfo", pb.GetClusterInfoRequest())

    async def node_info(self) -> pb.GetNodeInfoResponse:
        return await self.call("GetNodeInfo", pb.GetNodeInfoRequest())

    def _job_request(self, cls: Any, shard: str, job_id: str, tenant: str | None, **kw) -> Any:
        req = cls(shard=shard, id=job_id, **kw)
        if tenant:
            req.tenant = tenant
        return req

    async def get_job(self, shard: str, job_id: str, tenant: str | None) -> pb.GetJobResponse:
        return await self.call("GetJob", self._job_request(
            pb.GetJobRequest, shard, job_id, tenant, include_attempts=True))

    async def job_action(self, action: str, shard: str, job_id: str,
                         tenant: str | None) -> Any:
        method, cls = JOB_ACTIONS[action]
        return await self.call(method, self._job_request(cls, shard, job_id, tenant))

    async def flush_shard(self, shard: str) -> pb.FlushShardResponse:
        return await self.call("FlushShard", pb.FlushShardRequest(shard=shard))

    async def compact_shard(self, shard: str) -> Any:
        return await self.call("CompactShard", pb.CompactShardRequest(shard=shard))

    async def drop_tenant_holders(self, shard: str, tenant: str) -> int:
        out = await self.call("DropTenantHolders",
                              pb.DropTenantHoldersRequest(shard=shard, tenant=tenant))
        return out.holders_dropped


JOB_ACTIONS = {
    "cancel": ("CancelJob", pb.CancelJobRequest),
    "restart": ("RestartJob", pb.RestartJobRequest),
    "expedite": ("ExpediteJob", pb.ExpediteJobRequest),
    "delete": ("DeleteJob", pb.DeleteJobRequest),
}
