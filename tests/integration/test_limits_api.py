"""Limits over real gRPC: concurrency caps and grants, rate limits, DropTenantHolders."""

from __future__ import annotations

import time
import uuid

import pytest

from silo._proto import silo_pb2 as pb


def group() -> str:
    return "lim-" + uuid.uuid4().hex[:8]


def conc(key: str, n: int) -> pb.Limit:
    return pb.Limit(concurrency=pb.ConcurrencyLimit(key=key, max_concurrency=n))


def test_concurrency_cap_and_prompt_grant(client):
    g, key = group(), "k-" + uuid.uuid4().hex[:6]
    jobs = [client.enqueue(task_group=g, limits=[conc(key, 2)], id=f"{g}-{i}")
            for i in range(5)]
    first = client.lease(10, g)
    assert [t.job_id for t in first] == jobs[:2]
    assert client.lease(10, g) == []
    assert [list(t.limits) for t in first] == [[conc(key, 2)]] * 2
    t0 = time.perf_counter()
    client.succeed(first[0])
    [nxt] = client.lease(10, g)  # granted by the release itself: no sweep to wait for
    assert nxt.job_id == jobs[2] and time.perf_counter() - t0 < 1.0
    assert client.get(jobs[3]).status == pb.JOB_STATUS_SCHEDULED


def test_cancel_of_a_waiting_job_and_drop_tenant_holders(client):
    g, key = group(), "k-" + uuid.uuid4().hex[:6]
    a = client.enqueue(task_group=g, limits=[conc(key, 1)])
    b = client.enqueue(task_group=g, limits=[conc(key, 1)])
    c = client.enqueue(task_group=g, limits=[conc(key, 1)])
    [ta] = client.lease(10, g)
    assert ta.job_id == a
    client.stub.CancelJob(client.job_req(pb.CancelJobRequest, b))
    assert client.get(b).status == pb.JOB_STATUS_CANCELLED
    r = client.stub.DropTenantHolders(pb.DropTenantHoldersRequest(shard=client.shard_for(None)))
    assert r.holders_dropped >= 1
    [tc] = client.lease(10, g)  # the dropped slot went to the next waiter
    assert tc.job_id == c
    client.succeed(ta)
    client.succeed(tc)


def test_rate_limit_admits_per_window(client):
    g = group()
    lim = pb.Limit(rate_limit=pb.GubernatorRateLimit(
        name="api-" + g, unique_key="u", limit=2, duration_ms=1500, hits=1,
        retry_policy=pb.RateLimitRetryPolicy(initial_backoff_ms=50, max_backoff_ms=2000,
                                             backoff_multiplier=2.0)))
    for i in range(3):
        client.enqueue(task_group=g, limits=[lim], id=f"{g}-{i}")
    got = client.lease(10, g)
    assert len(got) == 2 and list(got[0].limits) == [lim]
    assert client.lease(10, g) == []
    deadline = time.time() + 10
    third = []
    while not third and time.time() < deadline:
        time.sleep(0.1)
        third = client.lease(10, g)
    assert [t.job_id for t in third] == [f"{g}-2"]


@pytest.mark.parametrize("bad,msg", [
    (pb.Limit(rate_limit=pb.GubernatorRateLimit(name="x", limit=0, duration_ms=10)),
     "rate limit needs limit >= 1 and duration_ms >= 1"),
    (pb.Limit(floating_concurrency=pb.FloatingConcurrencyLimit(key="f")),
     "floating limit default_max_concurrency must be >= 1"),
])
def test_bad_limits_are_invalid_argument(client, bad, msg):
    import grpc
    with pytest.raises(grpc.RpcError) as e:
        client.enqueue(task_group=group(), limits=[bad])
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, msg)


def test_floating_limit_refresh_round_trip(client):
    g, key = group(), "f-" + uuid.uuid4().hex[:6]
    lim = pb.Limit(floating_concurrency=pb.FloatingConcurrencyLimit(
        key=key, default_max_concurrency=1, refresh_interval_ms=60_000, metadata={"a": "b"}))
    for i in range(3):
        client.enqueue(task_group=g, limits=[lim], id=f"{g}-{i}")
    r = client.stub.LeaseTasks(pb.LeaseTasksRequest(worker_id="w", max_tasks=1, task_group=g))
    assert len(r.tasks) == 1 and len(r.refresh_tasks) == 1
    rt = r.refresh_tasks[0]
    assert (rt.queue_key, rt.current_max_concurrency, dict(rt.metadata)) == (key, 1, {"a": "b"})
    assert rt.lease_ms == 1000 and rt.shard == client.shard_for(None)
    with pytest.raises(Exception) as e:
        client.stub.ReportRefreshOutcome(pb.ReportRefreshOutcomeRequest(shard=rt.shard,
                                                                        task_id=rt.id))
    assert "missing outcome" in str(e.value)
    client.stub.ReportRefreshOutcome(pb.ReportRefreshOutcomeRequest(
        shard=rt.shard, task_id=rt.id, success=pb.RefreshSuccess(new_max_concurrency=3)))
    assert len(client.lease(10, g)) == 2  # the raised max let both waiters in
    with pytest.raises(Exception) as e:
        client.stub.ReportRefreshOutcome(pb.ReportRefreshOutcomeRequest(
            shard=rt.shard, task_id=rt.id, success=pb.RefreshSuccess(new_max_concurrency=3)))
    assert "lease not found" in str(e.value)
