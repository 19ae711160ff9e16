"""Query, QueryArrow (silo.v1) and SiloQuery.QueryAll (our extension) over gRPC.

Routing and errors are those of every shard RPC (silo.rpc.service); the tenant field
of Query/QueryArrow is ignored (behaviour.md §1.2: the SQL filters by tenant itself).
A call for a shard of another worker process is forwarded there: QueryArrow's
forwarded form returns all its IPC messages in one reply (ArrowBatches), relayed
here as the stream.

The engine (DataFusion, pyarrow: ~0.3 s of imports and ~70 MB of RSS) is imported at a
process's first statement, not at start-up: a server that only leases never loads it
(tests/integration/test_lazy_imports.py).
"""

from __future__ import annotations

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_query_ext_pb2 as ext
from silo._proto import silo_query_ext_pb2_grpc as ext_grpc
from silo.errors import SiloError
from silo.rpc import guard
from silo.storage.db import StorageError


def _engine():
    """The query modules, imported on first use (see the module docstring)."""
    from silo.query import cluster, engine, wire  # noqa: PLC0415

    return cluster, engine, wire


def _response(table, cls):
    _, _, wire = _engine()
    return cls(columns=[pb.ColumnInfo(name=n, data_type=t) for n, t in wire.columns(table.schema)],
               rows=[pb.SerializedBytes(msgpack=r) for r in wire.rows(table)],
               row_count=table.num_rows)


async def query(service, request) -> pb.QueryResponse:
    """The body of Query: one statement over the named shard."""
    cluster, engine, _ = _engine()
    shard = service.shard(request.shard)
    params = cluster.params_from_pb(request.parameters)
    table = await engine.query_shard(shard, request.sql, params)
    engine.check_result_size(table)
    return _response(table, pb.QueryResponse)


async def query_arrow_forwarded(service, request, _context) -> object:
    """QueryArrow as served for another worker process of this node (one reply)."""
    cluster, engine, wire = _engine()
    shard = service.shard(request.shard)
    params = cluster.params_from_pb(request.parameters)
    if request.tenant == cluster.SCAN_MARKER:
        planned = engine.plan(request.sql, params)
        return cluster.shard_tables_message(
            await engine.read_shard(shard, planned, shard.now()))
    table = await engine.query_shard(shard, request.sql, params)
    return ext.ArrowBatches(ipc_data=wire.ipc_messages(table))


async def _abort(context, e: Exception) -> None:
    if isinstance(e, SiloError):
        if e.trailers:
            context.set_trailing_metadata(e.trailers)
        await context.abort(e.code, guard.bounded(e.message))
    await context.abort(grpc.StatusCode.UNAVAILABLE,
                        guard.bounded(f"shard storage unavailable: {e}"))


async def query_arrow(service, request, context):
    """The body of QueryArrow: stream one IPC message per result batch."""
    from silo.rpc.service import _OwnedElsewhere  # noqa: PLC0415 - service imports us

    try:
        if service.auth_token:
            service.check_auth(context)
        if isinstance(request, bytes):  # registered raw (silo.rpc.server): parse after auth
            request = guard.parse_request(pb.QueryArrowRequest, "QueryArrow", request)
        try:
            shard = service.shard(request.shard)
        except _OwnedElsewhere as moved:
            out = await service.node.peers[moved.owner].call(
                "QueryArrow", request.SerializeToString())
            messages = list(ext.ArrowBatches.FromString(out).ipc_data)
        else:
            cluster, engine, wire = _engine()
            params = cluster.params_from_pb(request.parameters)
            table = await engine.query_shard(shard, request.sql, params)
            messages = wire.ipc_messages(table)
    except (SiloError, StorageError) as e:
        await _abort(context, e)
        return
    for m in messages:
        yield pb.ArrowIpcMessage(ipc_data=m)


class SiloQueryService(ext_grpc.SiloQueryServicer):
    """siloext.query.v1.SiloQuery: statements over every shard of the node."""

    def __init__(self, service) -> None:
        self.service = service

    async def QueryAll(self, request, context):  # noqa: N802 - gRPC method name
        try:
            if self.service.auth_token:
                self.service.check_auth(context)
            cluster, engine, _ = _engine()
            params = cluster.params_from_pb(request.parameters)
            table = await cluster.query_all(self.service.node, request.sql, params)
            engine.check_result_size(table)
        except (SiloError, StorageError) as e:
            await _abort(context, e)
            return None
        resp = _response(table, ext.QueryAllResponse)
        resp.shard_count = cluster.shard_count(self.service.node)
        return resp


def add_query_service(server: grpc.aio.Server, service) -> None:
    """Serve siloext.query.v1.SiloQuery next to silo.v1.Silo on the same port."""
    ext_grpc.add_SiloQueryServicer_to_server(SiloQueryService(service), server)
