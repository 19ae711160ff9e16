"""Retention through the real server: finished jobs vanish after their TTL (GetJob says
NOT_FOUND, GetNodeInfo's counters drop them); with the defaults nothing vanishes."""

from __future__ import annotations

import time

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server


def _counters(c) -> tuple[int, int]:
    info = c.stub.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
    return (sum(s.total_jobs for s in info.owned_shards),
            sum(s.completed_jobs for s in info.owned_shards))


def _finish(c, n: int, group: str, fail: bool = False) -> list[str]:
    ids = [c.enqueue(task_group=group) for _ in range(n)]
    tasks = c.lease(n, group=group)
    assert len(tasks) == n
    for t in tasks:
        c.fail(t) if fail else c.succeed(t)
    return ids


def test_finished_jobs_expire_and_live_ones_stay(tmp_path):
    with Server(tmp_path / "d", "--completed-job-expire-s", "1", "--terminal-job-expire-s", "2",
                "--reaper-interval-ms", "100") as srv:
        c = srv.client()
        live = c.enqueue(task_group="other")
        done = _finish(c, 5, "g")
        failed = _finish(c, 3, "g", fail=True)
        assert _counters(c) == (9, 8)
        deadline = time.monotonic() + 30
        while _counters(c) != (1, 0):
            assert time.monotonic() < deadline, _counters(c)
            time.sleep(0.1)
        for jid in done + failed:
            with pytest.raises(grpc.RpcError) as e:
                c.get(jid)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert c.get(live).status == pb.JOB_STATUS_SCHEDULED
        c.channel.close()


def test_retention_is_off_by_default(tmp_path):
    with Server(tmp_path / "d", "--reaper-interval-ms", "50") as srv:
        c = srv.client()
        [jid] = _finish(c, 1, "g")
        time.sleep(1.5)  # many sweep intervals: nothing may be deleted
        assert c.get(jid).status == pb.JOB_STATUS_SUCCEEDED
        assert _counters(c) == (1, 1)
        c.channel.close()


def test_jobs_expiring_while_queries_read_them(tmp_path):
    """Queries running through the expiry see each job whole or not at all, and the
    status index forgets the expired jobs (COUNT and the rows agree, then reach 0)."""
    import msgspec  # noqa: PLC0415

    with Server(tmp_path / "d", "--completed-job-expire-s", "1", "--reaper-interval-ms", "50",
                "--shards", "1") as srv:
        c = srv.client()
        _finish(c, 30, "q")
        shard = c.shard_for(None)
        deadline = time.monotonic() + 30
        while True:
            r = c.stub.Query(pb.QueryRequest(
                shard=shard, sql="SELECT id, status_kind FROM jobs WHERE status_kind = 'Succeeded'"),
                timeout=30)
            rows = [msgspec.msgpack.decode(x.msgpack) for x in r.rows]
            assert all(row["status_kind"] == "Succeeded" and row["id"] for row in rows)
            n = c.stub.Query(pb.QueryRequest(shard=shard, sql="SELECT COUNT(*) AS n FROM jobs"),
                             timeout=30)
            if not rows and msgspec.msgpack.decode(n.rows[0].msgpack)["n"] == 0:
                break
            assert time.monotonic() < deadline, len(rows)
        c.channel.close()
