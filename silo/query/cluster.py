"""One statement over every shard of the node, evaluated once over all their rows.

Each shard contributes the rows its scans read (the same pushed-down reads as a
single-shard Query); the rows of all shards are concatenated per table and DataFusion
evaluates the statement once, so COUNT/SUM/AVG, GROUP BY, ORDER BY and LIMIT are
correct across shards (not a concatenation of per-shard answers). Shards of other
worker processes are read through the forwarding path (a QueryArrow call carrying
SCAN_MARKER as tenant, which only a forwarded call honours).

`query_all` is what the web UI calls in-process; the SiloQuery.QueryAll RPC and
`silo query --all-shards` use it too.
"""

from __future__ import annotations

import asyncio

import grpc
import pyarrow as pa

from silo._proto import silo_pb2 as pb
from silo._proto import silo_query_ext_pb2 as ext
from silo.errors import SiloError
from silo.query import engine, wire

# Marks a forwarded QueryArrow call that asks for the shard's scanned rows, not a result.
SCAN_MARKER = "\x00silo-query-scan"


def params_to_pb(params: list) -> list[pb.QueryParameter]:
    out = []
    for p in params:
        if p is None:
            out.append(pb.QueryParameter(null_value=pb.QueryNull()))
        elif isinstance(p, bool):
            out.append(pb.QueryParameter(bool_value=p))
        elif isinstance(p, int):
            out.append(pb.QueryParameter(int64_value=p) if p < 1 << 63
                       else pb.QueryParameter(uint64_value=p))
        elif isinstance(p, pa.UInt64Scalar):
            out.append(pb.QueryParameter(uint64_value=p.as_py()))
        elif isinstance(p, float):
            out.append(pb.QueryParameter(float64_value=p))
        elif isinstance(p, str):
            out.append(pb.QueryParameter(string_value=p))
        elif isinstance(p, bytes):
            out.append(pb.QueryParameter(bytes_value=p))
        else:
            raise TypeError(f"unsupported SQL parameter type: {type(p).__name__}")
    return out


def params_from_pb(parameters) -> list:
    """QueryParameters as DataFusion parameter values (uint64 kept unsigned)."""
    from silo import errors  # noqa: PLC0415

    out: list = []
    for p in parameters:
        which = p.WhichOneof("value")
        if which is None:
            raise errors.invalid("query parameter is missing a value")
        if which == "null_value":
            out.append(None)
        elif which == "uint64_value":
            out.append(pa.scalar(p.uint64_value, pa.uint64()))
        else:
            out.append(getattr(p, which))
    return out


def shard_tables_message(tables: dict[str, pa.Table]) -> ext.ShardTables:
    names = sorted(tables)
    return ext.ShardTables(names=names, ipc_data=[wire.ipc_table(tables[n]) for n in names])


async def _remote_tables(peer, shard_id: str, sql: str, params: list) -> dict[str, pa.Table]:
    req = pb.QueryArrowRequest(shard=shard_id, sql=sql, tenant=SCAN_MARKER,
                               parameters=params_to_pb(params))
    msg = ext.ShardTables.FromString(await peer.call("QueryArrow", req.SerializeToString()))
    return {n: wire.read_ipc(d) for n, d in zip(msg.names, msg.ipc_data, strict=True)}


async def query_all(node, sql: str, params: list | None = None) -> pa.Table:
    """Run sql over every shard of the node (all worker processes) → one Arrow table."""
    params = list(params or [])
    local = list(node.shards.values())
    remote: list[tuple[object, str]] = []
    for sid, owner in sorted(node.owner_of.items()):
        if owner != node.index and sid not in node.shards:
            peer = node.peers.get(owner)
            if peer is None:
                raise SiloError(grpc.StatusCode.UNAVAILABLE,
                                f"shard {sid} is owned by worker {owner}, which is unreachable")
            remote.append((peer, sid))

    async def read(planned: engine.Planned) -> list[dict[str, pa.Table]]:
        out = []
        for s in local:
            out.append(await engine.read_shard(s, planned, s.now()))
        out += await asyncio.gather(*(_remote_tables(p, sid, sql, params) for p, sid in remote))
        return out

    return await engine.run_statement([s.id for s in local], sql, params, read)


def shard_count(node) -> int:
    return len(node.owner_of)
