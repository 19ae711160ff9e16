"""Operations RPCs on a live 2-process server: CPU and heap profiles of every worker in
pprof, task dumps, and storage info / compaction / flush for every shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from silo.observability import pprof, profiling
from tests.integration.harness import Server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("ops"), "--processes", "2", "--shards", "4") as s:
        yield s


def load_every_shard(srv: Server, stop: threading.Event) -> None:
    c = srv.client()
    while not stop.is_set():
        for o in c.owners:
            c.stub.Enqueue(pb.EnqueueRequest(shard=o.shard_id, task_group="ops",
                                             payload=pb.SerializedBytes(msgpack=b"\x80")),
                           timeout=30)


def with_load(srv: Server, fn):
    stop = threading.Event()
    t = threading.Thread(target=load_every_shard, args=(srv, stop), daemon=True)
    t.start()
    try:
        return fn()
    finally:
        stop.set()
        t.join(30)


@pytest.mark.skipif(profiling.py_spy_path() is None, reason="py-spy is not installed")
def test_cpu_profile_samples_every_worker_in_pprof(srv):
    stub = srv.client().stub
    r = with_load(srv, lambda: stub.CpuProfile(
        pb.CpuProfileRequest(duration_seconds=3, frequency=200), timeout=60))
    assert r.duration_seconds == 3 and r.samples > 0
    prof = pprof.parse(r.profile_data)
    assert r.profile_data[:2] == b"\x1f\x8b"  # gzipped, as go tool pprof expects
    strings = prof.string_table
    assert [strings[t.type] for t in prof.sample_type] == ["samples", "cpu"]
    ours = {strings[f.name] for f in prof.function
            if strings[f.filename].startswith("silo/") or "/silo/" in strings[f.filename]}
    assert ours, "no function of silo's own code was sampled"
    workers = {strings[lb.str] for s in prof.sample for lb in s.label}
    assert workers == {"w0", "w1"}
    assert sum(s.value[0] for s in prof.sample) == r.samples


def test_heap_profile_is_pprof(srv):
    stub = srv.client().stub
    r = with_load(srv, lambda: stub.HeapProfile(pb.HeapProfileRequest(duration_seconds=1),
                                                timeout=60))
    prof = pprof.parse(r.profile_data)
    strings = prof.string_table
    assert [strings[t.type] for t in prof.sample_type] == ["inuse_objects", "inuse_space"]
    assert prof.sample and all(s.value[1] > 0 for s in prof.sample)


def test_dump_tasks_names_the_running_tasks_of_every_worker(srv):
    r = srv.client().stub.DumpTasks(pb.DumpTasksRequest(), timeout=30)
    assert "=== w0" in r.dump and "=== w1" in r.dump
    for name in ("silo-reaper", "silo-committer", "silo-metrics"):
        assert r.dump.count(f"task '{name}") >= 2, name
    assert "threads ===" in r.dump and "MainThread" in r.dump
    assert r.task_count >= 6


def test_storage_rpcs_answer_for_every_shard(srv):
    c = srv.client()
    for o in c.owners:
        c.enqueue_on = o.shard_id
        c.stub.Enqueue(pb.EnqueueRequest(shard=o.shard_id, task_group="st",
                                         payload=pb.SerializedBytes(msgpack=b"\x80")))
    for o in c.owners:  # half of them live in the other process: forwarded
        assert c.stub.FlushShard(pb.FlushShardRequest(shard=o.shard_id)).status == \
            f"flushed shard {o.shard_id}"
        info = c.stub.GetShardStorageInfo(pb.GetShardStorageInfoRequest(shard=o.shard_id))
        assert info.sorted_run_count == len(info.sorted_runs)
        assert info.total_sorted_run_size == sum(r.estimated_size for r in info.sorted_runs)
        status = c.stub.CompactShard(pb.CompactShardRequest(shard=o.shard_id)).status
        assert o.shard_id in status
    unknown = str(uuid.uuid4())
    for call, req in ((c.stub.GetShardStorageInfo, pb.GetShardStorageInfoRequest),
                      (c.stub.CompactShard, pb.CompactShardRequest),
                      (c.stub.FlushShard, pb.FlushShardRequest)):
        with pytest.raises(grpc.RpcError) as e:
            call(req(shard=unknown))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == f"shard {unknown} not found on this node"
        with pytest.raises(grpc.RpcError) as e:
            call(req(shard="not-a-uuid"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_compaction_merges_l0_into_one_sorted_run(tmp_path):
    # a tiny memtable so a few enqueues reach L0
    with Server(tmp_path / "d", "--processes", "1", "--shards", "1",
                "--l0-sst-size-bytes", str(1 << 20)) as s:
        c = s.client()
        sid = c.owners[0].shard_id
        big = b"\xc4\x00\x80\x00" + b"x" * (32 << 10)  # msgpack bin 32 KiB
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for _ in range(40):
                c.stub.Enqueue(pb.EnqueueRequest(shard=sid, task_group="g",
                                                 payload=pb.SerializedBytes(msgpack=big)))
            info = c.stub.GetShardStorageInfo(pb.GetShardStorageInfoRequest(shard=sid))
            if info.l0_sst_count >= 2:
                break
        assert info.l0_sst_count >= 2 and info.total_l0_size > 0
        assert "submitted full compaction" in c.stub.CompactShard(
            pb.CompactShardRequest(shard=sid)).status
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = c.stub.GetShardStorageInfo(pb.GetShardStorageInfoRequest(shard=sid))
            if info.sorted_run_count >= 1 and info.l0_sst_count == 0:
                break
            time.sleep(0.5)
        assert info.sorted_run_count >= 1 and info.total_sorted_run_size > 0


def cli(*args: str, srv: Server, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "silo", *args, "--server", srv.addr],
                       capture_output=True, text=True, timeout=timeout,
                       env={k: v for k, v in os.environ.items() if not k.startswith("SILO_")})
    assert p.returncode == 0, p.stderr
    return p


def test_operator_cli_commands(srv, tmp_path):
    node = json.loads(cli("node", "info", "--json", srv=srv).stdout)
    ids = sorted(s["shard_id"] for s in node["shards"])
    assert len(ids) == 4
    info = json.loads(cli("shard", "info", ids[0], "--json", srv=srv).stdout)
    assert info["sorted_run_count"] == len(info["sorted_runs"])
    assert cli("shard", "flush", ids[1], srv=srv).stdout.strip() == f"flushed shard {ids[1]}"
    assert ids[2] in cli("shard", "compact", ids[2], srv=srv).stdout
    assert "=== w1" in cli("dump-tasks", srv=srv).stdout
    out = tmp_path / "heap.pprof"
    cli("heap-profile", "--duration", "1", "-o", str(out), srv=srv)
    assert pprof.parse(out.read_bytes()).sample_type
    if profiling.py_spy_path() is not None:
        out = tmp_path / "cpu.pprof"
        cli("profile", "--duration", "1", "-o", str(out), srv=srv)
        assert pprof.parse(out.read_bytes()).sample_type
