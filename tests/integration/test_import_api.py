"""ImportJobs over gRPC: the TypeScript client's import cases (through our SDK, which sends
the same shapes), per-job validation results, the Running refusal, forwarding between
worker processes, and the `silo import` CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from silo.client import (
    AttemptStatus,
    ConcurrencyLimit,
    ImportAttempt,
    ImportJob,
    JobStatus,
    RetryPolicy,
    SiloClient,
)
from tests.integration.test_cli_client import silo


def arun(server, fn):
    """Run fn(client) with an SDK client of the server (tenancy on: the TS tests' tenants)."""
    async def main():
        async with SiloClient([server.addr], topology_refresh_interval_s=0) as c:
            return await asyncio.wait_for(fn(c), 30)
    return asyncio.run(main())


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def now_ms() -> int:
    return int(time.time() * 1000)


# ---- the TypeScript client's cases ---------------------------------------------------------


def test_scheduled_job_with_no_attempts(tenant_server):
    async def body(c):
        jid, tenant = uid("import-scheduled"), "import-test-scheduled"
        [r] = await c.import_jobs([ImportJob(jid, {"imported": True}, "default", tenant=tenant,
                                             priority=20, metadata={"source": "legacy-system"})])
        assert (r.id, r.success, r.status) == (jid, True, JobStatus.SCHEDULED)
        job = await c.get_job(jid, tenant)
        assert (job.id, job.priority, job.payload, job.status) == (
            jid, 20, {"imported": True}, JobStatus.SCHEDULED)
        assert job.metadata["source"] == "legacy-system"
    arun(tenant_server, body)


def test_succeeded_attempt(tenant_server):
    async def body(c):
        jid, tenant, now = uid("import-succeeded"), "import-test-succeeded", now_ms()
        [r] = await c.import_jobs([ImportJob(
            jid, {"task": "completed-migration"}, "default", tenant=tenant,
            enqueue_time_ms=now - 60000, attempts=[ImportAttempt(
                AttemptStatus.SUCCEEDED, now - 50000, now - 40000, {"output": "done"})])])
        assert (r.success, r.status) == (True, JobStatus.SUCCEEDED)
        job = await c.get_job(jid, tenant, include_attempts=True)
        assert job.status == JobStatus.SUCCEEDED and len(job.attempts) == 1
        assert job.attempts[0].status == AttemptStatus.SUCCEEDED
        assert job.attempts[0].result == {"output": "done"}
    arun(tenant_server, body)


def test_failed_attempts_with_retries_remaining(tenant_server):
    async def body(c):
        jid, tenant, now = uid("import-failed"), "import-test-failed", now_ms()
        [r] = await c.import_jobs([ImportJob(
            jid, {"task": "retried-task"}, "default", tenant=tenant, enqueue_time_ms=now - 120000,
            retry_policy=RetryPolicy(3, 1000, 30000, True, 2.0), attempts=[
                ImportAttempt(AttemptStatus.FAILED, now - 100000, now - 90000, None, "TIMEOUT",
                              {"detail": "request timed out"}),
                ImportAttempt(AttemptStatus.FAILED, now - 80000, now - 70000, None, "TIMEOUT",
                              {"detail": "request timed out again"})])])
        assert (r.success, r.status) == (True, JobStatus.SCHEDULED)
        job = await c.get_job(jid, tenant, include_attempts=True)
        assert len(job.attempts) == 2 and job.attempts[0].status == AttemptStatus.FAILED
        assert job.attempts[0].error_code == "TIMEOUT"
    arun(tenant_server, body)


def test_several_jobs_in_one_call_keep_their_order(tenant_server):
    async def body(c):
        tenant, now = "import-test-batch", now_ms()
        ids = [uid(f"import-batch-{i}") for i in range(3)]
        results = await c.import_jobs([
            ImportJob(ids[0], {"index": 0}, "default", tenant=tenant),
            ImportJob(ids[1], {"index": 1}, "default", tenant=tenant, attempts=[ImportAttempt(
                AttemptStatus.SUCCEEDED, now - 5000, now - 1000, {"completed": True})]),
            ImportJob(ids[2], {"index": 2}, "default", tenant=tenant)])
        assert [r.id for r in results] == ids and all(r.success for r in results)
        assert [r.status for r in results] == [JobStatus.SCHEDULED, JobStatus.SUCCEEDED,
                                               JobStatus.SCHEDULED]
    arun(tenant_server, body)


def test_cancelled_attempt(tenant_server):
    async def body(c):
        jid, tenant, now = uid("import-cancelled"), "import-test-cancelled", now_ms()
        [r] = await c.import_jobs([ImportJob(jid, {"task": "was-cancelled"}, "default",
                                             tenant=tenant, attempts=[ImportAttempt(
                                                 AttemptStatus.CANCELLED, now - 30000,
                                                 now - 20000)])])
        assert (r.success, r.status) == (True, JobStatus.CANCELLED)
        assert await c.import_jobs([]) == []
    arun(tenant_server, body)


def test_with_limits(tenant_server):
    async def body(c):
        jid, tenant = uid("import-limits"), "import-test-limits"
        [r] = await c.import_jobs([ImportJob(jid, {"data": "limited"}, "default", tenant=tenant,
                                             limits=[ConcurrencyLimit("import-queue", 3)])])
        assert r.success
        job = await c.get_job(jid, tenant)
        assert job.limits == [ConcurrencyLimit("import-queue", 3)]
    arun(tenant_server, body)


# ---- raw wire: per-job errors, the Running refusal, forwarding ------------------------------


def _req(client, job_id: str, tenant: str | None = None, **kw) -> pb.ImportJobRequest:
    kw.setdefault("task_group", "imp")
    r = pb.ImportJobRequest(shard=client.shard_for(tenant), id=job_id, **kw)
    if tenant is not None:
        r.tenant = tenant
    return r


def test_each_invalid_job_is_its_own_result(client):
    ok = uid("ok")
    bad_attempt = _req(client, uid("a"), attempts=[pb.ImportAttempt(
        status=pb.ATTEMPT_STATUS_RUNNING)])
    unknown = _req(client, uid("u"), attempts=[pb.ImportAttempt(status=42)])
    jobs = [pb.ImportJobRequest(shard="not-a-uuid", id="x", task_group="imp"),
            _req(client, ""), _req(client, uid("t"), task_group=""),
            _req(client, uid("p"), priority=100), _req(client, uid("m"), metadata={"k" * 64: "v"}),
            bad_attempt, unknown, _req(client, uid("tenant"), tenant="acme"),
            pb.ImportJobRequest(shard=str(uuid.uuid4()), id="y", task_group="imp"),
            _req(client, ok)]
    out = client.stub.ImportJobs(pb.ImportJobsRequest(jobs=jobs), timeout=30).results
    assert [r.error for r in out] == [
        "invalid shard ID: not-a-uuid", "job id is required for import", "task_group is required",
        "priority must be between 0 and 99", "metadata key too long (must be < 64 chars)",
        "import attempts must be terminal (not Running)", "invalid attempt status",
        "tenant must not be provided when tenancy is disabled on the server",
        "shard not found", ""]
    assert [r.id for r in out] == [j.id for j in jobs]
    assert all(not r.success and r.status == pb.JOB_STATUS_FAILED for r in out[:-1])
    assert out[-1].success and not out[-1].HasField("error")
    assert client.get(ok).status == pb.JOB_STATUS_SCHEDULED


def test_reimport_of_a_running_job_fails_the_call(client):
    jid = uid("run")
    client.stub.ImportJobs(pb.ImportJobsRequest(jobs=[_req(client, jid, task_group="imp-run")]),
                           timeout=30)
    [task] = client.lease(5, group="imp-run")
    assert task.job_id == jid
    again = _req(client, jid, task_group="imp-run", attempts=[pb.ImportAttempt(
        status=pb.ATTEMPT_STATUS_FAILED, started_at_ms=1, finished_at_ms=2)])
    with pytest.raises(grpc.RpcError) as e:
        client.stub.ImportJobs(pb.ImportJobsRequest(jobs=[again]), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == (f"cannot reimport job {jid}: job is currently running "
                                 "(status: Running)")
    client.succeed(task)


def test_one_call_spanning_every_shard_and_process(tenant_client):
    """Jobs of many tenants land on every shard (some owned by the other worker process)."""
    c = tenant_client
    tenants = [f"spread-{i}" for i in range(24)]
    jobs = [_req(c, uid("s"), tenant=t) for t in tenants]
    out = c.stub.ImportJobs(pb.ImportJobsRequest(jobs=jobs), timeout=30).results
    assert [r.id for r in out] == [j.id for j in jobs] and all(r.success for r in out)
    assert len({j.shard for j in jobs}) == len(c.owners)
    for j, t in zip(jobs, tenants, strict=True):
        assert c.get(j.id, tenant=t).status == pb.JOB_STATUS_SCHEDULED


# ---- the CLI --------------------------------------------------------------------------------


def test_silo_import_cli(server, client, tmp_path):
    g, now = uid("cli-imp"), now_ms()
    ok1, ok2 = uid("c1"), uid("c2")
    lines = [
        json.dumps({"id": ok1, "task_group": g, "payload": {"a": 1}}),
        "{not json",
        json.dumps({"id": ok2, "task_group": g, "payload": [1], "attempts": [
            {"status": "succeeded", "started_at_ms": now - 9, "finished_at_ms": now,
             "result": {"r": 1}}]}),
        "",
        json.dumps({"id": uid("bad"), "task_group": g, "payload": None, "priority": 300}),
        json.dumps({"task_group": g}),
    ]
    f = tmp_path / "jobs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    p = silo("import", str(f), "--batch", "2", server=server, check=False)
    assert p.returncode == 1, p.stderr
    assert "silo import: 3 jobs sent" in p.stderr
    out = p.stdout.splitlines()
    assert out[0] == "imported 2 jobs (1 Scheduled, 1 Succeeded); 3 failed"
    assert out[1].startswith("  line 2: bad line:")
    assert "line 5 (id bad-" in out[2] and "priority must be between 0 and 99" in out[2]
    assert out[3] == "  line 6: bad line: missing field 'id'"
    assert client.get(ok2).status == pb.JOB_STATUS_SUCCEEDED
    p = subprocess.run([sys.executable, "-m", "silo", "import", "-", "--json", "-q", "--server",
                        server.addr], input=json.dumps({"id": uid("d"), "task_group": g}),
                       capture_output=True, text=True, timeout=30)
    doc = json.loads(p.stdout)
    assert doc["imported"] == 1 and doc["failed"] == [] and doc["statuses"] == {"Scheduled": 1}
