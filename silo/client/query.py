"""SQL from the SDK: Arrow results (QueryArrow) and statements over all shards of a
server (the siloext.query.v1.SiloQuery extension). SiloClient's query methods call
these; pyarrow is imported only when an Arrow result is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from silo._proto import silo_pb2 as pb
from silo.client.errors import from_rpc_error
from silo.client.routing import hash_tenant
from silo.client.types import QueryResult, decode_tolerant


def query_param(v: Any) -> pb.QueryParameter:
    """One ``$n`` bind value as a QueryParameter (ints from 2**63 up go as uint64)."""
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


def _params(params: Sequence[Any]) -> list[pb.QueryParameter]:
    return [query_param(p) for p in params]


def result_of(m: Any) -> QueryResult:
    """A QueryResponse (or QueryAllResponse) as a QueryResult, rows msgpack-decoded."""
    return QueryResult([(c.name, c.data_type) for c in m.columns],
                       [decode_tolerant(r.msgpack) for r in m.rows])


async def _target(client, tenant: str | None, shard: str | None):
    topo = client._topology or await client.refresh_topology()
    s = topo.by_id.get(shard) if shard else topo.shard_for_key(hash_tenant(tenant))
    if s is None:
        s = topo.shard_for_key(hash_tenant(tenant))
    conn = client._conns.get(s.grpc_addr) or client._conn(s.grpc_addr)
    return shard if shard else s.shard_id, conn


async def query_arrow(client, sql: str, params: Sequence[Any], *, tenant: str | None,
                      shard: str | None):
    """A QueryArrow call → one pyarrow.Table (the stream's batches concatenated)."""
    import pyarrow as pa  # noqa: PLC0415 - optional for SDK users who never ask for Arrow

    req = pb.QueryArrowRequest(sql=sql, parameters=_params(params))
    if tenant:
        req.tenant = tenant
    shard_id, conn = await _target(client, tenant, shard)
    req.shard = shard_id
    md = client._static_md if client._static_md is not None else await client._metadata()
    tables = []
    try:
        async for m in conn.stub.QueryArrow(req, timeout=client.rpc_timeout_s, metadata=md):
            tables.append(pa.ipc.open_stream(m.ipc_data).read_all())
    except grpc.RpcError as e:
        raise from_rpc_error(e, tenant=tenant) from e
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


async def query_shard(client, sql: str, params: Sequence[Any], shard: str) -> QueryResult:
    req = pb.QueryRequest(sql=sql, shard=shard, parameters=_params(params))
    m = await client._by_shard(shard, "Query", req)
    return result_of(m)


async def query_all(client, sql: str, params: Sequence[Any]) -> QueryResult:
    """SiloQuery.QueryAll on one server: the statement over every shard of that node."""
    from silo._proto import silo_query_ext_pb2 as ext  # noqa: PLC0415
    from silo._proto import silo_query_ext_pb2_grpc as ext_grpc  # noqa: PLC0415

    if client._topology is None:
        await client.refresh_topology()
    conn = client._any_conn()
    md = client._static_md if client._static_md is not None else await client._metadata()
    req = ext.QueryAllRequest(sql=sql, parameters=_params(params))
    try:
        m = await ext_grpc.SiloQueryStub(conn.channel).QueryAll(
            req, timeout=client.rpc_timeout_s, metadata=md)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from e
    return result_of(m)
