"""Query, QueryArrow and SiloQuery.QueryAll against the real server (two worker
processes, so calls for the other process's shards are forwarded)."""

from __future__ import annotations

import grpc
import msgspec
import pyarrow as pa
import pytest

from silo._proto import silo_pb2 as pb
from silo._proto import silo_query_ext_pb2 as ext
from silo._proto import silo_query_ext_pb2_grpc as ext_grpc
from tests.integration.harness import Server

TENANTS = [f"t{i}" for i in range(12)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("q"), "--tenancy", "--processes", "2") as s:
        c = s.client()
        for n, t in enumerate(TENANTS):
            for i in range(n + 1):
                c.enqueue(t, id=f"{t}-{i}", priority=i, metadata={"env": "prod"})
        c.channel.close()
        yield s


def query(c, tenant, sql, *params):
    req = pb.QueryRequest(shard=c.shard_for(tenant), sql=sql, tenant=tenant,
                          parameters=list(params))
    return c.stub.Query(req, timeout=30)


def test_rows_are_msgpack_maps_with_compact_ints(srv):
    c = srv.client()
    r = query(c, "t3", "SELECT id, priority, COUNT(*) OVER () AS count FROM jobs "
                       "WHERE tenant = $1 AND id = 't3-2'", pb.QueryParameter(string_value="t3"))
    assert [(x.name, x.data_type) for x in r.columns] == [
        ("id", "Utf8"), ("priority", "UInt8"), ("count", "Int64")]
    assert r.row_count == 1
    raw = r.rows[0].msgpack
    assert msgspec.msgpack.decode(raw) == {"id": "t3-2", "priority": 2, "count": 1}
    # positive fixints, not 0xcc/0xd3-prefixed wide ints
    assert b"\xa8priority\x02" in raw and b"\xa5count\x01" in raw


def test_query_arrow_streams_ipc_messages(srv):
    c = srv.client()
    for t in ("t5", "t6"):  # shards of both processes
        msgs = list(c.stub.QueryArrow(pb.QueryArrowRequest(
            shard=c.shard_for(t), sql=f"SELECT id, priority FROM jobs WHERE tenant = '{t}' "
                                      "ORDER BY priority"), timeout=30))
        table = pa.concat_tables(pa.ipc.open_stream(m.ipc_data).read_all() for m in msgs)
        assert table.column("priority").to_pylist() == list(range(int(t[1:]) + 1))
        assert table.schema.field("priority").type == pa.uint8()


def test_query_all_aggregates_equal_the_per_shard_sums(srv):
    c = srv.client()
    per_shard = 0
    shards = {c.shard_for(t) for t in TENANTS}
    for sid in shards:
        r = c.stub.Query(pb.QueryRequest(shard=sid, sql="SELECT COUNT(*) AS n FROM jobs"))
        per_shard += msgspec.msgpack.decode(r.rows[0].msgpack)["n"]
    stub = ext_grpc.SiloQueryStub(c.channel)
    r = stub.QueryAll(ext.QueryAllRequest(sql="SELECT COUNT(*) AS n, SUM(priority) AS p, "
                                              "COUNT(DISTINCT shard_id) AS s FROM jobs"))
    row = msgspec.msgpack.decode(r.rows[0].msgpack)
    assert row["n"] == per_shard == sum(range(1, 13))
    assert row["p"] == sum(sum(range(n + 1)) for n in range(12))
    assert row["s"] == len(shards) and r.shard_count == 8
    r = stub.QueryAll(ext.QueryAllRequest(
        sql="SELECT tenant, COUNT(*) AS n FROM jobs GROUP BY tenant ORDER BY n DESC LIMIT 3"))
    assert [msgspec.msgpack.decode(x.msgpack) for x in r.rows] == [
        {"tenant": "t11", "n": 12}, {"tenant": "t10", "n": 11}, {"tenant": "t9", "n": 10}]


def test_routing_and_sql_errors(srv):
    c = srv.client()
    cases = [
        (pb.QueryRequest(shard="nope", sql="SELECT 1"), grpc.StatusCode.INVALID_ARGUMENT,
         "invalid shard ID"),
        (pb.QueryRequest(shard="00000000-0000-4000-8000-000000000000", sql="SELECT 1"),
         grpc.StatusCode.NOT_FOUND, "shard not found"),
        (pb.QueryRequest(shard=c.shard_for("t1"), sql="SELECT x FROM jobs"),
         grpc.StatusCode.INVALID_ARGUMENT, "SQL error"),
        (pb.QueryRequest(shard=c.shard_for("t1"), sql="DELETE FROM jobs"),
         grpc.StatusCode.INVALID_ARGUMENT, "DML not supported"),
        (pb.QueryRequest(shard=c.shard_for("t1"), sql="SELECT $1",
                         parameters=[pb.QueryParameter()]),
         grpc.StatusCode.INVALID_ARGUMENT, "query parameter is missing a value"),
    ]
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            c.stub.Query(req, timeout=30)
        assert e.value.code() == code and text in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(c.stub.QueryArrow(pb.QueryArrowRequest(shard=req.shard, sql=req.sql,
                                                        parameters=req.parameters), timeout=30))
        assert e.value.code() == code and text in e.value.details()


def test_limits_from_config(tmp_path):
    with Server(tmp_path, "--max-result-bytes", "10", "--shards", "1") as s:
        c = s.client()
        c.enqueue(None, id="a")
        with pytest.raises(grpc.RpcError) as e:
            query(c, None, "SELECT * FROM jobs")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_result_bytes" in e.value.details()
        # QueryArrow has no result cap
        assert list(c.stub.QueryArrow(pb.QueryArrowRequest(
            shard=c.shard_for(None), sql="SELECT * FROM jobs"), timeout=30))
        c.channel.close()


def ids_of(r) -> list[str]:
    return [msgspec.msgpack.decode(x.msgpack)["id"] for x in r.rows]


def test_indexes_survive_restart_and_kill_9(tmp_path):
    data = tmp_path / "data"
    s = Server(data, "--shards", "2").start()
    try:
        c = s.client()
        for i in range(5):
            c.enqueue(None, id=f"j{i}", metadata={"k": f"v{i}"})
        [t] = c.lease(1)
        c.succeed(t)
        done = t.job_id
        c.channel.close()
    finally:
        s.kill()  # SIGKILL right after the last ack
    with Server(data, "--shards", "2") as s:
        c = s.client()
        for word in ("Succeeded", "succeeded"):
            r = query(c, None, f"SELECT id FROM jobs WHERE tenant = '-' AND status_kind = '{word}'")
            assert ids_of(r) == [done]
        r = query(c, None, "SELECT id FROM jobs WHERE tenant = '-' AND "
                           "array_contains(element_at(metadata, 'k'), 'v3')")
        assert ids_of(r) == ["j3"]
        # A transition after the restart moves the index row of a reloaded active job.
        [t] = c.lease(1)
        c.channel.close()
    with Server(data, "--shards", "2") as s:
        c = s.client()
        r = query(c, None, "SELECT id FROM jobs WHERE tenant = '-' AND status_kind = 'Running'")
        assert ids_of(r) == [t.job_id]
        r = query(c, None, "SELECT COUNT(*) AS n FROM jobs WHERE tenant = '-' AND "
                           "status_kind = 'Waiting'")
        assert msgspec.msgpack.decode(r.rows[0].msgpack) == {"n": 3}
        c.channel.close()


def test_sdk_query_query_arrow_and_all_shards(srv):
    import asyncio  # noqa: PLC0415

    from silo.client import SiloClient  # noqa: PLC0415

    async def body():
        async with SiloClient([srv.addr], topology_refresh_interval_s=0) as c:
            r = await c.query("SELECT id, priority FROM jobs WHERE tenant = $1 AND "
                              "priority >= $2 ORDER BY priority", "t4", 3, tenant="t4")
            assert r.rows == [{"id": "t4-3", "priority": 3}, {"id": "t4-4", "priority": 4}]
            assert r.columns == [("id", "Utf8"), ("priority", "UInt8")]
            t = await c.query_arrow("SELECT id FROM jobs WHERE tenant = $1 ORDER BY id", "t2",
                                    tenant="t2")
            assert t.column("id").to_pylist() == ["t2-0", "t2-1", "t2-2"]
            r = await c.query("SELECT COUNT(*) AS n FROM jobs", all_shards=True)
            assert r.rows == [{"n": 78}]

    asyncio.run(asyncio.wait_for(body(), 60))


def test_cli_query_table_json_csv(srv):
    import json  # noqa: PLC0415

    from tests.integration.test_cli_client import silo  # noqa: PLC0415

    p = silo("query", "--tenant", "t1", "-p", "t1", "SELECT id, priority FROM jobs WHERE "
             "tenant = $1 ORDER BY id", server=srv)
    assert p.stdout.splitlines() == ["id    priority", "----  --------", "t1-0  0",
                                     "t1-1  1", "(2 rows)"]
    p = silo("query", "--all-shards", "--json", "SELECT COUNT(*) AS n FROM jobs", server=srv)
    assert json.loads(p.stdout)["rows"] == [{"n": 78}]
    p = silo("query", "--tenant", "t0", "--csv", "SELECT id, metadata FROM jobs WHERE "
             "tenant = 't0'", server=srv)
    assert p.stdout.splitlines() == ["id,metadata", "t0-0,{env: prod}"]
