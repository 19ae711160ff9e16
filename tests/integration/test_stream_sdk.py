"""The Python SDK on the streaming extension: Worker pushes and SiloClient.enqueue_many,
their fallback to the unary API, and kill -9 of a server process under stream load.

Waits are on job states or events with generous deadlines, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest

from silo.client import (
    ConcurrencyLimit,
    InvalidArgument,
    JobHandle,
    JobStatus,
    RetryPolicy,
    SiloClient,
)
from silo.worker import Worker
from tests.integration.harness import Server
from tests.integration.test_runtime import worker_pids

TENANTS = [f"t{i}" for i in range(16)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("sdk"), "--tenancy", "--shards", "4",
                "--processes", "2", "--lease-ms", "1000", "--reaper-interval-ms", "100") as s:
        yield s


def arun(coro, timeout: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def new_client(addr: str) -> SiloClient:
    return SiloClient([addr], topology_refresh_interval_s=0, retry_delay_s=0.05)


def group() -> str:
    return "sk-" + uuid.uuid4().hex[:8]


def jobs(g: str, n: int, **kw) -> list[dict]:
    return [{"payload": {"i": i}, "task_group": g, "tenant": TENANTS[i % 16], **kw}
            for i in range(n)]


async def all_succeeded(handles: list[JobHandle], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    pending = list(handles)
    while pending:
        assert time.monotonic() < end, f"{len(pending)} jobs not done in time"
        # (a call on a connection to a killed process may fail: ask again)
        st = await asyncio.gather(*(h.status() for h in pending), return_exceptions=True)
        pending = [h for h, s in zip(pending, st, strict=True) if s != JobStatus.SUCCEEDED]
        if pending:
            await asyncio.sleep(0.1)


def test_worker_uses_the_stream_when_the_server_offers_it(srv):
    async def body():
        async with new_client(srv.addr) as c:
            g = group()
            handles = await c.enqueue_many(jobs(g, 40))
            assert all(isinstance(h, JobHandle) for h in handles)
            async with Worker(c, g, lambda ctx: ctx.payload, concurrency=8) as w:
                await all_succeeded(handles)
                assert w.stats.polls == 0 and w.stats.succeeded == 40
            results = await asyncio.gather(*(h.await_result(timeout=10) for h in handles))
            assert [r.result for r in results] == [{"i": i} for i in range(40)]

    arun(body())


def test_enqueue_many_reports_each_jobs_error(srv):
    async def body():
        async with new_client(srv.addr) as c:
            g = group()
            res = await c.enqueue_many(jobs(g, 3) + [{"payload": 1, "task_group": g,
                                                      "tenant": "t1", "priority": 500}])
            assert [type(r) for r in res[:3]] == [JobHandle] * 3
            assert isinstance(res[3], InvalidArgument)

    arun(body())


def test_without_the_extension_the_sdk_falls_back_to_the_unary_api(srv):
    async def body():
        async with new_client(srv.addr) as c:
            await c.get_topology()
            # What a server without silostream.v1 (e.g. upstream Silo) makes the probe learn.
            c.__dict__["_stream_support"] = dict.fromkeys(c.topology.addresses, False)
            g = group()
            handles = await c.enqueue_many(jobs(g, 10))
            async with Worker(c, g, lambda ctx: 1, concurrency=4, poll_interval=0.05) as w:
                await all_succeeded(handles)
                assert w.stats.polls > 0
            assert not c.__dict__.get("_stream_stubs")  # never opened a stream call

    arun(body())


def test_stop_gives_back_tasks_that_arrive_after_stopping(srv):
    async def body():
        async with new_client(srv.addr) as c:
            g = group()
            started = asyncio.Event()
            release = asyncio.Event()

            async def slow(ctx):
                started.set()
                await release.wait()
                return 1

            w = Worker(c, g, slow, concurrency=1)
            await w.start()
            first = await c.enqueue(1, g, tenant="t1")
            await asyncio.wait_for(started.wait(), 15)
            stopping = asyncio.ensure_future(w.stop(timeout=20))
            await asyncio.sleep(0.1)
            second = await c.enqueue(2, g, tenant="t2")
            release.set()
            assert await stopping
            assert await first.status() == JobStatus.SUCCEEDED
            assert await second.status() == JobStatus.SCHEDULED
            # The second was never started: leasable now, as attempt 1.
            got = await c.lease_tasks("other", 4, g)
            assert [t.job_id for t in got.tasks] == [second.id]
            assert got.tasks[0].attempt_number == 1

    arun(body())


def test_kill_9_of_a_server_process_under_stream_load_loses_no_ack_and_no_limit(tmp_path):
    cap = 2
    # Leases of 3 s: long enough that on a loaded box no lease of a healthy process
    # expires in transit (that would let a retry overlap its own late first run).
    with Server(tmp_path / "d", "--tenancy", "--shards", "4", "--processes", "2",
                "--lease-ms", "3000", "--reaper-interval-ms", "100") as srv:
        victim = worker_pids(srv)[1]

        async def body():
            running: dict[str, int] = {}
            peak = {"n": 0}

            async def handler(ctx):
                t = ctx.task.tenant_id
                running[t] = running.get(t, 0) + 1
                peak["n"] = max(peak["n"], running[t])
                try:
                    await asyncio.sleep(0.01)
                    return 1
                finally:
                    running[t] -= 1

            async with new_client(srv.addr) as c:
                g = group()
                acked: list[JobHandle] = []
                stop = asyncio.Event()

                async def load():
                    while not stop.is_set():
                        res = await c.enqueue_many(jobs(
                            g, 16, limits=[ConcurrencyLimit("cap", cap)],
                            retry_policy=RetryPolicy(10, 50, 200)))
                        acked.extend(r for r in res if isinstance(r, JobHandle))
                        await asyncio.sleep(0.05)

                async with Worker(c, g, handler, concurrency=32, heartbeat_interval=0.3):
                    loader = asyncio.ensure_future(load())
                    await asyncio.sleep(1.5)
                    os.kill(victim, signal.SIGKILL)
                    await asyncio.sleep(3.0)
                    stop.set()
                    await loader
                    assert len(acked) > 100
                    await all_succeeded(acked, timeout=120)
            assert peak["n"] <= cap

        arun(body(), timeout=200)
        assert victim not in worker_pids(srv)
