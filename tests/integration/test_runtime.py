"""The shard-per-core runtime: every process serves every RPC, forwarding to owners,
one connection drains all shards, crashed workers come back without losing jobs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from tests.integration.harness import (
    CHANNEL_OPTIONS,
    Client,
    Server,
    tenants_covering_all_shards,
)

PROCS = 2


def worker_pids(server: Server) -> list[int]:
    assert server.proc is not None
    pid = server.proc.pid
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids]


def connect_to_worker(server: Server, index: int, tries: int = 64) -> Client:
    """A client whose (single) connection landed on worker `index`."""
    for i in range(tries):
        ch = grpc.insecure_channel(server.addr, options=CHANNEL_OPTIONS + [
            ("grpc.use_local_subchannel_pool", 1), ("silo.test.nonce", i)])
        call = pb_grpc.SiloStub(ch).GetClusterInfo.with_call(pb.GetClusterInfoRequest(),
                                                             timeout=10)
        trailers = dict(call[1].trailing_metadata())
        if trailers.get("x-silo-worker") == str(index):
            return Client(ch)
        ch.close()
    raise AssertionError(f"no connection landed on worker {index}")


@pytest.fixture(scope="module")
def mp_server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("mp"), "--processes", str(PROCS), "--tenancy",
                "--shards", "8", "--dev-mode", "--lease-ms", "1000",
                "--reaper-interval-ms", "100") as s:
        yield s


def test_startup_line_and_one_pinned_worker_per_process(mp_server):
    line = next(x for x in mp_server.log if "silo serving on" in x)
    assert f"processes={PROCS}" in line
    pids = worker_pids(mp_server)
    assert len(pids) == PROCS
    cpus = [os.sched_getaffinity(p) for p in pids]
    assert all(len(c) == 1 for c in cpus) and len(set().union(*cpus)) == min(PROCS, os.cpu_count())


@pytest.mark.parametrize("index", range(PROCS))
def test_every_rpc_works_whichever_process_the_connection_lands_on(mp_server, index):
    c = connect_to_worker(mp_server, index)
    group = f"via-w{index}"
    tenants = tenants_covering_all_shards(c, per_shard=1)
    ids = {t: c.enqueue(tenant=t, task_group=group) for t in tenants}
    for t, jid in ids.items():
        assert c.get(jid, tenant=t).status == pb.JOB_STATUS_SCHEDULED
    tasks = []
    while len(tasks) < len(ids):
        got = c.lease(50, group)
        assert got, "ran dry before every shard's job was leased"
        tasks.extend(got)
    assert {t.tenant_id for t in tasks} == set(ids)
    for t in tasks:
        assert not c.heartbeat(t).cancelled
        c.succeed(t, b"\x01")
    for t, jid in ids.items():
        res = c.stub.GetJobResult(c.job_req(pb.GetJobResultRequest, jid, tenant=t))
        assert res.status == pb.JOB_STATUS_SUCCEEDED and res.success_data.msgpack == b"\x01"
        c.stub.DeleteJob(c.job_req(pb.DeleteJobRequest, jid, tenant=t))
    # errors relayed exactly from the owner
    t0 = tenants[0]
    with pytest.raises(grpc.RpcError) as e:
        c.get("missing", tenant=t0)
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND, "job not found")
    info = c.stub.GetNodeInfo(pb.GetNodeInfoRequest())
    assert len(info.owned_shards) == 8
    c.channel.close()


def test_single_connection_worker_drains_every_shard_fairly(mp_server):
    c = connect_to_worker(mp_server, 0)
    group = "fair"
    tenants = tenants_covering_all_shards(c, per_shard=3)
    for t in tenants:
        for k in range(5):
            c.enqueue(tenant=t, task_group=group, id=f"{t}-{k}")
    total = 5 * len(tenants)
    first_polls: set[str] = set()
    leased = 0
    polls = 0
    while leased < total:
        got = c.lease(4, group)
        polls += 1
        assert polls < 10 * total
        if polls <= 16:
            first_polls.update(t.shard for t in got)
        for t in got:
            c.succeed(t)
        leased += len(got)
    # Both processes' shards were served early on, not one process's after the other's.
    owners = {o.shard_id for o in c.owners}
    assert len(first_polls) >= len(owners) // 2 + 1
    c.channel.close()


def test_reset_shards_wipes_every_process(mp_server):
    c = connect_to_worker(mp_server, 1)
    tenants = tenants_covering_all_shards(c, per_shard=1)
    ids = [(t, c.enqueue(tenant=t, task_group="reset")) for t in tenants]
    assert c.stub.ResetShards(pb.ResetShardsRequest()).shards_reset == 8
    for t, jid in ids:
        with pytest.raises(grpc.RpcError) as e:
            c.get(jid, tenant=t)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    c.channel.close()


async def _enqueue_loop(addr: str, shard_of, tenants, stop: asyncio.Event, acked: list,
                        errors: list) -> None:
    async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.SiloStub(ch)
        i = 0
        while not stop.is_set():
            t = tenants[i % len(tenants)]
            i += 1
            try:
                r = await stub.Enqueue(pb.EnqueueRequest(shard=shard_of(t), tenant=t,
                                                         task_group="crash"), timeout=10)
                acked.append((t, r.id))
            except grpc.aio.AioRpcError as e:
                errors.append((t, e.code(), e.details()))
                await asyncio.sleep(0.01)


def enqueue_under_load(srv: Server, c: Client, tenants: list[str], disrupt,
                       before: float = 1.0, after: float = 4.0) -> tuple[list, list]:
    """Keep enqueueing across all tenants, call disrupt() midway; (acked, errors)."""
    async def scenario():
        stop = asyncio.Event()
        acked: list = []
        errors: list = []
        load = asyncio.create_task(
            _enqueue_loop(srv.addr, c.shard_for, tenants, stop, acked, errors))
        await asyncio.sleep(before)
        disrupt()
        await asyncio.sleep(after)
        stop.set()
        await load
        return acked, errors

    return asyncio.run(scenario())


def test_killed_worker_restarts_and_loses_nothing(tmp_path):
    with Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "8") as srv:
        c = srv.client()
        tenants = tenants_covering_all_shards(c, per_shard=1)
        victim = worker_pids(srv)[1]
        acked, errors = enqueue_under_load(srv, c, tenants,
                                           lambda: os.kill(victim, signal.SIGKILL))
        # The dead worker's shards answered UNAVAILABLE (never a hang, never "shard not
        # found") until its replacement reopened them; the rest kept serving.
        assert all(code == grpc.StatusCode.UNAVAILABLE for _, code, _ in errors), errors[:3]
        assert not any("shard not found" in d for _, _, d in errors)
        assert len(acked) > 100
        deadline = time.time() + 30
        while time.time() < deadline and (victim in worker_pids(srv)
                                          or len(worker_pids(srv)) < PROCS):
            time.sleep(0.1)
        assert victim not in worker_pids(srv) and len(worker_pids(srv)) == PROCS
        assert any("restarting" in x for x in srv.log)
        # every acknowledged job is there, on every shard
        for t, jid in acked:
            assert c.get(jid, tenant=t).status == pb.JOB_STATUS_SCHEDULED
        c.channel.close()


def test_sigterm_under_load_exits_zero_and_keeps_every_ack(tmp_path):
    srv = Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "4")
    with srv:
        c = srv.client()
        tenants = tenants_covering_all_shards(c, per_shard=1)

        acked, _ = enqueue_under_load(srv, c, tenants,
                                      lambda: srv.proc.send_signal(signal.SIGTERM),
                                      after=1.5)
        assert srv.proc.wait(60) == 0
        c.channel.close()
    with Server(tmp_path / "d", "--tenancy") as srv2:
        c2 = srv2.client()
        for t, jid in acked:
            assert c2.get(jid, tenant=t).status == pb.JOB_STATUS_SCHEDULED
        c2.channel.close()


def test_fenced_shard_storage_restarts_its_worker(tmp_path):
    """Another opener fences a shard's database: the owning worker's next write fails,
    the caller gets UNAVAILABLE, the worker exits and the supervisor brings it back."""
    from slatedb.uniffi import DbBuilder, ObjectStore

    with Server(tmp_path / "d", "--processes", str(PROCS)) as srv:
        c = srv.client()
        shard = c.shard_for(None)
        before = c.enqueue(task_group="fence")
        path = str((tmp_path / "d" / "objects" / "shards" / shard).resolve()).lstrip("/")

        async def fence():
            db = await DbBuilder(path, ObjectStore.resolve("file:///")).build()
            return db

        intruder = asyncio.run(fence())
        with pytest.raises(grpc.RpcError) as e:
            c.enqueue(task_group="fence")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.time() + 30
        after = None
        while after is None and time.time() < deadline:
            try:
                after = c.enqueue(task_group="fence")
            except grpc.RpcError as err:
                # While the worker is replaced: UNAVAILABLE, or CANCELLED for a call
                # caught by the old process's exit; never NOT_FOUND or a hang.
                assert err.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.CANCELLED), err.details()
                time.sleep(0.2)
        assert after is not None
        assert any("shard storage failed" in x for x in srv.log)
        assert c.get(before).status == pb.JOB_STATUS_SCHEDULED
        del intruder
        c.channel.close()


def serving_pid(srv: Server, index: int, after: int = 0) -> int | None:
    """The pid in the newest 'worker N (pid P) serving' line, ignoring lines before `after`."""
    pat = re.compile(rf"worker {index} \(pid (\d+)\) serving")
    for line in reversed(srv.log[after:]):
        m = pat.search(line)
        if m:
            return int(m.group(1))
    return None


def test_crash_looping_worker_is_restarted_with_growing_back_off_others_serve(tmp_path):
    srv = Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "4")
    with srv:
        c = srv.client()
        tenants = tenants_covering_all_shards(c, per_shard=1)
        healthy = serving_pid(srv, 0)
        for k in range(5):
            mark = len(srv.log)
            victim = serving_pid(srv, 1)
            os.kill(victim, signal.SIGKILL)
            if k == 4:
                break
            deadline = time.time() + 60
            while serving_pid(srv, 1, after=mark) is None:
                assert time.time() < deadline and srv.proc.poll() is None
                time.sleep(0.05)
        deadline = time.time() + 30
        restarts = []
        while len(restarts) < 5:
            assert time.time() < deadline, "".join(srv.log[-20:])
            restarts = [x for x in srv.log if "restarting it in" in x]
            time.sleep(0.05)
        assert all("worker 1" in x and "killed by signal 9 (SIGKILL)" in x for x in restarts)
        delays = [float(re.search(r"restarting it in ([\d.]+) s", x).group(1))
                  for x in restarts]
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
        # Still up, the healthy worker untouched and serving its shards meanwhile; the
        # failing one's shards answer UNAVAILABLE (retryable) until it is back.
        assert srv.proc.poll() is None and serving_pid(srv, 0) == healthy
        assert Path(f"/proc/{healthy}").exists()
        served = 0
        for t in tenants:
            try:
                c.enqueue(tenant=t)
                served += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
        assert served >= 1
        c.channel.close()
