"""The streaming extension (silostream.v1) against the real server: EnqueueMany and the
push-based worker stream, over raw gRPC so each rule is seen on the wire.

Server: tenancy on, 4 shards over 2 worker processes, 1 s leases, reaper every 100 ms
(one test uses the same server with the default 10 s leases). Waits are on stream
messages or job states with generous deadlines.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo._proto import silo_stream_pb2 as spb
from silo._proto import silo_stream_pb2_grpc as spb_grpc
from tests.integration.harness import Server, hash_tenant

TENANTS = [f"t{i}" for i in range(16)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("sdata"), "--tenancy", "--shards", "4",
                "--processes", "2", "--lease-ms", "1000", "--reaper-interval-ms", "100") as s:
        yield s


@pytest.fixture(scope="module")
def srv_long_leases(tmp_path_factory):
    """The same server with the default 10 s leases: for a test that must prove the
    absence of a push, which a 1 s lease expiring on a loaded box would make flaky."""
    with Server(tmp_path_factory.mktemp("sdata-long"), "--tenancy", "--shards", "4",
                "--processes", "2") as s:
        yield s


def arun(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def group() -> str:
    return "st-" + uuid.uuid4().hex[:8]


class Conn:
    """One grpc.aio channel with both stubs and the shard map."""

    def __init__(self, addr: str) -> None:
        self.ch = grpc.aio.insecure_channel(addr)
        self.silo = pb_grpc.SiloStub(self.ch)
        self.stream = spb_grpc.SiloStreamStub(self.ch)
        self.owners: list[pb.ShardOwner] = []

    async def __aenter__(self) -> Conn:
        info = await self.silo.GetClusterInfo(pb.GetClusterInfoRequest())
        self.owners = sorted(info.shard_owners, key=lambda o: o.range_start)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ch.close()

    def shard_for(self, tenant: str) -> str:
        h = hash_tenant(tenant)
        return [o.shard_id for o in self.owners if o.range_start <= h][-1]

    def job(self, tenant: str, g: str, **kw) -> pb.EnqueueRequest:
        req = pb.EnqueueRequest(shard=self.shard_for(tenant), tenant=tenant, task_group=g,
                                **kw)
        req.payload.msgpack = b"\xc0"
        return req

    async def enqueue(self, tenant: str, g: str, **kw) -> str:
        return (await self.silo.Enqueue(self.job(tenant, g, **kw))).id

    async def status(self, tenant: str, job_id: str) -> pb.GetJobResponse:
        return await self.silo.GetJob(pb.GetJobRequest(
            shard=self.shard_for(tenant), id=job_id, tenant=tenant))

    def work(self, g: str, slots: int, worker: str = "w1"):
        call = self.stream.Work()
        first = spb.WorkerUp()
        first.subscribe.worker_id = worker
        first.subscribe.task_group = g
        first.subscribe.slots = slots
        return call, first


async def read_tasks(call, n: int, timeout: float = 15.0) -> list[pb.Task]:
    out: list[pb.Task] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            msg = await call.read()
            assert msg is not grpc.aio.EOF
            out.extend(msg.tasks)
    return out


async def read_until(call, pred, timeout: float = 15.0) -> spb.WorkerDown:
    async with asyncio.timeout(timeout):
        while True:
            msg = await call.read()
            assert msg is not grpc.aio.EOF
            if pred(msg):
                return msg


async def until(pred, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.05)


def success(t: pb.Task) -> pb.ReportOutcomeRequest:
    r = pb.ReportOutcomeRequest(shard=t.shard, task_id=t.id, tenant_id=t.tenant_id)
    r.success.msgpack = b"\xc0"
    return r


# ---- EnqueueMany ------------------------------------------------------------------------


def test_enqueue_many_answers_each_job_with_its_id_or_its_enqueue_error(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            dup = uuid.uuid4().hex
            jobs = [c.job(t, g) for t in TENANTS]
            jobs.append(c.job("t1", g, id=dup))
            jobs.append(c.job("t1", g, id=dup))  # the same id twice in one call
            jobs.append(c.job("t2", g, priority=100))
            bad_tenant = c.job("t3", g)
            bad_tenant.tenant = "t4" if c.shard_for("t4") != c.shard_for("t3") else "zz-other"
            jobs.append(bad_tenant)
            resp = await c.stream.EnqueueMany(spb.EnqueueManyRequest(jobs=jobs))
            res = list(resp.results)
            assert len(res) == len(jobs)
            assert all(r.WhichOneof("result") == "id" for r in res[:16])
            dup_results = sorted(r.WhichOneof("result") for r in res[16:18])
            assert dup_results == ["error", "id"]
            err = next(r.error for r in res[16:18] if r.WhichOneof("result") == "error")
            assert err.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            assert res[18].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "priority" in res[18].error.message
            if c.shard_for(bad_tenant.tenant) != bad_tenant.shard:
                assert res[19].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            for t, r in zip(TENANTS, res[:16], strict=True):  # durable and visible
                st = await c.status(t, r.id)
                assert st.status == pb.JOB_STATUS_SCHEDULED

    arun(body())


PROCESSES = 2  # the srv fixture's --processes


def scrape(srv) -> list[tuple[str, float]]:
    with urllib.request.urlopen(srv.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return [(line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines() if line and not line.startswith("#")]


def flushed_forwarded_calls(srv, *methods: str) -> list[float]:
    """The counts of every call made before now: workers flush counts once a second, so wait
    until each worker's last flush began after this call (silo_metrics_flushed_at_seconds)."""
    since = time.time()
    deadline = time.monotonic() + 30
    while True:
        rows = scrape(srv)
        flushed = [v for name, v in rows if name.startswith("silo_metrics_flushed_at_seconds{")]
        if len(flushed) >= PROCESSES and all(v > since for v in flushed):
            return [sum(v for name, v in rows if name.startswith("silo_forwarded_calls_total{")
                        and f'method="{m}"' in name) for m in methods]
        assert time.monotonic() < deadline, f"workers did not flush metrics: {flushed}"
        time.sleep(0.2)


def test_enqueue_many_relays_one_call_per_owner_process_not_one_per_job(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            jobs = [c.job(t, g) for t in TENANTS for _ in range(2)]
            resp = await c.stream.EnqueueMany(spb.EnqueueManyRequest(jobs=jobs))
            assert all(r.WhichOneof("result") == "id" for r in resp.results)
            for t, r in zip([t for t in TENANTS for _ in range(2)], resp.results, strict=True):
                assert (await c.status(t, r.id)).status == pb.JOB_STATUS_SCHEDULED

    before = flushed_forwarded_calls(srv, "Enqueue", "EnqueueMany@local")
    arun(body())
    enqueues, batches = (a - b for a, b in zip(
        flushed_forwarded_calls(srv, "Enqueue", "EnqueueMany@local"), before, strict=True))
    # 32 jobs over 4 shards in 2 processes: the other process's half went as one relay
    assert (batches, enqueues) == (1, 0)


# ---- the worker stream -------------------------------------------------------------------


def test_a_task_enqueued_after_subscribing_is_pushed_without_any_lease_call(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            call, first = c.work(g, slots=4)
            await call.write(first)
            await asyncio.sleep(0.2)  # the subscription is parked waiting, nothing queued
            job_id = await c.enqueue("t5", g)
            (task,) = await read_tasks(call, 1)
            assert task.job_id == job_id and task.task_group == g and task.lease_ms == 1000
            st = await c.status("t5", job_id)
            assert st.status == pb.JOB_STATUS_RUNNING
            call.cancel()

    arun(body())


def test_one_stream_receives_tasks_from_every_shard_of_the_node(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            call, first = c.work(g, slots=64)
            await call.write(first)
            for t in TENANTS:
                await c.enqueue(t, g)
            tasks = await read_tasks(call, len(TENANTS))
            assert {t.shard for t in tasks} == {o.shard_id for o in c.owners}
            call.cancel()

    arun(body())


def test_no_more_tasks_than_free_slots(srv_long_leases):
    async def body():
        async with Conn(srv_long_leases.addr) as c:
            g = group()
            for t in TENANTS[:6]:
                await c.enqueue(t, g)
            call, first = c.work(g, slots=2)
            await call.write(first)
            tasks = await read_tasks(call, 2)
            assert len(tasks) == 2
            extra = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait([extra], timeout=0.3)
            assert not done, "a task beyond the free slots was pushed"
            # One outcome + one slot back: exactly one more task.
            await call.write(spb.WorkerUp(outcomes=[success(tasks[0])], add_slots=1))
            got: list[pb.Task] = []
            acks: list[spb.Ack] = []
            async with asyncio.timeout(15):
                while not (got and acks):
                    msg = await extra
                    extra = asyncio.ensure_future(call.read())
                    got.extend(msg.tasks)
                    acks.extend(msg.acks)
            assert len(got) == 1 and got[0].id not in {t.id for t in tasks}
            assert acks[0].kind == spb.Ack.OUTCOME and not acks[0].HasField("error")
            extra.cancel()
            call.cancel()

    arun(body())


def test_outcomes_of_the_other_process_go_as_one_relay_with_per_item_codes(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            ids = {t: await c.enqueue(t, g) for t in TENANTS}  # shards of both processes
            call, first = c.work(g, slots=len(TENANTS))
            await call.write(first)
            tasks = await read_tasks(call, len(TENANTS))
            assert {t.job_id for t in tasks} == set(ids.values())

            async def acks_of(up: spb.WorkerUp, n: int) -> dict[str, spb.Ack]:
                await call.write(up)
                got: dict[str, spb.Ack] = {}
                async with asyncio.timeout(15):
                    while len(got) < n:
                        got.update({a.task_id: a for a in (await call.read()).acks})
                return got

            acks = await acks_of(spb.WorkerUp(outcomes=[success(t) for t in tasks]), len(tasks))
            assert not any(a.HasField("error") for a in acks.values())
            for t, job_id in ids.items():
                assert (await c.status(t, job_id)).status == pb.JOB_STATUS_SUCCEEDED
            # Reported again: every item gets the unary call's own error, relayed or not.
            acks = await acks_of(spb.WorkerUp(outcomes=[success(t) for t in tasks]), len(tasks))
            assert {(a.error.code, a.error.message) for a in acks.values()} == {
                (grpc.StatusCode.NOT_FOUND.value[0], "lease not found")}
            call.cancel()

    before = flushed_forwarded_calls(srv, "ReportOutcome", "UnaryMany@local")
    arun(body())
    outcomes, batches = (a - b for a, b in zip(
        flushed_forwarded_calls(srv, "ReportOutcome", "UnaryMany@local"), before, strict=True))
    assert batches >= 2, "outcomes were not relayed in batches"
    assert outcomes == 0


def test_a_relayed_lease_that_filled_its_slots_leases_again_without_a_wait_call(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            for t in TENANTS * 3:
                await c.enqueue(t, g)
            call, first = c.work(g, slots=2)
            await call.write(first)
            done = 0
            while done < len(TENANTS) * 3:  # run them two at a time
                tasks = await read_tasks(call, 1)
                done += len(tasks)
                await call.write(spb.WorkerUp(outcomes=[success(t) for t in tasks],
                                              add_slots=len(tasks)))
            call.cancel()

    before = flushed_forwarded_calls(srv, "StreamWait@local", "LeaseTasks@local")
    arun(body())
    waits, leases = (a - b for a, b in zip(
        flushed_forwarded_calls(srv, "StreamWait@local", "LeaseTasks@local"), before,
        strict=True))
    assert leases > 0
    assert waits < leases  # before: one wait call before every relayed lease


def test_outcome_and_heartbeat_flow_up_and_are_acked_with_the_unary_codes(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            a = await c.enqueue("t6", g)
            b = await c.enqueue("t7", g)
            call, first = c.work(g, slots=2)
            await call.write(first)
            tasks = {t.job_id: t for t in await read_tasks(call, 2)}
            ta, tb = tasks[a], tasks[b]
            hb = pb.HeartbeatRequest(shard=tb.shard, worker_id="w1", task_id=tb.id,
                                     tenant_id=tb.tenant_id)
            wrong = pb.HeartbeatRequest(shard=tb.shard, worker_id="other", task_id=tb.id,
                                        tenant_id=tb.tenant_id)
            await call.write(spb.WorkerUp(outcomes=[success(ta)], heartbeats=[hb]))
            acks: dict[int, spb.Ack] = {}
            async with asyncio.timeout(15):
                while len(acks) < 2:
                    msg = await call.read()
                    acks.update({k.kind: k for k in msg.acks})
            assert not acks[spb.Ack.OUTCOME].HasField("error")
            assert not acks[spb.Ack.HEARTBEAT].HasField("error")
            assert not acks[spb.Ack.HEARTBEAT].cancelled
            assert (await c.status("t6", a)).status == pb.JOB_STATUS_SUCCEEDED
            # The same errors as the unary calls: a second outcome, a foreign heartbeat.
            await call.write(spb.WorkerUp(outcomes=[success(ta)], heartbeats=[wrong]))
            acks = {}
            async with asyncio.timeout(15):
                while len(acks) < 2:
                    msg = await call.read()
                    acks.update({k.kind: k for k in msg.acks})
            assert acks[spb.Ack.OUTCOME].error.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert acks[spb.Ack.OUTCOME].error.message == "lease not found"
            assert acks[spb.Ack.HEARTBEAT].error.code == \
                grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert acks[spb.Ack.HEARTBEAT].error.message == "lease owner mismatch"
            # Cancel flows down (a heartbeat first: the lease is only 1 s).
            await c.silo.Heartbeat(hb)
            await c.silo.CancelJob(pb.CancelJobRequest(shard=tb.shard, id=b, tenant="t7"))
            msg = await read_until(call, lambda m: bool(m.cancelled))
            assert msg.cancelled[0].task_id == tb.id
            await call.write(spb.WorkerUp(heartbeats=[hb]))
            msg = await read_until(call, lambda m: bool(m.acks))
            assert msg.acks[0].cancelled and msg.acks[0].cancelled_at_ms > 0
            call.cancel()

    arun(body())


def test_a_cut_stream_leaves_its_leases_to_expire_and_the_job_is_retried(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            job_id = await c.enqueue("t8", g, retry_policy=pb.RetryPolicy(
                retry_count=2, initial_interval_ms=1, max_interval_ms=1, backoff_factor=1.0))
            call, first = c.work(g, slots=1)
            await call.write(first)
            (task,) = await read_tasks(call, 1)
            assert task.attempt_number == 1
            call.cancel()  # cut mid-flight: the worker may be running it
            call2, first2 = c.work(g, slots=1, worker="w2")
            await call2.write(first2)
            (again,) = await read_tasks(call2, 1)  # after the 1 s lease expired
            assert again.job_id == job_id and again.attempt_number == 2
            st = await c.status("t8", job_id)
            assert st.attempts[0].status == pb.ATTEMPT_STATUS_FAILED if st.attempts else True
            call2.cancel()

    arun(body())


def test_stop_then_give_back_returns_unstarted_tasks_at_once_without_an_attempt(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            job_id = await c.enqueue("t9", g)
            call, first = c.work(g, slots=1)
            await call.write(first)
            (task,) = await read_tasks(call, 1)
            await call.write(spb.WorkerUp(stop=True))
            await read_until(call, lambda m: m.stopped)
            await call.write(spb.WorkerUp(give_back=[spb.TaskRef(
                shard=task.shard, task_id=task.id, tenant_id="t9")]))
            msg = await read_until(call, lambda m: bool(m.acks))
            assert msg.acks[0].kind == spb.Ack.GIVE_BACK and not msg.acks[0].HasField("error")
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            st = await c.status("t9", job_id)
            assert st.status == pb.JOB_STATUS_SCHEDULED
            # Leasable at once, same attempt number (no attempt was counted).
            leased = await c.silo.LeaseTasks(pb.LeaseTasksRequest(
                shard=task.shard, worker_id="w3", max_tasks=1, task_group=g))
            assert [t.job_id for t in leased.tasks] == [job_id]
            assert leased.tasks[0].attempt_number == 1

    arun(body())


def test_a_subscription_without_task_group_is_invalid(srv):
    async def body():
        async with Conn(srv.addr) as c:
            call, first = c.work("", slots=1)
            await call.write(first)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    arun(body())


# ---- the batch paths answer each bad item exactly as the unary call ----------------------


def _bad_jobs(c: Conn, g: str) -> list[pb.EnqueueRequest]:
    """One job per rule of Enqueue (routing, tenant, fields, limits, retry policy)."""
    other = next(t for t in TENANTS if c.shard_for(t) != c.shard_for("t3"))
    out = [c.job("t1", g, priority=100), c.job("t1", ""), c.job("t1", "g" * 300),
           c.job("t1", g, metadata={"k" * 100: "v"}), c.job("t1", g, start_at_ms=1 << 62),
           c.job("t1", g, limits=[pb.Limit(concurrency=pb.ConcurrencyLimit(
               key="k", max_concurrency=0))]),
           c.job("t1", g, retry_policy=pb.RetryPolicy(retry_count=1, backoff_factor=-1.0)),
           c.job("t1", g, id="x" * 500)]
    no_tenant = c.job("t1", g)
    no_tenant.ClearField("tenant")
    long_tenant = c.job("t1", g)
    long_tenant.tenant = "t" * 65
    wrong_shard = c.job("t3", g)
    wrong_shard.tenant = other
    bad_id = c.job("t1", g)
    bad_id.shard = "not-a-shard"
    unknown = c.job("t1", g)
    unknown.shard = str(uuid.uuid4())
    return [*out, no_tenant, long_tenant, wrong_shard, bad_id, unknown]


def test_enqueue_many_fails_each_bad_job_with_the_unary_enqueues_code_and_phrase(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            bad = _bad_jobs(c, g)
            unary = []
            for job in bad:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.silo.Enqueue(job)
                unary.append((e.value.code().value[0], e.value.details()))
            jobs = []
            for i, job in enumerate(bad):  # good jobs in between: they still succeed
                jobs += [job, c.job(TENANTS[i % 16], g)]
            res = list((await c.stream.EnqueueMany(spb.EnqueueManyRequest(jobs=jobs))).results)
            assert [(r.error.code, r.error.message) for r in res[0::2]] == unary
            for i, r in enumerate(res[1::2]):
                assert r.WhichOneof("result") == "id"
                assert (await c.status(TENANTS[i % 16], r.id)).status == pb.JOB_STATUS_SCHEDULED

    arun(body())


def test_enqueued_in_a_batch_or_alone_a_job_reads_back_the_same(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            kw = dict(priority=7, metadata={"a": "1", "b": "2"}, start_at_ms=1,
                      retry_policy=pb.RetryPolicy(retry_count=2, initial_interval_ms=10,
                                                  max_interval_ms=100, backoff_factor=2.0),
                      limits=[pb.Limit(concurrency=pb.ConcurrencyLimit(key="k",
                                                                       max_concurrency=5))])
            alone = await c.enqueue("t5", g, **kw)
            res = (await c.stream.EnqueueMany(spb.EnqueueManyRequest(
                jobs=[c.job("t5", g, **kw)]))).results
            a, b = await c.status("t5", alone), await c.status("t5", res[0].id)
            for m in (a, b):
                m.ClearField("id")
                m.ClearField("enqueue_time_ms")
                m.ClearField("status_changed_at_ms")
            assert a == b

    arun(body())


def test_stream_outcomes_fail_and_succeed_exactly_as_the_unary_report(srv):
    async def body():
        async with Conn(srv.addr) as c:
            g = group()
            ids = {t: await c.enqueue(t, g, retry_policy=pb.RetryPolicy(
                retry_count=1, initial_interval_ms=1, max_interval_ms=1, backoff_factor=1.0))
                for t in TENANTS[:6]}
            call, first = c.work(g, slots=6)
            await call.write(first)
            tasks = {t.job_id: t for t in await read_tasks(call, 6)}
            by_tenant = {t: tasks[j] for t, j in ids.items()}
            ok = success(by_tenant["t0"])
            cancelled = pb.ReportOutcomeRequest(shard=by_tenant["t1"].shard,
                                                task_id=by_tenant["t1"].id, tenant_id="t1")
            cancelled.cancelled.SetInParent()
            failed = pb.ReportOutcomeRequest(shard=by_tenant["t2"].shard,
                                             task_id=by_tenant["t2"].id, tenant_id="t2")
            failed.failure.code = "E"
            no_outcome = pb.ReportOutcomeRequest(shard=by_tenant["t3"].shard,
                                                 task_id=by_tenant["t3"].id, tenant_id="t3")
            no_tenant = success(by_tenant["t4"])
            no_tenant.ClearField("tenant_id")
            unknown = success(by_tenant["t5"])
            unknown.task_id = str(uuid.uuid4())
            bad = [no_outcome, no_tenant, unknown]
            unary = []
            for r in bad:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.silo.ReportOutcome(r)
                unary.append((e.value.code().value[0], e.value.details()))
            items = [ok, cancelled, failed, *bad]
            await call.write(spb.WorkerUp(outcomes=items, add_slots=1))
            acks: dict[str, spb.Ack] = {}
            pushed: list[pb.Task] = []
            async with asyncio.timeout(15):
                while len(acks) < len(items):
                    msg = await call.read()
                    acks.update({a.task_id: a for a in msg.acks})
                    pushed.extend(msg.tasks)
            for r in (ok, cancelled, failed):
                assert not acks[r.task_id].HasField("error")
            # one ack per task id: the bad items of t3/t5 share none with the good ones
            assert [(acks[r.task_id].error.code, acks[r.task_id].error.message)
                    for r in (no_outcome, unknown)] == [unary[0], unary[2]]
            assert (await c.status("t0", ids["t0"])).status == pb.JOB_STATUS_SUCCEEDED
            assert (await c.status("t1", ids["t1"])).status == pb.JOB_STATUS_CANCELLED
            retried = pushed or await read_tasks(call, 1)  # the failure was retried
            assert retried[0].job_id == ids["t2"] and retried[0].attempt_number == 2
            call.cancel()

    arun(body())
