"""Mixed load for the fault scenarios: producers enqueue jobs with a concurrency limit,
consumers lease and succeed them, and every figure the scenarios report is recorded."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import random
import time
from dataclasses import dataclass, field

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from tests.integration.harness import CHANNEL_OPTIONS

GROUP = "chaos"
MAX_CONCURRENCY = 2


@dataclass
class LoadStats:
    acked: dict[str, str] = field(default_factory=dict)  # job id → tenant
    errors: collections.Counter = field(default_factory=collections.Counter)
    ok_calls: int = 0
    succeeded: set[str] = field(default_factory=set)
    # (limit key, lease received, report sent) of every successfully reported task
    holds: list[tuple[str, float, float]] = field(default_factory=list)
    last_ok: float = 0.0
    max_gap_s: float = 0.0  # longest time without any successful call (node serving?)
    shard_down_since: dict[str, float] = field(default_factory=dict)
    shard_outages: list[float] = field(default_factory=list)  # per-shard recovery times

    def ok(self, shard: str | None = None) -> None:
        now = time.monotonic()
        if self.last_ok:
            self.max_gap_s = max(self.max_gap_s, now - self.last_ok)
        self.last_ok = now
        self.ok_calls += 1
        if shard is not None and shard in self.shard_down_since:
            self.shard_outages.append(now - self.shard_down_since.pop(shard))

    def failed(self, code: grpc.StatusCode, shard: str | None = None) -> None:
        self.errors[code.name] += 1
        if shard is not None:
            self.shard_down_since.setdefault(shard, time.monotonic())

    def max_overlap(self) -> int:
        """The most successfully reported tasks of one limit key that ran at once."""
        worst = 0
        by_key: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        for key, start, end in self.holds:
            by_key[key] += [(start, 1), (end, -1)]
        for events in by_key.values():
            n = 0
            for _, d in sorted(events, key=lambda e: (e[0], e[1])):
                n += d
                worst = max(worst, n)
        return worst


class MixedLoad:
    """Run producers and consumers against addr until stop() is awaited."""

    def __init__(self, addr: str, shard_for, tenants: list[str], *, producers: int = 4,
                 consumers: int = 3, lease_batch: int = 8) -> None:
        self.addr = addr
        self.shard_for = shard_for
        self.tenants = tenants
        self.stats = LoadStats()
        self._stop = asyncio.Event()
        self._producing = asyncio.Event()
        self._producing.set()
        self._n_producers = producers
        self._n_consumers = consumers
        self._lease_batch = lease_batch
        self._tasks: list[asyncio.Task] = []
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, i: int) -> pb_grpc.SiloStub:
        ch = grpc.aio.insecure_channel(self.addr, options=CHANNEL_OPTIONS + [
            ("grpc.use_local_subchannel_pool", 1), ("silo.test.nonce", i)])
        self._channels.append(ch)
        return pb_grpc.SiloStub(ch)

    async def start(self) -> None:
        for i in range(self._n_producers):
            self._tasks.append(asyncio.create_task(self._produce(self._stub(i), i)))
        for i in range(self._n_consumers):
            self._tasks.append(asyncio.create_task(self._consume(self._stub(100 + i), i)))

    def stop_producing(self) -> None:
        self._producing.clear()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ch in self._channels:
            await ch.close()

    async def _produce(self, stub: pb_grpc.SiloStub, i: int) -> None:
        s = self.stats
        n = i
        while not self._stop.is_set() and self._producing.is_set():
            t = self.tenants[n % len(self.tenants)]
            n += 1
            shard = self.shard_for(t)
            req = pb.EnqueueRequest(
                shard=shard, tenant=t, task_group=GROUP, priority=50,
                payload=pb.SerializedBytes(msgpack=b"\x80"),
                # An attempt whose lease a crash lost (the lease reply never arrived)
                # expires as WORKER_CRASHED; it is retried rather than failing the job.
                retry_policy=pb.RetryPolicy(retry_count=3, initial_interval_ms=200,
                                            max_interval_ms=1000, backoff_factor=2.0),
                limits=[pb.Limit(concurrency=pb.ConcurrencyLimit(
                    key=f"k{n % 3}", max_concurrency=MAX_CONCURRENCY))])
            try:
                r = await stub.Enqueue(req, timeout=10)
                s.acked[r.id] = t
                s.ok(shard)
            except grpc.aio.AioRpcError as e:
                s.failed(e.code(), shard)
                await asyncio.sleep(0.05)

    async def _consume(self, stub: pb_grpc.SiloStub, i: int) -> None:
        s = self.stats
        worker = f"chaos-w{i}"
        while not self._stop.is_set():
            try:
                r = await stub.LeaseTasks(pb.LeaseTasksRequest(
                    worker_id=worker, max_tasks=self._lease_batch, task_group=GROUP),
                    timeout=10)
                s.ok()
            except grpc.aio.AioRpcError as e:
                s.failed(e.code())
                await asyncio.sleep(0.05)
                continue
            if not r.tasks:
                await asyncio.sleep(0.02)
                continue
            await asyncio.gather(*(self._run(stub, t) for t in r.tasks))

    async def _run(self, stub: pb_grpc.SiloStub, task) -> None:
        s = self.stats
        got = time.monotonic()
        await asyncio.sleep(random.uniform(0.005, 0.03))  # the work
        key = next((f"{task.tenant_id}/{lim.concurrency.key}" for lim in task.limits
                    if lim.HasField("concurrency")), "")
        req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id,
                                      success=pb.SerializedBytes(msgpack=b"\xc0"))
        if task.HasField("tenant_id"):
            req.tenant_id = task.tenant_id
        for _ in range(50):
            sent = time.monotonic()
            try:
                await stub.ReportOutcome(req, timeout=10)
                s.ok(task.shard)
                s.succeeded.add(task.job_id)
                s.holds.append((key, got, sent))
                return
            except grpc.aio.AioRpcError as e:
                s.failed(e.code(), task.shard)
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    return  # e.g. lease lost after the reaper took it back: retried later
                await asyncio.sleep(0.1)


TERMINAL = ("JOB_STATUS_SUCCEEDED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED")


def job_statuses(stub, acked: dict[str, str], shard_for) -> collections.Counter:
    """Status name of every acked job (synchronous stub); NOT_FOUND counts as lost."""

    def one(item: tuple[str, str]) -> str:
        job_id, tenant = item
        for _ in range(20):
            try:
                j = stub.GetJob(pb.GetJobRequest(shard=shard_for(tenant), id=job_id,
                                                 tenant=tenant), timeout=10)
                return pb.JobStatus.Name(j.status)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return "LOST"
                time.sleep(0.2)
        return "UNREADABLE"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return collections.Counter(pool.map(one, acked.items()))
