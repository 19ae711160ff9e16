"""Acknowledged jobs survive kill -9; leases of running jobs expire and retry after restart."""

from __future__ import annotations

import asyncio
import time

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from tests.integration.harness import CHANNEL_OPTIONS, Server


async def _enqueue_all(addr: str, shard: str, n: int) -> list[str]:
    async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.SiloStub(ch)
        sem = asyncio.Semaphore(200)

        async def one(i: int) -> str:
            async with sem:
                r = await stub.Enqueue(pb.EnqueueRequest(
                    shard=shard, id=f"job-{i}", task_group="dur", priority=i % 100,
                    payload=pb.SerializedBytes(msgpack=i.to_bytes(4, "big"))), timeout=60)
                return r.id
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_acknowledged_jobs_survive_kill_9(tmp_path):
    # 3 s leases. The five leased jobs are Running after the restart until their lease
    # (taken before the kill) runs out; on a slow machine the restart plus 2,000 GetJobs
    # can outlast it, so a job seen Failed is accepted only once its lease has expired.
    srv = Server(tmp_path / "data", "--lease-ms", "3000", "--reaper-interval-ms", "100")
    with srv:
        c = srv.client()
        shard = c.shard_for(None)
        acked = asyncio.run(_enqueue_all(srv.addr, shard, 2000))
        running = c.lease(5, "dur")  # these five are Running when the server dies
        leased_at = time.monotonic()
        srv.kill()  # SIGKILL right after the last ack
        c.channel.close()
    assert len(acked) == 2000
    running_ids = {t.job_id for t in running}
    with Server(tmp_path / "data", "--lease-ms", "3000", "--reaper-interval-ms", "100") as srv2:
        c2 = srv2.client()
        assert c2.shard_for(None) == shard  # same shard map, same shard ids
        order = sorted(range(len(acked)), key=lambda i: acked[i] not in running_ids)
        for i in order:  # the five running jobs first, while their leases are young
            jid = acked[i]
            job = c2.get(jid)
            assert job.payload.msgpack == i.to_bytes(4, "big")
            if jid not in running_ids:
                assert job.status == pb.JOB_STATUS_SCHEDULED, jid
            elif job.status != pb.JOB_STATUS_RUNNING:
                assert job.status == pb.JOB_STATUS_FAILED, jid
                assert time.monotonic() - leased_at >= 3.0, (jid, "failed before its lease ran out")
        info = c2.stub.GetNodeInfo(pb.GetNodeInfoRequest())
        assert sum(s.total_jobs for s in info.owned_shards) == 2000
        # The dead worker's leases expire (3 s) and the reaper fails them as WORKER_CRASHED.
        deadline = time.time() + 15
        pending = set(running_ids)
        while pending and time.time() < deadline:
            for jid in list(pending):
                if c2.get(jid).status == pb.JOB_STATUS_FAILED:
                    pending.discard(jid)
            time.sleep(0.1)
        assert not pending
        job = c2.get(next(iter(running_ids)), attempts=True)
        assert job.attempts[0].error_code == "WORKER_CRASHED"
        leased = 0
        while True:
            got = c2.lease(500, "dur")
            if not got:
                break
            leased += len(got)
        assert leased == 2000 - len(running_ids)
        c2.channel.close()


def test_sigterm_flushes_and_exits_zero(tmp_path):
    srv = Server(tmp_path / "data")
    with srv:
        c = srv.client()
        ids = [c.enqueue(task_group="t") for _ in range(20)]
        c.channel.close()
        assert srv.stop() == 0
    with Server(tmp_path / "data") as srv2:
        c2 = srv2.client()
        assert all(c2.get(j).status == pb.JOB_STATUS_SCHEDULED for j in ids)
        c2.channel.close()
