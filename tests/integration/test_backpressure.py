"""Back-pressure: a flood of big payloads past server.max_inflight_bytes gets
RESOURCE_EXHAUSTED for the excess instead of growing the worker without bound."""

from __future__ import annotations

import grpc

from silo._proto import silo_pb2 as pb
from tests.faults.flood import flood
from tests.faults.tools import process_tree, rss_bytes, wait_for
from tests.integration.harness import Server

MiB = 1 << 20
BOUND = 8 * MiB


def test_big_payload_flood_is_refused_past_the_bound(tmp_path):
    with Server(tmp_path, "--processes", "1", "--max-inflight-bytes", str(BOUND),
                "--write-timeout-ms", "120000") as s:
        c = s.client()
        workers = [p for p in process_tree(s.proc.pid) if p != s.proc.pid]
        base = max(rss_bytes(p) for p in workers)
        r = flood(s.addr, c.shard_for(None), s.proc.pid, calls=48, concurrency=24,
                  size=2 * MiB, channels=8)
        assert r.codes["RESOURCE_EXHAUSTED"] > 0, r.codes
        assert r.codes["OK"] > 0, r.codes
        assert set(r.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, r.codes
        peak = max(r.peak_rss.get(p, 0) for p in workers)
        # Generous: the stated multiple (CONFIGURATION.md) is far below this.
        assert peak - base < 60 * BOUND, (peak >> 20, base >> 20)
        assert any("back-pressure: refusing calls" in line for line in s.log)
        # Freed memory goes back to the OS once the flood is over (silo.rpc.memtrim):
        # what stays is the acked payloads in SlateDB's memtable/WAL plus slack. Without
        # the trim the worker kept ~134 MiB over base here (36 MiB acked); with it ~60 MiB.
        keep = 2 * BOUND + 2 * len(r.acked) * 2 * MiB
        wait_for(lambda: max(rss_bytes(p) for p in workers) - base < keep, 45,
                 f"worker RSS back under base + {keep >> 20} MiB after the flood")
        # A single message bigger than the whole bound is served when nothing else is.
        big = pb.EnqueueRequest(shard=c.shard_for(None), task_group="big",
                                payload=pb.SerializedBytes(msgpack=b"x" * (12 * MiB)))
        assert c.stub.Enqueue(big, timeout=60).id
        for job_id in r.acked:
            assert c.get(job_id).id == job_id
        # An undecodable body is a clear INVALID_ARGUMENT, not UNKNOWN.
        call = c.channel.unary_unary("/silo.v1.Silo/GetJob")
        try:
            call(b"\xff\xff\xff", timeout=10)
            raise AssertionError("undecodable body accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        c.channel.close()
