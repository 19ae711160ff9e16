"""A full disk: writes fail with UNAVAILABLE within the write bound (not at the client's
deadline), one log line, health NOT_SERVING; every acknowledged job survives; recovery
is automatic once space returns. Runs on a real 20 MiB tmpfs (needs mount permission)."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from tests.faults.tools import fill, health, small_tmpfs, wait_for
from tests.integration.harness import Server

PAYLOAD = 200_000


def _enqueue(c, payload: bytes, timeout: float = 30.0) -> tuple[str | None, grpc.StatusCode]:
    try:
        r = c.stub.Enqueue(pb.EnqueueRequest(
            shard=c.shard_for(None), task_group="disk", payload=pb.SerializedBytes(
                msgpack=payload)), timeout=timeout)
        return r.id, grpc.StatusCode.OK
    except grpc.RpcError as e:
        return None, e.code()


def test_full_disk_fails_fast_reports_and_recovers(tmp_path):
    try:
        ctx = small_tmpfs(tmp_path / "mnt", 20)
        mnt = ctx.__enter__()
    except (PermissionError, FileNotFoundError) as e:
        pytest.skip(f"needs a tmpfs mount (root): {e}")
    try:
        with Server(mnt / "data", "--processes", "1", "--write-timeout-ms", "1500") as s:
            c = s.client()
            filler = fill(mnt, 6 << 20)
            acked: list[str] = []
            payload = os.urandom(PAYLOAD)
            code = grpc.StatusCode.OK
            t0 = time.monotonic()
            for _ in range(200):
                t0 = time.monotonic()
                job_id, code = _enqueue(c, payload)
                if code != grpc.StatusCode.OK:
                    break
                acked.append(job_id)
            took = time.monotonic() - t0
            assert code == grpc.StatusCode.UNAVAILABLE, code
            assert took < 15, f"the failing write took {took:.1f} s (client deadline 30 s)"
            assert acked, "the disk filled before any write"
            assert wait_for(lambda: health(s.addr) == "NOT_SERVING", 10, "NOT_SERVING")
            # While stuck, writes fail at once rather than each waiting for the bound.
            t0 = time.monotonic()
            assert _enqueue(c, b"\x80")[1] == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 1.4
            stalls = [line for line in s.log if "shard storage stalled" in line]
            assert len(stalls) == 1, stalls

            filler.unlink()  # space returns: recovery needs no operator action

            def recovered() -> bool:
                return _enqueue(c, b"\x80", timeout=5)[1] == grpc.StatusCode.OK

            wait_for(recovered, 60, "writes to succeed again", interval=0.5)
            wait_for(lambda: health(s.addr) == "SERVING", 10, "SERVING again")
            assert any("storage recovered" in line for line in s.log)
            c.channel.close()
        # Every acknowledged job is durable: all of them are there after a restart.
        with Server(mnt / "data", "--processes", "1") as s:
            c = s.client()
            for job_id in acked:
                assert c.get(job_id).id == job_id
            c.channel.close()
    finally:
        ctx.__exit__(None, None, None)
