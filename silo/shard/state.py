"""A shard: one SlateDB database plus the in-memory indexes rebuilt from it at open.

The shard is the unit of ownership and concurrency: one event loop owns it, and every
state change of a job happens in one synchronous step that updates the in-memory
indexes and stages the matching durable writes together (see silo.storage.db). The
operations themselves live one per module beside this one (enqueue, lease, outcome, …);
this module only holds the state they share and the primitives that keep memory and
storage in step.

In memory, for jobs that are not terminal:
* `active`: (tenant, job_id) → ActiveJob (Scheduled with its pending task key, or Running
  with its lease's task id, plus a cancellation request if any);
* `tasks` + `queues`: the pending tasks and, per task group, a heap of their keys (the key
  bytes sort in ready order), so leasing never scans the database;
* `leases` + an expiry heap for the reaper.
Terminal jobs are only in the database. Counters are kept in memory and written as
absolute values with each batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable

from silo.shard.info_cache import InfoCache
from silo.shard.ready import ReadySignal
from silo.storage import keys
from silo.storage.db import GroupCommitter, open_database, scan_prefix
from silo.storage.records import (
    RUNNING,
    SCHEDULED,
    STATUS_NAMES,
    Attempt,
    FloatingLimitState,
    JobStatus,
    Lease,
    RateLimitState,
    RefreshFloatingLimit,
    RequestTicket,
    RunAttempt,
    Task,
    cancellation_decoder,
    decode_i64,
    encode,
    encode_i64,
    floating_decoder,
    lease_decoder,
    rate_state_decoder,
    request_decoder,
    task_decoder,
)

log = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class ActiveJob:
    """A job that is Scheduled (with a pending task) or Running (with a lease)."""

    __slots__ = ("kind", "task_key", "task_id", "request_key", "cancelled_at_ms")

    def __init__(self, kind: int, task_key: bytes | None = None, task_id: str | None = None,
                 request_key: bytes | None = None):
        self.kind = kind
        self.task_key = task_key  # pending task (RunAttempt or a limit-chain step)
        self.task_id = task_id  # lease, while Running
        self.request_key = request_key  # parked as a concurrency waiter
        self.cancelled_at_ms: int | None = None


class ConcurrencyQueue:
    """One (tenant, key) concurrency queue: who holds a slot, who waits (grant order)."""

    __slots__ = ("holders", "waiting")

    def __init__(self) -> None:
        self.holders: set[str] = set()
        self.waiting: list[bytes] = []  # heap of request keys


class ReadyQueue:
    """The pending tasks of one task group, as a heap of task keys (ready order)."""

    __slots__ = ("prefix_len", "heap", "stale")

    def __init__(self, task_group: str) -> None:
        self.prefix_len = len(keys.task_group_prefix(task_group))
        self.heap: list[bytes] = []
        self.stale = 0  # entries whose task was removed (skipped when popped)

    def forget(self, live: dict[bytes, Task]) -> None:
        """Count one removed entry; rebuild the heap once most of it is dead, so many
        cancelled far-future tasks cannot pile up until their start time."""
        self.stale += 1
        if self.stale > 1024 and self.stale * 2 > len(self.heap):
            self.heap = [k for k in self.heap if k in live]
            heapq.heapify(self.heap)
            self.stale = 0


class ShardConfig:
    __slots__ = ("lease_ms", "flush_interval_ms", "commit_interval_ms", "l0_sst_size_bytes",
                 "info_cache_bytes", "flush_on_commit")

    def __init__(
        self,
        *,
        lease_ms: int = 10_000,
        flush_interval_ms: int = 10,
        commit_interval_ms: float = 0.0,
        l0_sst_size_bytes: int = 16 << 20,
        info_cache_bytes: int = 16 << 20,
        flush_on_commit: bool = False,
    ) -> None:
        self.lease_ms = lease_ms
        self.flush_interval_ms = flush_interval_ms
        self.commit_interval_ms = commit_interval_ms
        self.l0_sst_size_bytes = l0_sst_size_bytes
        self.info_cache_bytes = info_cache_bytes
        self.flush_on_commit = flush_on_commit


class Shard:
    """The state of one open shard. Build it with `Shard.open`."""

    def __init__(
        self,
        shard_id: str,
        range_start: str,
        range_end: str,
        db,
        config: ShardConfig,
        clock: Callable[[], int],
    ) -> None:
        self.id = shard_id
        self.range_start = range_start
        self.range_end = range_end
        self.db = db
        self.config = config
        self.clock = clock
        self.committer = GroupCommitter(
            db, commit_interval_s=config.commit_interval_ms / 1000, on_seal=self._seal_counters
        )
        self.committer.flush_on_commit = config.flush_on_commit
        self.active: dict[tuple[str, str], ActiveJob] = {}
        self.tasks: dict[bytes, Task] = {}
        self.queues: dict[str, ReadyQueue] = {}
        self.refresh_queues: dict[str, ReadyQueue] = {}
        self.leases: dict[str, Lease] = {}
        self.lease_expiry: list[tuple[int, str]] = []
        self.info_cache = InfoCache(config.info_cache_bytes)
        self.conc: dict[tuple[str, str], ConcurrencyQueue] = {}
        self.requests: dict[bytes, RequestTicket] = {}
        self.rate_buckets: dict[tuple[str, str], RateLimitState] = {}
        self.floating: dict[tuple[str, str], FloatingLimitState] = {}
        self.total_jobs = 0
        self.completed_jobs = 0
        self.tenant_status: dict[tuple[str, str], int] = {}
        self.created_at_ms = 0
        self._dirty_shard_counters = False
        self._dirty_tenant_status: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], list] = {}
        self.ready = ReadySignal()  # wakes worker streams (silo.rpc.stream)

    # ---- opening -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        shard_id: str,
        range_start: str,
        range_end: str,
        store_url: str,
        config: ShardConfig,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> Shard:
        db = await open_database(
            store_url,
            f"shards/{shard_id}",
            flush_interval_ms=config.flush_interval_ms,
            l0_sst_size_bytes=config.l0_sst_size_bytes,
        )
        shard = cls(shard_id, range_start, range_end, db, config, clock)
        await shard._rebuild()
        from silo.shard.limits import grant_all  # noqa: PLC0415 - limits builds on this module

        if grant_all(shard, shard.now()):
            await shard.committer.commit()
        return shard

    async def _rebuild(self) -> None:
        """Rebuild the in-memory indexes from the database (the only source of truth)."""
        t0 = time.perf_counter()
        db = self.db
        for k, v in await scan_prefix(db, keys.kind_prefix(keys.SHARD_COUNTER)):
            name, _ = keys.dec_str(k, 1)
            if name == "total_jobs":
                self.total_jobs = decode_i64(v)
            elif name == "completed_jobs":
                self.completed_jobs = decode_i64(v)
        for k, v in await scan_prefix(db, keys.kind_prefix(keys.TENANT_STATUS_COUNTER)):
            self.tenant_status[keys.decode_tenant_status_counter(k)] = decode_i64(v)
        created = await db.get(keys.shard_meta("created_at_ms"))
        if created is None:
            self.created_at_ms = self.clock()
            self.committer.put(keys.shard_meta("created_at_ms"), encode_i64(self.created_at_ms))
            await self.committer.commit()
        else:
            self.created_at_ms = decode_i64(created)
        n_tasks = 0
        for k, v in await scan_prefix(db, keys.kind_prefix(keys.TASK)):
            task = task_decoder.decode(v)
            self._index_task(k, task)
            if not isinstance(task, RefreshFloatingLimit):
                self.active[(task.tenant, task.job_id)] = ActiveJob(SCHEDULED, task_key=k)
            n_tasks += 1
        for k, v in await scan_prefix(db, keys.kind_prefix(keys.CONCURRENCY_REQUEST)):
            ticket = request_decoder.decode(v)
            self.index_request(k, ticket)
            self.active[(ticket.tenant, ticket.job_id)] = ActiveJob(SCHEDULED, request_key=k)
        for k, _ in await scan_prefix(db, keys.kind_prefix(keys.CONCURRENCY_HOLDER)):
            tenant, queue, task_id = keys.decode_concurrency_holder(k)
            self.concurrency_queue(tenant, queue).holders.add(task_id)
        for k, v in await scan_prefix(db, keys.kind_prefix(keys.FLOATING_LIMIT)):
            tenant, pos = keys.dec_str(k, 1)
            queue, _ = keys.dec_str(k, pos)
            self.floating[(tenant, queue)] = floating_decoder.decode(v)
        for k, v in await scan_prefix(db, keys.kind_prefix(keys.RATE_LIMIT_BUCKET)):
            name, pos = keys.dec_str(k, 1)
            unique_key, _ = keys.dec_str(k, pos)
            self.rate_buckets[(name, unique_key)] = rate_state_decoder.decode(v)
        for _k, v in await scan_prefix(db, keys.kind_prefix(keys.LEASE)):
            lease = lease_decoder.decode(v)
            task = lease.task
            self.leases[task.task_id] = lease
            heapq.heappush(self.lease_expiry, (lease.expiry_ms, task.task_id))
            if isinstance(task, RunAttempt):
                job = ActiveJob(RUNNING, task_id=task.task_id)
                c = await db.get(keys.cancellation(task.tenant, task.job_id))
                if c is not None:
                    job.cancelled_at_ms = cancellation_decoder.decode(c).cancelled_at_ms
                self.active[(task.tenant, task.job_id)] = job
        log.debug(
            "shard %s opened: %d pending tasks, %d leases, %d jobs (%.0f ms)",
            self.id,
            n_tasks,
            len(self.leases),
            self.total_jobs,
            (time.perf_counter() - t0) * 1000,
        )

    async def close(self) -> None:
        await self.committer.close()
        await self.db.shutdown()

    async def wipe(self) -> int:
        """Delete every row and forget all in-memory state (dev-mode ResetShards)."""
        rows = await self.committer.scan_prefix(b"")
        for k, _ in rows:
            self.committer.delete(k)
        self.active.clear()
        self.tasks.clear()
        self.queues.clear()
        self.refresh_queues.clear()
        self.leases.clear()
        self.lease_expiry.clear()
        self.info_cache.clear()
        self.conc.clear()
        self.requests.clear()
        self.rate_buckets.clear()
        self.floating.clear()
        self.total_jobs = self.completed_jobs = 0
        for key in self.tenant_status:
            self._dirty_tenant_status.add(key)
        self.tenant_status = dict.fromkeys(self.tenant_status, 0)
        self._dirty_shard_counters = True
        self.created_at_ms = self.clock()
        self.committer.put(keys.shard_meta("created_at_ms"), encode_i64(self.created_at_ms))
        await self.committer.commit()
        self.tenant_status.clear()
        return len(rows)

    # ---- staging primitives (synchronous) -------------------------------------

    def _index_task(self, key: bytes, task: Task) -> None:
        self.tasks[key] = task
        # Refresh tasks wait in their own heap so a full LeaseTasks still hands them out.
        queues = self.refresh_queues if isinstance(task, RefreshFloatingLimit) else self.queues
        q = queues.get(task.task_group)
        if q is None:
            q = queues[task.task_group] = ReadyQueue(task.task_group)
        heapq.heappush(q.heap, key)
        self.ready.notify(task.task_group)

    def concurrency_queue(self, tenant: str, queue: str) -> ConcurrencyQueue:
        q = self.conc.get((tenant, queue))
        if q is None:
            q = self.conc[(tenant, queue)] = ConcurrencyQueue()
        return q

    def index_request(self, key: bytes, ticket: RequestTicket) -> None:
        self.requests[key] = ticket
        heapq.heappush(self.concurrency_queue(ticket.tenant, ticket.queue).waiting, key)

    def add_task(self, key: bytes, task: Task) -> None:
        self.committer.put(key, encode(task))
        self._index_task(key, task)

    def remove_task(self, key: bytes) -> Task | None:
        """Drop a pending task; its heap entry is skipped when popped (or compacted)."""
        task = self.tasks.pop(key, None)
        self.committer.delete(key)
        if task is not None:
            queues = (self.refresh_queues if isinstance(task, RefreshFloatingLimit)
                      else self.queues)
            q = queues.get(task.task_group)
            if q is not None:
                q.forget(self.tasks)
        return task

    def put_status(self, tenant: str, job_id: str, status: JobStatus) -> None:
        self.committer.put(keys.job_status(tenant, job_id), encode(status))

    def put_lease(self, lease: Lease) -> None:
        task_id = lease.task.task_id
        self.leases[task_id] = lease
        self.committer.put(keys.lease(task_id), encode(lease))
        heapq.heappush(self.lease_expiry, (lease.expiry_ms, task_id))

    def drop_lease(self, task_id: str) -> None:
        self.leases.pop(task_id, None)
        self.committer.delete(keys.lease(task_id))

    def put_attempt(self, tenant: str, attempt: Attempt) -> None:
        self.committer.put(keys.attempt(tenant, attempt.job_id, attempt.attempt), encode(attempt))

    def count_status(self, tenant: str, old: int | None, new: int | None) -> None:
        """Move one job between per-tenant status counters (None = absent)."""
        if old is not None:
            k = (tenant, STATUS_NAMES[old])
            self.tenant_status[k] = self.tenant_status.get(k, 0) - 1
            self._dirty_tenant_status.add(k)
        if new is not None:
            k = (tenant, STATUS_NAMES[new])
            self.tenant_status[k] = self.tenant_status.get(k, 0) + 1
            self._dirty_tenant_status.add(k)

    def count_jobs(self, total: int = 0, completed: int = 0) -> None:
        self.total_jobs += total
        self.completed_jobs += completed
        self._dirty_shard_counters = True

    def _seal_counters(self, writes: dict[bytes, bytes | None]) -> None:
        if self._dirty_shard_counters:
            writes[keys.shard_counter("total_jobs")] = encode_i64(self.total_jobs)
            writes[keys.shard_counter("completed_jobs")] = encode_i64(self.completed_jobs)
            self._dirty_shard_counters = False
        if self._dirty_tenant_status:
            for k in self._dirty_tenant_status:
                n = self.tenant_status.get(k, 0)
                key = keys.tenant_status_counter(*k)
                writes[key] = encode_i64(n) if n else None
            self._dirty_tenant_status.clear()

    # ---- per-job serialisation for read-then-write operations -------------------

    @contextlib.asynccontextmanager
    async def job_lock(self, tenant: str, job_id: str) -> AsyncIterator[None]:
        """Serialise operations that must read a job from storage before changing it.

        Operations on active jobs never need this (they decide from memory, without an
        await); restart, delete, cancel of a terminal job and enqueue with a caller-given
        id read storage first, and two of them on the same job must not interleave.
        """
        k = (tenant, job_id)
        entry = self._locks.get(k)
        if entry is None:
            entry = self._locks[k] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[k]

    def now(self) -> int:
        return self.clock()
