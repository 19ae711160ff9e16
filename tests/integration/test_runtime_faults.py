"""Faults of the multi-process runtime (issue 14): foreign processes on the worker
sockets, stopped or crash-looping workers, shutdown and start-up edges."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import msgspec
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from tests.integration.harness import CHANNEL_OPTIONS, Server
from tests.integration.test_runtime import (
    PROCS,
    connect_to_worker,
    serving_pid,
    tenants_covering_all_shards,
)


def socket_dir(srv: Server) -> str:
    for line in srv.log:
        m = re.search(r"worker sockets in (\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("no 'worker sockets in' log line")


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_foreign_process_on_the_worker_sockets_is_refused_and_changes_nothing(tmp_path):
    with Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "4") as srv:
        c = srv.client()
        tenants = tenants_covering_all_shards(c, per_shard=1)
        ids = [(t, c.enqueue(tenant=t, task_group="keep")) for t in tenants]
        d = socket_dir(srv)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        body = msgspec.msgpack.encode((1, "ResetShards@local", b""))
        for i in range(PROCS):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(os.path.join(d, f"w{i}.sock"))  # same uid, but no secret
            s.sendall(struct.pack(">I", len(body)) + body)
            assert s.recv(100) == b""  # closed without an answer
            s.close()
        for t, jid in ids:
            assert c.get(jid, tenant=t).status == pb.JOB_STATUS_SCHEDULED
        wait_for(lambda: sum("refused a connection" in x for x in srv.log) >= PROCS,
                 what="refusal log lines")
        # ResetShards itself is still refused with dev mode off, from any process
        with pytest.raises(grpc.RpcError) as e:
            c.stub.ResetShards(pb.ResetShardsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        c.channel.close()


# ---- a stopped (SIGSTOP) worker ------------------------------------------------------


def owned_by(c, index: int) -> list[str]:
    """Shard ids of worker `index` (shard i of the map → worker i mod PROCS)."""
    return [o.shard_id for i, o in enumerate(c.owners) if i % PROCS == index]


def tenant_on(c, shards: list[str], start: int = 0) -> str:
    i = start
    while c.shard_for(f"t{i}") not in shards:
        i += 1
    return f"t{i}"


def health(c) -> int:
    stub = health_pb2_grpc.HealthStub(c.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_a_stopped_worker_costs_bounded_waits_and_health_says_so(tmp_path):
    with Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "4",
                "--forward-timeout-ms", "1000", "--liveness-interval-ms", "2000",
                "--liveness-misses", "10000") as srv:
        c = connect_to_worker(srv, 0)
        mine, theirs = owned_by(c, 0), owned_by(c, 1)
        t0, t1 = tenant_on(c, mine), tenant_on(c, theirs)
        c.enqueue(tenant=t0, task_group="stuck")
        wait_for(lambda: health(c) == health_pb2.HealthCheckResponse.SERVING, what="SERVING")
        victim = serving_pid(srv, 1)
        os.kill(victim, signal.SIGSTOP)
        try:
            # forwarded calls: UNAVAILABLE after the forward timeout, not a hang
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                c.enqueue(tenant=t1, task_group="stuck")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert time.monotonic() - start < 10
            # a client's deadline is passed on: the call it gave up on is never applied
            req = pb.EnqueueRequest(shard=c.shard_for(t1), tenant=t1, id="gave-up",
                                    task_group="stuck")
            with pytest.raises(grpc.RpcError) as e:
                c.stub.Enqueue(req, timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # LeaseTasks without a shard still serves this worker's shards promptly
            start = time.monotonic()
            tasks = c.lease(10, "stuck")
            assert [t.tenant_id for t in tasks] == [t0]
            assert time.monotonic() - start < 5
            wait_for(lambda: health(c) == health_pb2.HealthCheckResponse.NOT_SERVING,
                     what="NOT_SERVING while a worker is stopped")
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:  # now known unresponsive: fails fast
                c.enqueue(tenant=t1, task_group="stuck")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 5
        finally:
            os.kill(victim, signal.SIGCONT)
        wait_for(lambda: health(c) == health_pb2.HealthCheckResponse.SERVING,
                 what="SERVING again once it answers")
        wait_for(lambda: any("answers again" in x for x in srv.log), what="recovery line")
        with pytest.raises(grpc.RpcError) as e:
            c.get("gave-up", tenant=t1)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert serving_pid(srv, 1) == victim  # not replaced: misses stayed below the limit
        c.enqueue(tenant=t1, task_group="stuck")
        c.channel.close()


def test_a_worker_that_stops_answering_is_replaced(tmp_path):
    with Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "4",
                "--liveness-interval-ms", "100", "--liveness-misses", "5") as srv:
        c = srv.client()
        t1 = tenant_on(c, owned_by(c, 1))
        before = c.enqueue(tenant=t1)
        victim = serving_pid(srv, 1)
        mark = len(srv.log)
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: serving_pid(srv, 1, after=mark) not in (None, victim),
                 timeout=60, what="a replacement worker")
        wait_for(lambda: not os.path.exists(f"/proc/{victim}"), what="the old pid reaped")
        lines = "".join(srv.log[mark:])
        assert "stopped answering" in lines and "liveness pings" in lines
        assert re.search(r"worker 1 \(pid \d+\) killed by signal 9 \(SIGKILL\) after missing",
                         lines)
        assert get_retrying(c, before, t1).status == pb.JOB_STATUS_SCHEDULED
        c.channel.close()


def get_retrying(c, job_id: str, tenant: str):
    """GetJob, retried on UNAVAILABLE (our connection may have been to the killed process)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return c.get(job_id, tenant=tenant)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ---- shutdown and start-up edges -----------------------------------------------------


def test_sigterm_lets_in_flight_forwarded_calls_finish(tmp_path):
    """Calls in flight when SIGTERM arrives, forwarded to the other worker and waiting
    there for a slow WAL flush (6 s), all finish OK; the server exits 0, no traceback.

    SIGTERM goes once the owner has staged a round of 16 calls (GetJob sees them) and at
    least 8 are still unanswered; a round that a WAL tick happened to answer is awaited
    and another is sent, so no guessed sleep decides what the test exercises."""
    srv = Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "4",
                 "--commit-interval-ms", "1000", "--flush-interval-ms", "6000",
                 "--no-flush-on-commit", "--forward-timeout-ms", "60000")
    with srv:
        c = connect_to_worker(srv, 0)
        theirs = owned_by(c, 1)
        tenants = [tenant_on(c, theirs, start=i * 1000) for i in range(4)]
        c.channel.close()

        def request(cls, r: int, k: int, **kw):
            t = tenants[k % 4]
            return cls(shard=c.shard_for(t), tenant=t, id=f"term-{r}-{k}", **kw)

        async def load():
            for nonce in range(64):  # a connection that landed on worker 0
                ch = grpc.aio.insecure_channel(srv.addr, options=CHANNEL_OPTIONS + [
                    ("grpc.use_local_subchannel_pool", 1), ("silo.test.nonce", nonce)])
                call = pb_grpc.SiloStub(ch).GetClusterInfo(pb.GetClusterInfoRequest(),
                                                          timeout=10)
                await call
                if dict(await call.trailing_metadata()).get("x-silo-worker") == "0":
                    break
                await ch.close()
            stub = pb_grpc.SiloStub(ch)

            async def staged(r: int, k: int) -> bool:
                try:
                    await stub.GetJob(request(pb.GetJobRequest, r, k), timeout=10)
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.NOT_FOUND:
                        return False
                    raise
                return True

            for r in range(5):
                calls = [asyncio.ensure_future(stub.Enqueue(
                    request(pb.EnqueueRequest, r, k, task_group="term"), timeout=60))
                    for k in range(16)]
                deadline = time.monotonic() + 60
                while not all([await staged(r, k) for k in range(16)]):
                    assert time.monotonic() < deadline, "the owner never staged the calls"
                    await asyncio.sleep(0.05)
                in_flight = [k for k, f in enumerate(calls) if not f.done()]
                if len(in_flight) >= 8:  # most still wait for durability
                    break
                await asyncio.gather(*calls)  # a WAL tick answered them: go again
            else:
                raise AssertionError("every round was answered before SIGTERM could go")
            srv.proc.send_signal(signal.SIGTERM)
            done = await asyncio.gather(*calls, return_exceptions=True)
            await ch.close()
            return r, done

        rounds, done = asyncio.run(load())
        assert srv.proc.wait(60) == 0
    failed = [(k, r) for k, r in enumerate(done) if isinstance(r, BaseException)]
    assert failed == [], [(k, r.code(), r.details()) for k, r in failed]
    assert not any("Traceback" in x for x in srv.log), "".join(srv.log)
    with Server(tmp_path / "d", "--tenancy") as srv2:
        c2 = srv2.client()
        for r in range(rounds + 1):
            for k in range(16):
                assert c2.get(f"term-{r}-{k}", tenant=tenants[k % 4]).status == \
                    pb.JOB_STATUS_SCHEDULED
        c2.channel.close()


def test_kill_9_of_the_supervisor_leaves_a_socket_dir_the_next_start_cleans(tmp_path):
    srv = Server(tmp_path / "d", "--processes", str(PROCS))
    srv.start()
    d = socket_dir(srv)
    pids = [serving_pid(srv, i) for i in range(PROCS)]
    srv.kill()
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids),
             what="workers to die with the supervisor")
    assert os.path.isdir(d)
    with Server(tmp_path / "d", "--processes", str(PROCS)) as srv2:
        assert socket_dir(srv2) == d
        assert any("left by a previous run" in x for x in srv2.log)
        srv2.client().channel.close()
    assert not os.path.exists(d)
    assert not (tmp_path / "d" / "silo.lock").exists()


def serve_fails(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SILO_")}
    # No fixed side ports (web UI 8080, metrics 9090): another server on the machine
    # holding one must not turn the failure under test into a different one.
    env.update(SILO_WEBUI_ENABLED="false", SILO_METRICS_ADDR="127.0.0.1:0")
    return subprocess.run([sys.executable, "-m", "silo", "serve", *args],
                          capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)


@pytest.mark.parametrize("case", ["file", "unwritable", "bad-url", "unresolvable-url",
                                  "port-in-use"])
def test_an_unusable_start_is_one_line_exit_2_and_leaves_no_lock_file(tmp_path, case):
    data = tmp_path / "d"
    args = ["--data-dir", str(data), "--grpc-addr", "127.0.0.1:0"]
    named = "storage.data_dir"
    holder = None
    if case == "file":
        data.write_text("not a dir")
    elif case == "unwritable":
        if os.getuid() == 0:
            data.write_text("")  # root may write anywhere: make the path unusable instead
            args[1] = str(data / "sub")
        else:
            data.mkdir()
            data.chmod(0o500)
    elif case == "bad-url":
        args += ["--object-store-url", "foo://bucket/x"]
        named = "storage.object_store_url"
    elif case == "unresolvable-url":
        args += ["--object-store-url", "az://nobody/x"]
        named = "storage.object_store_url"
    else:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        args[3] = f"127.0.0.1:{holder.getsockname()[1]}"
        named = "cannot listen on"
    try:
        r = serve_fails(tmp_path, *args)
    finally:
        if holder is not None:
            holder.close()
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("silo: ") and named in lines[0], r.stderr
    if data.is_dir():
        assert not (data / "silo.lock").exists()


def break_shards(data: Path, shard_ids: list[str]) -> None:
    """Write a record these shards cannot rebuild from (a malformed counter key), so a
    worker owning one fails while opening it."""
    from slatedb.uniffi import DbBuilder, ObjectStore

    async def corrupt(sid: str) -> None:
        path = str((data / "objects" / "shards" / sid).resolve()).lstrip("/")
        db = await DbBuilder(path, ObjectStore.resolve("file:///")).build()
        await db.put(b"\xf0\xff\xfe", b"x")
        await db.flush()
        await db.shutdown()

    for sid in shard_ids:
        asyncio.run(corrupt(sid))


def test_a_worker_that_cannot_start_is_retried_while_the_others_serve(tmp_path):
    with Server(tmp_path / "d", "--processes", str(PROCS), "--shards", "2") as srv:
        owners = [o.shard_id for o in srv.client().owners]
    break_shards(tmp_path / "d", [owners[1]])  # worker 1's only shard
    with Server(tmp_path / "d", "--processes", str(PROCS)) as srv:
        wait_for(lambda: sum("restarting it in" in x for x in srv.log) >= 2,
                 what="worker 1 restarted twice")
        assert srv.proc.poll() is None
        c = srv.client()
        assert c.shard_for(None) in owners
        assert any("worker 1" in x and "restarting it in 1.0 s" in x
                   for x in srv.log)
        c.channel.close()


def test_the_server_gives_up_only_when_no_worker_can_start(tmp_path):
    with Server(tmp_path / "d", "--processes", str(PROCS), "--shards", "2") as srv:
        owners = [o.shard_id for o in srv.client().owners]
    break_shards(tmp_path / "d", owners)
    r = serve_fails(tmp_path, "--data-dir", str(tmp_path / "d"), "--grpc-addr",
                    "127.0.0.1:0", "--processes", str(PROCS))
    assert r.returncode == 1
    assert "no worker could start; giving up" in r.stderr
    assert not (tmp_path / "d" / "silo.lock").exists()


def test_sigterm_to_one_worker_restarts_only_that_worker(tmp_path):
    with Server(tmp_path / "d", "--processes", str(PROCS), "--tenancy", "--shards", "4") as srv:
        c = srv.client()
        t1 = tenant_on(c, owned_by(c, 1))
        before = c.enqueue(tenant=t1)
        healthy, victim = serving_pid(srv, 0), serving_pid(srv, 1)
        mark = len(srv.log)
        os.kill(victim, signal.SIGTERM)
        wait_for(lambda: serving_pid(srv, 1, after=mark) not in (None, victim),
                 timeout=60, what="worker 1 back")
        lines = "".join(srv.log[mark:])
        assert "worker 1 stopped" in lines and "exited with status 0" in lines
        assert srv.proc.poll() is None and serving_pid(srv, 0) == healthy
        assert get_retrying(c, before, t1).status == pb.JOB_STATUS_SCHEDULED
        c.channel.close()
