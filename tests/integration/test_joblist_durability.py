"""The enqueue-time indexes stay exactly the job infos' after kill -9 mid-enqueue and a
restart: the job list pages through every job once, and the rows on disk match."""

from __future__ import annotations

import asyncio
import os

import grpc
import msgspec

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.cluster.shardmap import load_or_create
from silo.config import load_config
from silo.shard.state import Shard, ShardConfig
from silo.web import joblist
from tests.integration.harness import CHANNEL_OPTIONS, Server
from tests.unit.test_indexes import time_rows


async def _enqueue(addr: str, shard: str, ids: range, stop_after: int | None = None,
                   kill=None) -> list[str]:
    """Enqueue jobs (200 in flight); with stop_after, kill the server once that many are
    acked, the rest still in flight, and return."""
    acked: list[str] = []
    done = asyncio.Event()
    async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.SiloStub(ch)
        sem = asyncio.Semaphore(200)

        async def one(i: int) -> None:
            async with sem:
                try:
                    r = await stub.Enqueue(pb.EnqueueRequest(
                        shard=shard, id=f"job-{i:05d}", task_group=f"g{i % 2}",
                        metadata={"k": f"v{i % 3}"},
                        payload=pb.SerializedBytes(msgpack=b"\x80")), timeout=60)
                except grpc.aio.AioRpcError:
                    return  # the server died under it
                acked.append(r.id)
                if stop_after is not None and len(acked) == stop_after:
                    kill()  # SIGKILL with ~200 calls in flight
                    done.set()
        tasks = [asyncio.ensure_future(one(i)) for i in ids]
        if stop_after is None:
            await asyncio.gather(*tasks)
        else:
            await done.wait()
    return acked


def _pages(c, shard: str, f: joblist.Filters) -> list[str]:
    out, cursor = [], None
    while True:
        sql, params = joblist.build(f, cursor, 101)
        from silo.query import cluster  # noqa: PLC0415

        resp = c.stub.Query(pb.QueryRequest(shard=shard, sql=sql,
                                            parameters=cluster.params_to_pb(params)))
        rows = [_row(resp, r) for r in resp.rows]
        page, older, _ = joblist.page_of(rows, cursor, 100, joblist.order_column(f))
        out += [r["id"] for r in page]
        if older is None:
            return out
        cursor = older


def _row(_resp, r) -> dict:
    return msgspec.msgpack.decode(r.msgpack)


def test_time_indexes_survive_kill_9_mid_enqueue(tmp_path):
    data = tmp_path / "data"
    with Server(data) as srv:
        c = srv.client()
        shard = c.shard_for(None)
        first = asyncio.run(_enqueue(srv.addr, shard, range(400)))
        # More enqueues in flight when the process dies.
        asyncio.run(_enqueue(srv.addr, shard, range(400, 1400), stop_after=200,
                             kill=srv.kill))
        c.channel.close()
    assert len(first) == 400
    with Server(data) as srv2:
        c2 = srv2.client()
        every = sorted(r["id"] for r in (_row(q, x) for q in [c2.stub.Query(pb.QueryRequest(
            shard=shard, sql="SELECT id FROM jobs"))] for x in q.rows))
        assert set(first) <= set(every)
        listed = _pages(c2, shard, joblist.Filters())
        assert sorted(listed) == every and len(set(listed)) == len(listed)
        for f in (joblist.Filters(task_group="g1"),
                  joblist.Filters(meta_key="k", meta_value="v2")):
            want = [j for j in every if (f.task_group is None or int(j[4:]) % 2 == 1)
                    and (not f.meta_key or int(j[4:]) % 3 == 2)]
            assert sorted(_pages(c2, shard, f)) == want
        c2.channel.close()

    async def on_disk() -> tuple[set, set]:  # the server is stopped: open its shard
        config = load_config({"data_dir": str(data)}, os.environ, None)
        shard_map, _ = load_or_create(data, config.shards)
        e = shard_map.by_id[shard]
        s = await Shard.open(e.shard_id, e.range_start, e.range_end,
                             config.object_store_url_resolved(), ShardConfig())
        try:
            return await time_rows(s)
        finally:
            await s.close()
    want, have = asyncio.run(on_disk())
    assert want and have == want
