"""GET /metrics: Prometheus text, summed over every worker process, monotonic across a
worker's kill -9 and restart."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server


def scrape(srv: Server) -> dict[str, list]:
    """metric family name → its samples, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(srv.metrics_url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def total(families: dict[str, list], sample_name: str, **labels: str) -> float:
    family = sample_name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        family = family.removesuffix(suffix)
    return sum(s.value for s in families.get(family, [])
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def enqueue_on_every_shard(srv: Server, per_shard: int) -> int:
    c = srv.client()
    now = int(time.time() * 1000)
    for owner in c.owners:
        for _ in range(per_shard):
            c.stub.Enqueue(pb.EnqueueRequest(shard=owner.shard_id, task_group="g", priority=50,
                                             start_at_ms=now,
                                             payload=pb.SerializedBytes(msgpack=b"\x80")),
                           timeout=30)
    return per_shard * len(c.owners)


def worker_pids(srv: Server) -> list[int]:
    pid = srv.proc.pid
    return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_metrics_count_enqueues_over_all_processes(tmp_path):
    with Server(tmp_path / "d", "--processes", "2", "--shards", "4") as srv:
        n = enqueue_on_every_shard(srv, 5)
        fam = wait_for(lambda: (f := scrape(srv)) and
                       total(f, "silo_jobs_enqueued_total") == n and f, what="enqueue count")
        per_shard = {s.labels["shard"] for s in fam["silo_jobs_enqueued"]
                     if s.name == "silo_jobs_enqueued_total"}
        assert len(per_shard) == 4
        assert total(fam, "silo_grpc_requests_total", method="Enqueue", status="OK") == n
        assert fam["silo_grpc_request_duration_seconds"]
        # every worker process reports its CPU and memory (per-process gauges)
        procs = {s.labels["process"] for s in fam["silo_process_resident_memory_bytes"]}
        assert procs == {"w0", "w1"}
        # each worker stamps when its last flush began: a barrier for tests, a liveness
        # signal for operators (a stuck loop stops advancing it)
        since = time.time()
        flushed = wait_for(lambda: (f := scrape(srv)) and (stamps := {
            s.labels["process"]: s.value for s in f["silo_metrics_flushed_at_seconds"]}) and
            min(stamps.values()) > since and stamps, what="a flush of every worker")
        assert set(flushed) == {"w0", "w1"} and max(flushed.values()) < time.time()
        assert total(fam, "silo_shards_owned") == 4
        # the ready queue depth (queue depth per task group)
        wait_for(lambda: total(scrape(srv), "silo_ready_tasks", task_group="g") == n,
                 what="queue depth gauge")
        # SlateDB's own metrics per shard, and our group-commit histograms
        wait_for(lambda: total(scrape(srv), "silo_slatedb_write_batches_total") > 0,
                 what="slatedb write batches")
        fam = scrape(srv)
        assert total(fam, "silo_commit_batch_operations_count") >= 1
        # every commit is labelled with its shard, those of the shard's open included
        assert all(smp.labels["shard"] for smp in fam["silo_commit_batch_operations"])
        assert total(fam, "silo_commit_durable_wait_seconds_count") >= 1
        assert total(fam, "silo_slatedb_wal_flushes_total") > 0
        # errors are counted with their gRPC code name
        c = srv.client()
        with pytest.raises(grpc.RpcError):
            c.stub.GetJob(pb.GetJobRequest(shard=c.owners[0].shard_id, id="nope"), timeout=10)
        wait_for(lambda: total(scrape(srv), "silo_grpc_requests_total", method="GetJob",
                               status="NOT_FOUND") == 1, what="NOT_FOUND count")


def test_counters_stay_monotonic_across_a_worker_kill(tmp_path):
    with Server(tmp_path / "d", "--processes", "2", "--shards", "4") as srv:
        n = enqueue_on_every_shard(srv, 3)
        wait_for(lambda: total(scrape(srv), "silo_jobs_enqueued_total") == n, what="flush")
        victim = worker_pids(srv)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any("is serving again" in line for line in srv.log), what="restart")
        seen = []
        for _ in range(5):
            seen.append(total(scrape(srv), "silo_jobs_enqueued_total"))
        assert all(v == n for v in seen), seen  # the dead worker's counts are kept
        m = enqueue_on_every_shard(srv, 2)
        fam = wait_for(lambda: (f := scrape(srv)) and
                       total(f, "silo_jobs_enqueued_total") == n + m and f,
                       what="counts after restart")
        assert total(fam, "silo_worker_restarts_total") == 1
        # the dead process's live gauges are gone: one RSS series per live worker
        assert len(fam["silo_process_resident_memory_bytes"]) == 2
        assert any("event=worker_restarted" in line for line in srv.log)


def test_metrics_disabled_serves_nothing(tmp_path):
    with Server(tmp_path / "d", "--processes", "1", "--no-metrics-enabled") as srv:
        srv.client().enqueue()
        assert not any("metrics serving on" in line for line in srv.log)
