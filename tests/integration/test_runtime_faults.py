"""Faults of the multi-process runtime (issue 14): foreign processes on the worker
sockets, stopped or crash-looping workers, shutdown and start-up edges."""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
import time

import grpc
import msgspec
import pytest

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server
from tests.integration.test_runtime import PROCS, tenants_covering_all_shards


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
