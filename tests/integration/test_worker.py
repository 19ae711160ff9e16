"""silo.worker.Worker against the real server (lease 1000 ms, reaper every 100 ms).

Every wait is on an event or a job status with a generous deadline, never on a bare
sleep, so the tests do not depend on machine speed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from silo.client import AttemptStatus, JobStatus, SiloClient
from silo.worker import Cancelled, Worker


def group() -> str:
    return "wk-" + uuid.uuid4().hex[:8]


def arun(fn, timeout: float = 40.0):
    return asyncio.run(asyncio.wait_for(fn(), timeout))


def new_client(addr: str) -> SiloClient:
    return SiloClient([addr], topology_refresh_interval_s=0, retry_delay_s=0.01)


async def until(pred, timeout: float = 10.0, step: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while True:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(step)


def test_concurrency_cap_is_respected(server):
    cap = 3
    state = {"running": 0, "peak": 0}

    async def body():
        reached = asyncio.Event()

        async def handler(ctx):
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            if state["running"] == cap:
                reached.set()
            try:
                # Hold the slot until the cap was reached once (or a while passed).
                await asyncio.wait_for(reached.wait(), 5)
                await asyncio.sleep(0.02)
                return ctx.payload
            finally:
                state["running"] -= 1

        async with new_client(server.addr) as c:
            g = group()
            handles = [await c.enqueue(i, g) for i in range(15)]
            async with Worker(c, g, handler, concurrency=cap, pollers=2,
                              poll_interval=0.02, heartbeat_interval=0.5) as w:
                assert w.tasks_per_poll == 2  # ceil(3 / 2)
                for i, h in enumerate(handles):
                    assert (await h.await_result(timeout=15, poll_interval=0.05)).result == i
                # A result is visible before the worker has freed the slot; wait for that.
                assert await w.wait_idle(5)
                assert w.active_tasks == 0  # (slots may be reserved by a poll in flight)
        assert state["peak"] == cap
        assert w.stats.succeeded == 15 and w.stats.tasks_received == 15

    arun(body)


def test_heartbeats_keep_a_task_alive_past_its_lease(server):
    async def handler(ctx):
        await asyncio.sleep(3.0)  # three times the 1 s lease
        assert not ctx.cancelled
        return "survived"

    async def body():
        async with new_client(server.addr) as c:
            g = group()
            h = await c.enqueue(None, g)
            async with Worker(c, g, handler, poll_interval=0.05, heartbeat_interval=0.25) as w:
                r = await h.await_result(timeout=20, poll_interval=0.1)
            assert r.succeeded and r.result == "survived"
            job = await h.get(include_attempts=True)
            assert [a.status for a in job.attempts] == [AttemptStatus.SUCCEEDED]
            assert w.stats.heartbeats >= 5 and w.stats.lease_lost == 0

    arun(body)


def test_lost_lease_aborts_the_handler_and_reports_nothing(server):
    seen = {}

    async def handler(ctx):
        # Heartbeats come every 2.5 s, the lease lasts 1 s: the reaper takes it first.
        seen["signalled"] = await ctx.wait_cancelled(timeout=15)
        seen["reason"] = ctx.cancel_reason
        return "too late"

    async def body():
        async with new_client(server.addr) as c:
            g = group()
            h = await c.enqueue(None, g)
            async with Worker(c, g, handler, poll_interval=0.05, heartbeat_interval=2.5) as w:
                r = await h.await_result(timeout=15, poll_interval=0.1)
                await until(lambda: w.stats.lease_lost == 1)
                assert await w.wait_idle(5)
            assert r.failed and r.error_code == "WORKER_CRASHED"
            assert seen == {"signalled": True, "reason": "lease-lost"}
            assert w.stats.succeeded == w.stats.failed == w.stats.cancelled == 0

    arun(body)


def test_server_side_cancel_reaches_a_running_handler(server):
    async def body():
        started = asyncio.Event()
        seen = {}

        async def handler(ctx):
            started.set()
            seen["signalled"] = await ctx.wait_cancelled(timeout=15)
            seen["reason"] = ctx.cancel_reason
            return "ignored: the job was cancelled"

        async with new_client(server.addr) as c:
            g = group()
            h = await c.enqueue(None, g)
            async with Worker(c, g, handler, poll_interval=0.05, heartbeat_interval=0.1) as w:
                await asyncio.wait_for(started.wait(), 10)
                assert await h.status() == JobStatus.RUNNING
                await h.cancel()
                r = await h.await_result(timeout=10, poll_interval=0.05)
            assert seen == {"signalled": True, "reason": "server"}
            assert r.cancelled
            job = await h.get(include_attempts=True)
            assert [a.status for a in job.attempts] == [AttemptStatus.CANCELLED]
            assert w.stats.cancelled == 1 and w.stats.succeeded == 0

    arun(body)


def test_handler_can_cancel_its_own_job(server):
    async def handler(ctx):
        if ctx.payload == "give up":
            await ctx.cancel()
            assert ctx.cancelled and ctx.cancel_reason == "client"
            return "whatever"
        return Cancelled()

    async def body():
        async with new_client(server.addr) as c:
            g = group()
            h1 = await c.enqueue("give up", g)
            h2 = await c.enqueue("marker", g)
            async with Worker(c, g, handler, poll_interval=0.05, heartbeat_interval=1):
                assert (await h1.await_result(timeout=10, poll_interval=0.05)).cancelled
                assert (await h2.await_result(timeout=10, poll_interval=0.05)).cancelled

    arun(body)


def test_sync_handlers_run_in_a_thread_pool(server):
    threads = set()
    loop_thread = threading.get_ident()

    def handler(ctx):
        threads.add(threading.get_ident())
        if ctx.payload == "wait":
            return "cancelled" if ctx.wait_cancelled_sync(10) else "not cancelled"
        if ctx.payload == "self-cancel":
            ctx.cancel_sync()
            assert ctx.cancel_reason == "client"
            return "ignored"
        time.sleep(0.05)  # blocking is fine here
        return ctx.payload + 1

    async def body():
        async with new_client(server.addr) as c:
            g = group()
            hs = [await c.enqueue(i, g) for i in range(6)]
            hw = await c.enqueue("wait", g)
            hc = await c.enqueue("self-cancel", g)
            async with Worker(c, g, handler, concurrency=4, poll_interval=0.05,
                              heartbeat_interval=0.1):
                for i, h in enumerate(hs):
                    assert (await h.await_result(timeout=10, poll_interval=0.05)).result == i + 1
                await until(lambda: _is_running(hw))
                await hw.cancel()
                assert (await hw.await_result(timeout=10, poll_interval=0.05)).cancelled
                assert (await hc.await_result(timeout=10, poll_interval=0.05)).cancelled
        assert threads and loop_thread not in threads

    arun(body)


async def _is_running(h) -> bool:
    return await h.status() == JobStatus.RUNNING


def test_graceful_stop_finishes_running_tasks_then_stops_polling(server):
    async def body():
        started = asyncio.Event()
        release = asyncio.Event()

        async def handler(ctx):
            started.set()
            await release.wait()
            return "finished"

        async with new_client(server.addr) as c:
            g = group()
            h = await c.enqueue(None, g)
            w = Worker(c, g, handler, poll_interval=0.05, heartbeat_interval=0.3)
            await w.start()
            assert w.running
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.ensure_future(w.stop(timeout=20))
            await asyncio.sleep(0.2)
            assert not stopping.done() and not w.running  # waiting for the handler
            release.set()
            assert await stopping is True
            # The outcome was reported before stop() returned.
            r = await c.get_job_result(h.id)
            assert r.result == "finished"
            # Nothing polls any more.
            later = await c.enqueue(None, g)
            polls = w.stats.polls
            await asyncio.sleep(0.3)
            assert w.stats.polls == polls
            assert await later.status() == JobStatus.SCHEDULED

    arun(body)


def test_stop_timeout_drops_unfinished_tasks_without_reporting(server):
    async def body():
        started = asyncio.Event()
        cancelled_by_stop = asyncio.Event()

        async def handler(ctx):
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled_by_stop.set()
                raise
            return "never"

        async with new_client(server.addr) as c:
            g = group()
            h = await c.enqueue(None, g)
            w = Worker(c, g, handler, poll_interval=0.05, heartbeat_interval=0.3)
            await w.start()
            await asyncio.wait_for(started.wait(), 10)
            t0 = time.monotonic()
            assert await w.stop(timeout=0.3) is False
            assert time.monotonic() - t0 < 5
            assert cancelled_by_stop.is_set() and w.stats.dropped == 1
            assert await h.status() == JobStatus.RUNNING  # nothing reported; lease expires
            r = await h.await_result(timeout=15, poll_interval=0.1)
            assert r.failed and r.error_code == "WORKER_CRASHED"

    arun(body)


# ---- paths the server cannot trigger today, with a fake client --------------------------


class FakeClient:
    """Just the calls a Worker makes; serves one scripted LeaseTasks reply."""

    def __init__(self, reply) -> None:
        self.replies = [reply]
        self.reports: list = []
        self.refresh_reports: list = []

    async def get_topology(self):
        return None

    async def lease_tasks(self, worker_id, max_tasks, task_group, *, server_index=None):
        from silo.client import LeaseResult
        return self.replies.pop(0) if self.replies else LeaseResult([], [])

    async def heartbeat(self, worker_id, task_id, shard, tenant=None):
        return False

    async def report_outcome(self, task_id, shard, outcome, tenant=None):
        self.reports.append((task_id, outcome))

    async def report_refresh_outcome(self, task_id, shard, **kw):
        self.refresh_reports.append((task_id, kw))


def test_duplicate_delivery_and_refresh_tasks():
    import msgspec

    from silo._proto import silo_pb2 as pb
    from silo.client import DuplicateTaskDelivery, LeaseResult, RefreshTask, Task

    def task(tid):
        return Task(pb.Task(id=tid, job_id="j-" + tid, shard="s", task_group="g",
                            payload=pb.SerializedBytes(msgpack=msgspec.msgpack.encode(tid))))

    def refresh(tid, key):
        return RefreshTask(tid, key, 1, 0, {"k": "v"}, 1000, "s", "g", "tenant")

    async def body(refresh_handler):
        release = asyncio.Event()
        errors: list[BaseException] = []

        async def handler(ctx):
            await release.wait()
            return ctx.payload

        fake = FakeClient(LeaseResult([task("a"), task("a"), task("b")],
                                      [refresh("r1", "ok"), refresh("r2", "bad")]))
        w = Worker(fake, "g", handler, poll_interval=0.01, heartbeat_interval=5,
                   refresh_handler=refresh_handler, on_error=errors.append)
        await w.start()
        await until(lambda: w.stats.polls >= 2)
        release.set()
        assert await w.wait_idle(5)
        await w.stop(1)
        assert sorted(fake.reports) == [("a", success_of("a")), ("b", success_of("b"))]
        assert w.stats.duplicates == 1 and w.stats.succeeded == 2
        assert any(isinstance(e, DuplicateTaskDelivery) and e.task_id == "a" for e in errors)
        return dict(fake.refresh_reports), errors

    async def refresh_handler(ctx):
        assert ctx.task.metadata == {"k": "v"} and ctx.task.tenant_id == "tenant"
        if ctx.task.queue_key == "bad":
            raise RuntimeError("cannot compute")
        return 7

    reports, _ = arun(lambda: body(refresh_handler))
    assert reports == {"r1": {"new_max_concurrency": 7, "tenant": "tenant"},
                       "r2": {"error_code": "REFRESH_HANDLER_ERROR",
                              "error_message": "cannot compute", "tenant": "tenant"}}
    reports, errors = arun(lambda: body(None))
    assert {kw["error_code"] for kw in reports.values()} == {"REFRESH_HANDLER_ERROR"}
    assert any("refresh_handler" in str(e) and "floating limit refresh task" in str(e)
               for e in errors)


def success_of(value):
    from silo.client import Success
    return Success(value)
