"""Every RPC over real gRPC against the real server, with Silo's exact errors."""

from __future__ import annotations

import time
import uuid

import grpc
import msgspec
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server


def group() -> str:
    return "g-" + uuid.uuid4().hex[:8]


def status_of(err: pytest.ExceptionInfo) -> tuple[grpc.StatusCode, str]:
    return err.value.code(), err.value.details()


def now_ms() -> int:
    return int(time.time() * 1000)


def test_health_is_serving(server):
    with server.channel() as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="silo.v1.Silo"), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with server.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        [resp] = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert "silo.v1.Silo" in names


def test_cluster_info_covers_the_hash_space(server, client):
    info = client.stub.GetClusterInfo(pb.GetClusterInfoRequest())
    assert info.num_shards == 8 and len(info.shard_owners) == 8
    owners = client.owners
    assert owners[0].range_start == "" and owners[-1].range_end == ""
    assert [o.range_start for o in owners[1:]] == [o.range_end for o in owners[:-1]]
    assert owners[1].range_start == "2000000000000000"
    assert all(o.grpc_addr == server.addr for o in owners)
    assert info.this_grpc_addr == server.addr and len(info.members) == 1


def test_full_lifecycle_and_node_counters(client):
    g = group()
    before = {s.shard_id: s for s in client.stub.GetNodeInfo(pb.GetNodeInfoRequest()).owned_shards}
    payload = msgspec.msgpack.encode({"hello": "world"})
    jid = client.enqueue(task_group=g, payload=payload, metadata={"k": "v"})
    job = client.get(jid)
    assert job.status == pb.JOB_STATUS_SCHEDULED and job.payload.msgpack == payload
    assert dict(job.metadata) == {"k": "v"} and job.task_group == g
    [task] = client.lease(5, g)
    assert task.job_id == jid and task.attempt_number == 1 and task.lease_ms == 1000
    assert task.is_last_attempt and not task.HasField("tenant_id")
    assert task.payload.msgpack == payload and task.shard == client.shard_for(None)
    assert client.get(jid).status == pb.JOB_STATUS_RUNNING
    client.succeed(task, msgspec.msgpack.encode(42))
    job = client.get(jid, attempts=True)
    assert job.status == pb.JOB_STATUS_SUCCEEDED and msgspec.msgpack.decode(job.result.msgpack) == 42
    assert [a.status for a in job.attempts] == [pb.ATTEMPT_STATUS_SUCCEEDED]
    res = client.stub.GetJobResult(client.job_req(pb.GetJobResultRequest, jid))
    assert res.WhichOneof("result") == "success_data" and res.success_data.msgpack == b"\x2a"
    after = {s.shard_id: s for s in client.stub.GetNodeInfo(pb.GetNodeInfoRequest()).owned_shards}
    sid = task.shard
    assert after[sid].total_jobs == before[sid].total_jobs + 1
    assert after[sid].completed_jobs == before[sid].completed_jobs + 1
    client.stub.DeleteJob(client.job_req(pb.DeleteJobRequest, jid))
    with pytest.raises(grpc.RpcError) as e:
        client.get(jid)
    assert status_of(e) == (grpc.StatusCode.NOT_FOUND, "job not found")


def test_five_mib_payload_round_trip(tmp_path):
    # Its own server with a long lease: on a loaded machine, fetching and reporting
    # 5 MiB can outlast the shared server's 1 s lease ("lease not found").
    with Server(tmp_path / "d", "--lease-ms", "60000") as s:
        client = s.client()
        g = group()
        payload = bytes(range(256)) * (5 * 1024 * 4)
        jid = client.enqueue(task_group=g, payload=payload)
        [task] = client.lease(1, g)
        assert task.payload.msgpack == payload
        assert client.get(jid).payload.msgpack == payload
        client.succeed(task, payload)
        assert client.get(jid).result.msgpack == payload
        client.channel.close()


@pytest.mark.parametrize("kw,code,msg", [
    (dict(priority=100), "INVALID_ARGUMENT", "priority must be between 0 and 99"),
    (dict(task_group=""), "INVALID_ARGUMENT", "task_group is required"),
    (dict(task_group="x" * 65), "INVALID_ARGUMENT", "task_group too long (must be <= 64 chars)"),
    (dict(id="x" * 129), "INVALID_ARGUMENT", "job id too long (must be <= 128 chars)"),
    (dict(metadata={str(i): "v" for i in range(17)}), "INVALID_ARGUMENT",
     "metadata has too many entries (max 16)"),
    (dict(metadata={"k" * 64: "v"}), "INVALID_ARGUMENT", "metadata key too long (must be < 64 chars)"),
    (dict(metadata={"k": "v" * 65535}), "INVALID_ARGUMENT",
     "metadata value too long (must be < u16::MAX bytes)"),
    (dict(limits=[pb.Limit(concurrency=pb.ConcurrencyLimit(key="q", max_concurrency=0))]),
     "INVALID_ARGUMENT", "concurrency limit max_concurrency must be >= 1"),
])
def test_enqueue_validation_errors(client, kw, code, msg):
    with pytest.raises(grpc.RpcError) as e:
        client.enqueue(**kw)
    assert status_of(e) == (grpc.StatusCode[code], msg)


def test_metadata_at_the_limits_is_accepted(client):
    md = {f"k{i}": "v" for i in range(15)}
    md["k" * 63] = "v" * 65534
    jid = client.enqueue(metadata=md, task_group=group())
    assert dict(client.get(jid).metadata) == md


def test_duplicate_id_is_already_exists(client):
    jid = "dup-" + uuid.uuid4().hex
    g = group()
    client.enqueue(id=jid, task_group=g, payload=b"\x01")
    with pytest.raises(grpc.RpcError) as e:
        client.enqueue(id=jid, task_group=g, payload=b"\x02")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert client.get(jid).payload.msgpack == b"\x01"
    assert len(client.lease(10, g)) == 1


def test_limits_and_retry_policy_round_trip(client):
    limits = [
        pb.Limit(concurrency=pb.ConcurrencyLimit(key="a", max_concurrency=3)),
        pb.Limit(rate_limit=pb.GubernatorRateLimit(
            name="r", unique_key="u", limit=10, duration_ms=1000, hits=1,
            retry_policy=pb.RateLimitRetryPolicy(initial_backoff_ms=5, max_backoff_ms=50,
                                                 backoff_multiplier=1.5, max_retries=2))),
        pb.Limit(floating_concurrency=pb.FloatingConcurrencyLimit(
            key="f", default_max_concurrency=2, refresh_interval_ms=100, metadata={"m": "1"})),
    ]
    rp = pb.RetryPolicy(retry_count=3, initial_interval_ms=10, max_interval_ms=100,
                        randomize_interval=True, backoff_factor=1.5)
    jid = client.enqueue(limits=limits, retry_policy=rp, task_group=group())
    job = client.get(jid)
    assert list(job.limits) == limits and job.retry_policy == rp


def test_missing_job_errors_never_say_shard_not_found(client):
    for cls, rpc in ((pb.GetJobRequest, client.stub.GetJob),
                     (pb.GetJobResultRequest, client.stub.GetJobResult),
                     (pb.CancelJobRequest, client.stub.CancelJob),
                     (pb.ExpediteJobRequest, client.stub.ExpediteJob),
                     (pb.RestartJobRequest, client.stub.RestartJob)):
        with pytest.raises(grpc.RpcError) as e:
            rpc(client.job_req(cls, "missing-" + uuid.uuid4().hex))
        code, msg = status_of(e)
        assert code == grpc.StatusCode.NOT_FOUND and "shard not found" not in msg
    with pytest.raises(grpc.RpcError) as e:
        client.stub.LeaseTask(client.job_req(pb.LeaseTaskRequest, "missing", worker_id="w"))
    assert status_of(e) == (grpc.StatusCode.NOT_FOUND, "job not found")
    client.stub.DeleteJob(client.job_req(pb.DeleteJobRequest, "missing"))  # OK


def test_routing_errors(client):
    with pytest.raises(grpc.RpcError) as e:
        client.stub.GetJob(pb.GetJobRequest(shard=str(uuid.uuid4()), id="x"))
    assert status_of(e) == (grpc.StatusCode.NOT_FOUND, "shard not found")
    with pytest.raises(grpc.RpcError) as e:
        client.stub.GetJob(pb.GetJobRequest(shard="not-a-uuid", id="x"))
    assert status_of(e) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid shard ID: not-a-uuid")


def test_tenant_is_refused_when_tenancy_is_off(client):
    with pytest.raises(grpc.RpcError) as e:
        client.enqueue(tenant="acme")
    assert status_of(e) == (grpc.StatusCode.FAILED_PRECONDITION,
                            "tenant must not be provided when tenancy is disabled on the server")


def test_cancel_get_result_and_terminal_errors(client):
    g = group()
    jid = client.enqueue(task_group=g)
    with pytest.raises(grpc.RpcError) as e:
        client.stub.GetJobResult(client.job_req(pb.GetJobResultRequest, jid))
    assert status_of(e) == (grpc.StatusCode.FAILED_PRECONDITION,
                            "job is not complete: status is Scheduled")
    client.stub.CancelJob(client.job_req(pb.CancelJobRequest, jid))
    assert client.get(jid).status == pb.JOB_STATUS_CANCELLED
    res = client.stub.GetJobResult(client.job_req(pb.GetJobResultRequest, jid))
    assert res.status == pb.JOB_STATUS_CANCELLED and res.WhichOneof("result") == "cancelled"
    with pytest.raises(grpc.RpcError) as e:
        client.stub.CancelJob(client.job_req(pb.CancelJobRequest, jid))
    assert status_of(e) == (grpc.StatusCode.FAILED_PRECONDITION, "job is already cancelled")
    assert client.lease(5, g) == []
    jid2 = client.enqueue(task_group=g)
    [t] = client.lease(5, g)
    client.fail(t, "BOOM", b"\xa1x")
    with pytest.raises(grpc.RpcError) as e:
        client.stub.CancelJob(client.job_req(pb.CancelJobRequest, jid2))
    code, msg = status_of(e)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "terminal state" in msg
    res = client.stub.GetJobResult(client.job_req(pb.GetJobResultRequest, jid2))
    assert res.failure.error_code == "BOOM" and res.failure.error_data.msgpack == b"\xa1x"


def test_cancel_running_job_via_heartbeat(client):
    g = group()
    jid = client.enqueue(task_group=g)
    [t] = client.lease(1, g)
    assert not client.heartbeat(t).cancelled
    client.stub.CancelJob(client.job_req(pb.CancelJobRequest, jid))
    hb = client.heartbeat(t)
    assert hb.cancelled and hb.cancelled_at_ms > 0
    assert client.get(jid).status == pb.JOB_STATUS_RUNNING
    client.report(t, cancelled=pb.Cancelled())
    assert client.get(jid).status == pb.JOB_STATUS_CANCELLED


def test_lease_errors(client):
    g = group()
    client.enqueue(task_group=g)
    [t] = client.lease(1, g)
    with pytest.raises(grpc.RpcError) as e:
        client.heartbeat(t, worker="someone-else")
    assert status_of(e) == (grpc.StatusCode.FAILED_PRECONDITION, "lease owner mismatch")
    client.succeed(t)
    for call in (lambda: client.heartbeat(t), lambda: client.succeed(t)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert status_of(e) == (grpc.StatusCode.NOT_FOUND, "lease not found")
    with pytest.raises(grpc.RpcError) as e:
        client.stub.ReportOutcome(pb.ReportOutcomeRequest(shard=t.shard, task_id=t.id))
    assert status_of(e) == (grpc.StatusCode.INVALID_ARGUMENT, "missing outcome")
    with pytest.raises(grpc.RpcError) as e:
        client.stub.LeaseTasks(pb.LeaseTasksRequest(worker_id="w", max_tasks=1))
    assert status_of(e) == (grpc.StatusCode.INVALID_ARGUMENT, "task_group is required")


def test_retry_timing_follows_the_policy(client):
    g = group()
    rp = pb.RetryPolicy(retry_count=1, initial_interval_ms=200, max_interval_ms=10_000,
                        backoff_factor=2.0)
    jid = client.enqueue(task_group=g, retry_policy=rp)
    [t] = client.lease(1, g)
    assert not t.is_last_attempt
    t0 = now_ms()
    client.fail(t)
    job = client.get(jid)
    assert job.status == pb.JOB_STATUS_SCHEDULED
    due = job.next_attempt_starts_after_ms
    assert t0 - 50 + 400 <= due <= now_ms() + 400
    assert client.lease(1, g) == []
    while now_ms() < due:
        time.sleep(0.02)
    [t2] = client.lease(1, g)
    assert (t2.attempt_number, t2.relative_attempt_number, t2.is_last_attempt) == (2, 2, True)
    assert t2.id != t.id
    client.fail(t2)
    assert client.get(jid).status == pb.JOB_STATUS_FAILED


def test_lease_expiry_retries_as_worker_crashed(client):
    g = group()
    rp = pb.RetryPolicy(retry_count=1, initial_interval_ms=1, max_interval_ms=1,
                        backoff_factor=1.0)
    jid = client.enqueue(task_group=g, retry_policy=rp)
    [t] = client.lease(1, g)
    deadline = time.time() + 10
    while time.time() < deadline:
        job = client.get(jid, attempts=True)
        if job.status == pb.JOB_STATUS_SCHEDULED:
            break
        time.sleep(0.05)
    assert job.attempts[0].status == pb.ATTEMPT_STATUS_FAILED
    assert job.attempts[0].error_code == "WORKER_CRASHED"
    assert "lease expired" in msgspec.msgpack.decode(job.attempts[0].error_data.msgpack)
    time.sleep(0.01)
    [t2] = client.lease(1, g)
    assert t2.attempt_number == 2


def test_order_is_start_time_then_priority(client):
    g = group()
    base = now_ms() - 1000
    client.enqueue(id="p-late-urgent-" + g, task_group=g, priority=0, start_at_ms=base + 1)
    client.enqueue(id="p-early-lazy-" + g, task_group=g, priority=90, start_at_ms=base)
    client.enqueue(id="p-early-urgent-" + g, task_group=g, priority=5, start_at_ms=base)
    client.enqueue(id="p-future-" + g, task_group=g, priority=0, start_at_ms=now_ms() + 60_000)
    got = [t.job_id for t in client.lease(10, g)]
    assert got == ["p-early-urgent-" + g, "p-early-lazy-" + g, "p-late-urgent-" + g]


def test_task_groups_are_isolated(client):
    a, b = group(), group()
    client.enqueue(task_group=a)
    assert client.lease(10, b) == []
    assert len(client.lease(10, a)) == 1


def test_expedite_restart_and_lease_task(client):
    g = group()
    jid = client.enqueue(task_group=g, start_at_ms=now_ms() + 3_600_000)
    assert client.lease(1, g) == []
    client.stub.ExpediteJob(client.job_req(pb.ExpediteJobRequest, jid))
    with pytest.raises(grpc.RpcError) as e:
        client.stub.ExpediteJob(client.job_req(pb.ExpediteJobRequest, jid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [t] = client.lease(1, g)
    client.fail(t)
    client.stub.RestartJob(client.job_req(pb.RestartJobRequest, jid))
    r = client.stub.LeaseTask(client.job_req(pb.LeaseTaskRequest, jid, worker_id="w"))
    assert r.task.attempt_number == 2 and r.task.job_id == jid
    with pytest.raises(grpc.RpcError) as e:
        client.stub.RestartJob(client.job_req(pb.RestartJobRequest, jid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "still in progress" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.stub.DeleteJob(client.job_req(pb.DeleteJobRequest, jid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.succeed(r.task)
    with pytest.raises(grpc.RpcError) as e:
        client.stub.RestartJob(client.job_req(pb.RestartJobRequest, jid))
    assert "already succeeded" in e.value.details()


def test_later_rpcs_answer_unimplemented(client):
    with pytest.raises(grpc.RpcError) as e:
        client.stub.RequestSplit(pb.RequestSplitRequest(shard_id=client.shard_for(None)))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not implemented yet" in e.value.details()


def test_reset_shards_wipes_everything_in_dev_mode(client):
    g = group()
    jid = client.enqueue(task_group=g)
    client.enqueue(task_group=g)
    [t] = client.lease(1, g)
    r = client.stub.ResetShards(pb.ResetShardsRequest())
    assert r.shards_reset == 8
    with pytest.raises(grpc.RpcError):
        client.get(jid)
    assert client.lease(10, g) == []
    with pytest.raises(grpc.RpcError) as e:
        client.heartbeat(t)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    info = client.stub.GetNodeInfo(pb.GetNodeInfoRequest())
    assert all(s.total_jobs == 0 for s in info.owned_shards)
    client.enqueue(task_group=g)  # usable right away
    assert len(client.lease(1, g)) == 1


def test_force_release_and_flush_shard(client):
    sid = client.shard_for(None)
    assert client.stub.ForceReleaseShard(pb.ForceReleaseShardRequest(shard=sid)).released
    with pytest.raises(grpc.RpcError) as e:
        client.stub.ForceReleaseShard(pb.ForceReleaseShardRequest(shard="nope"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = client.stub.FlushShard(pb.FlushShardRequest(shard=sid))
    assert r.status == f"flushed shard {sid}"
    with pytest.raises(grpc.RpcError) as e:
        client.stub.FlushShard(pb.FlushShardRequest(shard=str(uuid.uuid4())))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
