"""The Python client SDK (silo.client) against the real server, plus an in-process fake
node for the routing retries a single-node server cannot produce (owner trailer,
UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.client import (
    ConcurrencyLimit,
    FailedPrecondition,
    Failure,
    ImportJob,
    InvalidArgument,
    JobAlreadyExists,
    JobNotFound,
    JobNotTerminal,
    JobStatus,
    LeaseLost,
    RateLimit,
    RateLimitRetryPolicy,
    RetryPolicy,
    SiloClient,
    Unauthenticated,
    Unavailable,
)
from silo.client.sync import SyncSiloClient
from silo.worker import Worker
from tests.integration.harness import Server


def group() -> str:
    return "sdk-" + uuid.uuid4().hex[:8]


def arun(fn, timeout: float = 30.0):
    """Run an async test body on a fresh event loop with an overall deadline."""
    return asyncio.run(asyncio.wait_for(fn(), timeout))


def new_client(addr: str, **kw) -> SiloClient:
    kw.setdefault("topology_refresh_interval_s", 0)
    kw.setdefault("retry_delay_s", 0.01)
    return SiloClient([addr], **kw)


# ---- job API against the real server ---------------------------------------------------


def test_enqueue_get_and_manual_task_lifecycle(server):
    async def body():
        async with new_client(server.addr) as c:
            g = group()
            limits = [ConcurrencyLimit("q", 3),
                      RateLimit("r", "u", 10, 1000,
                                retry_policy=RateLimitRetryPolicy(5, 50, 1.5, 2))]
            h = await c.enqueue({"hello": ["world", 1]}, g, priority=7, metadata={"k": "v"},
                                retry_policy=RetryPolicy(2, 10, 100), limits=limits)
            assert h.tenant is None and h.id
            job = await h.get()
            assert job.status == JobStatus.SCHEDULED and job.payload == {"hello": ["world", 1]}
            assert job.priority == 7 and job.metadata == {"k": "v"} and job.task_group == g
            assert job.retry_policy == RetryPolicy(2, 10, 100)
            assert job.limits == limits
            with pytest.raises(JobNotTerminal) as e:
                await h.result()
            assert e.value.status == JobStatus.SCHEDULED and "Scheduled" in str(e.value)
            task = await c.lease_task(h.id, "w-manual")
            assert task.job_id == h.id and task.attempt_number == 1 and task.lease_ms == 1000
            assert task.payload == {"hello": ["world", 1]} and task.tenant_id is None
            assert task.shard == (await c.shard_for_tenant(None)).shard_id
            assert await h.status() == JobStatus.RUNNING
            assert await c.heartbeat("w-manual", task.id, task.shard) is False
            with pytest.raises(LeaseLost, match="lease owner mismatch"):
                await c.heartbeat("someone-else", task.id, task.shard)
            await c.report_outcome(task.id, task.shard, {"answer": 42})
            r = await h.await_result(timeout=5, poll_interval=0.05)
            assert r.succeeded and r.result == {"answer": 42} and r.finished_at_ms > 0
            job = await h.get(include_attempts=True)
            assert job.result == {"answer": 42} and len(job.attempts) == 1
            with pytest.raises(LeaseLost, match="lease not found"):
                await c.report_outcome(task.id, task.shard, "again")
            await h.delete()
            with pytest.raises(JobNotFound) as e:
                await h.get()
            assert e.value.job_id == h.id and "not found" in str(e.value)
            await h.delete()  # idempotent

    arun(body)


def test_lifecycle_through_a_worker_success_failure_cancel(server):
    async def handler(ctx):
        p = ctx.payload
        if p["kind"] == "fail":
            return Failure("BAD_INPUT", {"why": p["n"]})
        if p["kind"] == "raise":
            raise ValueError(f"boom {p['n']}")
        return {"double": p["n"] * 2}

    async def body():
        async with new_client(server.addr) as c:
            g = group()
            ok = [await c.enqueue({"kind": "ok", "n": i}, g) for i in range(5)]
            bad = await c.enqueue({"kind": "fail", "n": 1}, g)
            boom = await c.enqueue({"kind": "raise", "n": 2}, g)
            later = await c.enqueue({"kind": "ok", "n": 0}, g,
                                    start_at_ms=int(time.time() * 1000) + 3_600_000)
            async with Worker(c, g, handler, poll_interval=0.05, heartbeat_interval=0.5) as w:
                for i, h in enumerate(ok):
                    r = await h.await_result(timeout=10, poll_interval=0.05)
                    assert r.status == JobStatus.SUCCEEDED and r.result == {"double": 2 * i}
                r = await bad.await_result(timeout=10, poll_interval=0.05)
                assert r.failed and r.error_code == "BAD_INPUT" and r.error_data == {"why": 1}
                r = await boom.await_result(timeout=10, poll_interval=0.05)
                assert r.failed and r.error_code == "HANDLER_ERROR"
                assert r.error_data["name"] == "ValueError"
                assert r.error_data["message"] == "boom 2"
                assert "Traceback" in r.error_data["stack"] and "boom 2" in r.error_data["stack"]
                await later.cancel()
                r = await later.await_result(timeout=5, poll_interval=0.05)
                assert r.cancelled and r.result is None and r.error_code is None
                assert w.stats.succeeded == 5 and w.stats.failed == 2

    arun(body)


def test_typed_errors(server):
    async def body():
        async with new_client(server.addr) as c:
            g = group()
            jid = "dup-" + uuid.uuid4().hex
            await c.enqueue(1, g, id=jid)
            with pytest.raises(JobAlreadyExists) as e:
                await c.enqueue(2, g, id=jid)
            assert e.value.job_id == jid and e.value.code == grpc.StatusCode.ALREADY_EXISTS
            with pytest.raises(InvalidArgument, match="priority must be between 0 and 99"):
                await c.enqueue(1, g, priority=100)
            t = await c.lease_task(jid, "w")
            await c.report_outcome(t.id, t.shard, None)
            with pytest.raises(FailedPrecondition, match="terminal state"):
                await c.cancel_job(jid)
            for call in (c.get_job, c.get_job_result, c.cancel_job, c.expedite_job,
                         c.restart_job):
                with pytest.raises(JobNotFound):
                    await call("missing-" + uuid.uuid4().hex)
            with pytest.raises(LeaseLost, match="lease not found"):
                await c.heartbeat("w", str(uuid.uuid4()), t.shard)
            # Tenancy is off: a tenant is refused, and this is not retried.
            with pytest.raises(FailedPrecondition, match="tenancy is disabled"):
                await c.enqueue(1, g, tenant="acme")
            assert c.stats.wrong_shard_retries == c.stats.connectivity_retries == 0
            # A bad import is a per-job result, not an error.
            [r] = await c.import_jobs([ImportJob("imp-1", {"a": 1}, g, priority=100)])
            assert not r.success and r.error == "priority must be between 0 and 99"

    arun(body)


def test_await_result_timeout_and_expedite_restart(server):
    async def body():
        async with new_client(server.addr) as c:
            g = group()
            h = await c.enqueue("x", g, start_at_ms=int(time.time() * 1000) + 3_600_000)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError) as e:
                await h.await_result(timeout=0.3, poll_interval=0.1)
            assert str(e.value) == f"Timeout waiting for job {h.id} to complete after 300ms"
            assert 0.25 < time.monotonic() - t0 < 3
            assert (await c.lease_tasks("w", 5, g)).tasks == []
            await h.expedite()
            [task] = (await c.lease_tasks("w", 5, g)).tasks
            await c.report_outcome(task.id, task.shard, Failure("E", b"\x01"),
                                   task.tenant_id)
            r = await h.await_result(timeout=5, poll_interval=0.05)
            assert r.failed and r.error_code == "E"
            await h.restart()
            assert await h.status() == JobStatus.SCHEDULED
            await h.expedite()  # a restart keeps the original (future) start time
            [task] = (await c.lease_tasks("w", 5, g)).tasks
            assert task.job_id == h.id and task.attempt_number == 2
            await c.report_outcome(task.id, task.shard, "second time")
            assert (await h.await_result(timeout=5, poll_interval=0.05)).result == "second time"

    arun(body)


def test_seed_alias_is_replaced_by_the_advertised_address(server):
    port = server.addr.rsplit(":", 1)[1]

    async def body():
        async with new_client(f"localhost:{port}") as c:
            await c.get_topology()
            assert c.addresses == [server.addr]
            assert {s.grpc_addr for s in c.topology.shards} == {server.addr}
            h = await c.enqueue(1, group())
            assert (await h.status()) == JobStatus.SCHEDULED

    arun(body)


def test_wrong_shard_is_retried_after_a_topology_refresh(server):
    async def body():
        async with new_client(server.addr) as c:
            topo = await c.get_topology()
            right = topo.shard_for_tenant(None)
            real_id = right.shard_id
            # Point the default tenant's range at a shard this server does not have.
            bogus = str(uuid.uuid4())
            del topo.by_id[real_id]
            right.shard_id = bogus
            topo.by_id[bogus] = right
            h = await c.enqueue({"x": 1}, group())
            assert c.stats.wrong_shard_retries == 1 and c.stats.topology_refreshes == 2
            assert c.topology is not topo
            assert (await c.shard_for_tenant(None)).shard_id == real_id
            assert (await h.get()).payload == {"x": 1}

    arun(body)


def test_sync_facade(server):
    g = group()
    with SyncSiloClient([server.addr], topology_refresh_interval_s=0) as c:
        h = c.enqueue({"n": 1}, g)
        assert h.status() == JobStatus.SCHEDULED and h.get().payload == {"n": 1}
        task = c.lease_task(h.id, "w")
        assert c.heartbeat("w", task.id, task.shard) is False
        c.report_outcome(task.id, task.shard, "done")
        assert h.await_result(timeout=5, poll_interval=0.05).result == "done"
        assert c.handle(h.id).result().result == "done"
        with pytest.raises(JobNotFound):
            c.get_job("missing")


def test_reset_shards_wipes_everything(server):
    async def body():
        async with new_client(server.addr) as c:
            h = await c.enqueue(1, group())
            assert await c.reset_shards() == 8
            with pytest.raises(JobNotFound):
                await h.get()

    arun(body)


# ---- tenancy: routing across every shard -----------------------------------------------


def test_many_tenants_route_to_every_shard(tenant_server):
    async def body():
        async with new_client(tenant_server.addr) as c:
            g = group()
            tenants = [f"tenant-{i}" for i in range(200)] + ["ünï", "x" * 64]
            handles = await asyncio.gather(*(c.enqueue({"t": t}, g, tenant=t)
                                             for t in tenants))
            assert c.stats.wrong_shard_retries == 0
            for t, h in zip(tenants, handles, strict=True):
                assert h.tenant == t
            jobs = await asyncio.gather(*(h.get() for h in handles))
            assert [j.payload["t"] for j in jobs] == tenants
            seen = []
            while len(seen) < len(tenants):
                batch = (await c.lease_tasks("w", 100, g)).tasks
                assert batch
                seen.extend(batch)
            shards = set()
            for task in seen:
                owner = await c.shard_for_tenant(task.tenant_id)
                assert task.shard == owner.shard_id and task.payload == {"t": task.tenant_id}
                shards.add(task.shard)
                await c.heartbeat("w", task.id, task.shard, task.tenant_id)
                await c.report_outcome(task.id, task.shard, task.tenant_id, task.tenant_id)
            assert len(shards) == 4 == len(c.topology.shards)
            r = await handles[0].await_result(timeout=5, poll_interval=0.05)
            assert r.result == tenants[0]
            with pytest.raises(InvalidArgument, match="tenant id required"):
                await c.enqueue(1, g)  # no tenant while tenancy is on
            with pytest.raises(JobNotFound):
                await c.get_job(handles[0].id, tenant="some-other-tenant")

    arun(body)


def test_bearer_token(tmp_path):
    with Server(tmp_path, "--auth-token", "s3cret", "--shards", "2") as s:
        async def body():
            async with new_client(s.addr, token="s3cret") as c:
                h = await c.enqueue(1, group())
                assert await h.status() == JobStatus.SCHEDULED

            async def token_fn():
                return "s3cret"

            async with new_client(s.addr, token=token_fn) as c:
                assert (await c.enqueue(1, group())).id
            async with new_client(s.addr, token="wrong") as c:
                with pytest.raises(Exception) as e:
                    await c.enqueue(1, group())
                assert getattr(e.value, "code", None) == grpc.StatusCode.UNAUTHENTICATED
            async with new_client(s.addr, token="s3cret") as c:
                await c.get_topology()
                c.__dict__["_static_md"] = (("authorization", "Bearer nope"),)
                with pytest.raises(Unauthenticated):
                    await c.get_job("x")

        arun(body)


# ---- a fake node for the retries a single node cannot produce -------------------------


class FakeNode(pb_grpc.SiloServicer):
    """Advertises itself as the owner of every shard; misbehaves on Enqueue as told."""

    def __init__(self, shard_ids: list[str]) -> None:
        self.addr = ""
        self.shard_ids = shard_ids
        self.calls: dict[str, int] = {}
        self.enqueue_script: list = []  # per call: ("unavailable"|"moved"|"precondition"|"ok", arg)

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def GetClusterInfo(self, request, context):
        self._count("GetClusterInfo")
        n = len(self.shard_ids)
        bounds = [format((i << 64) // n, "016x") for i in range(1, n)]
        owners = [pb.ShardOwner(shard_id=sid, grpc_addr=self.addr, node_id="fake",
                                range_start=s, range_end=e)
                  for sid, s, e in zip(self.shard_ids, [""] + bounds, bounds + [""],
                                       strict=True)]
        return pb.GetClusterInfoResponse(num_shards=n, shard_owners=owners)

    async def Enqueue(self, request, context):
        self._count("Enqueue")
        what, arg = self.enqueue_script.pop(0) if self.enqueue_script else ("ok", None)
        if what == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shard not ready: opening")
        if what == "moved":
            context.set_trailing_metadata((("x-silo-shard-owner-addr", arg),))
            await context.abort(grpc.StatusCode.NOT_FOUND, "shard not found")
        if what == "precondition":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "tenant '-' is not within shard range; refresh topology and retry")
        return pb.EnqueueResponse(id=f"fake-{request.shard}")


async def start_fake(shard_ids: list[str]) -> tuple[grpc.aio.Server, FakeNode]:
    fake = FakeNode(shard_ids)
    srv = grpc.aio.server()
    pb_grpc.add_SiloServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    fake.addr = f"127.0.0.1:{port}"
    await srv.start()
    return srv, fake


def real_shard_ids(server) -> list[str]:
    c = server.client()
    try:
        return [o.shard_id for o in c.owners]
    finally:
        c.channel.close()


def test_owner_trailer_is_followed_without_a_refresh(server):
    ids = real_shard_ids(server)

    async def body():
        srv, fake = await start_fake(ids)
        try:
            async with new_client(fake.addr) as c:
                fake.enqueue_script = [("moved", server.addr)]
                h = await c.enqueue({"via": "trailer"}, group())
                assert not h.id.startswith("fake-")  # the real server created it
                assert fake.calls == {"GetClusterInfo": 1, "Enqueue": 1}
                assert c.stats.wrong_shard_retries == 1 and c.stats.topology_refreshes == 1
                assert (await c.shard_for_tenant(None)).grpc_addr == server.addr
                assert (await h.get()).payload == {"via": "trailer"}
        finally:
            await srv.stop(None)

    arun(body)


def test_unavailable_is_retried_with_backoff_then_gives_up(server):
    async def body():
        srv, fake = await start_fake([str(uuid.uuid4()) for _ in range(2)])
        try:
            async with new_client(fake.addr, retry_delay_s=0.05) as c:
                # 20 concurrent first calls share one topology load.
                fake.enqueue_script = []
                await asyncio.gather(*(c.enqueue(i, "g") for i in range(20)))
                assert fake.calls == {"GetClusterInfo": 1, "Enqueue": 20}
                fake.enqueue_script = [("unavailable", None), ("unavailable", None)]
                t0 = time.monotonic()
                h = await c.enqueue(1, "g")
                assert time.monotonic() - t0 >= 0.05 + 0.1  # 50 ms then 100 ms
                assert h.id.startswith("fake-")
                assert c.stats.connectivity_retries == 2 and c.stats.topology_refreshes == 3
                fake.enqueue_script = [("precondition", None)]
                with pytest.raises(FailedPrecondition, match="refresh topology and retry"):
                    await c.enqueue(1, "g")  # never retried
                assert fake.calls["Enqueue"] == 24
            async with new_client(fake.addr, retry_delay_s=0.01, max_retries=2) as c:
                fake.enqueue_script = [("unavailable", None)] * 5
                with pytest.raises(Unavailable, match="shard not ready"):
                    await c.enqueue(1, "g")
                assert fake.calls["Enqueue"] == 27  # first try + 2 retries
        finally:
            await srv.stop(None)

    arun(body)
