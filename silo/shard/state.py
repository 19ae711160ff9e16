"""A shard: one SlateDB database plus the in-memory indexes rebuilt from it at open.

The shard is the unit of ownership and concurrency: one event loop owns it, and every
state change of a job happens in one synchronous step that updates the in-memory
indexes and stages the matching durable writes together (see silo.storage.db). The
operations themselves live one per module beside this one (enqueue, lease, outcome, …);
this module only holds the state they share and the primitives that keep memory and
storage in step.

In memory, bounded by what is running rather than by what is queued:
* `active`: (tenant, job_id) → ActiveJob for Running jobs (the lease's task id and a
  cancellation request if any) and for Scheduled jobs parked as concurrency waiters;
  a job whose pending step is a task row is only in storage (silo.shard.pending reads
  it back when an operation needs it);
* `buffers`: per task group, a bounded buffer of the earliest pending task keys,
  refilled by scanning the task rows in order (silo.shard.buffer), so leasing reads
  memory and the backlog stays in storage;
* `leases` + an expiry heap for the reaper; concurrency holders, parked waiters,
  floating-limit and rate-limit state.
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

from slatedb.uniffi import FlushOptions, FlushType

from silo.shard import counters
from silo.shard import depth as depth_counters
from silo.shard.buffer import ReadyBuffer
from silo.shard.info_cache import InfoCache
from silo.shard.ready import ReadySignal
from silo.storage import keys
from silo.storage.database import open_database, scan_prefix
from silo.storage.db import GroupCommitter
from silo.storage.records import (
    RUNNING,
    SCHEDULED,
    STATUS_NAMES,
    SUCCEEDED,
    TERMINAL,
    Attempt,
    CheckRateLimit,
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
)
from silo.storage.scan import ResumingScan

log = logging.getLogger(__name__)
_MEMTABLE_FLUSH = FlushOptions(flush_type=FlushType.MEM_TABLE)


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


_STATUS_KEY_PART = {kind: keys.enc_str(name) for kind, name in STATUS_NAMES.items()}
_SCHEDULED_PART = _STATUS_KEY_PART[SCHEDULED]
_U64_MAX = (1 << 64) - 1
# Stale lease-expiry entries tolerated beyond twice the live leases (Shard.put_lease).
_STALE_EXPIRY_SLACK = 4096


def _index_row(tenant_enc: bytes, status_part: bytes, ts_ms: int, job_enc: bytes) -> bytes:
    """keys.status_index from parts already encoded (inlined: it runs on every
    transition, and put_status has the tenant and id encoded for the status row)."""
    return (b"\x03" + tenant_enc + status_part
            + (_U64_MAX - max(0, ts_ms)).to_bytes(8, "big") + job_enc)


def _index_ts(status: JobStatus) -> int:
    """The time a status is indexed by: Scheduled by next-attempt time, else the change."""
    if status.kind == SCHEDULED and status.next_attempt_starts_after_ms is not None:
        return status.next_attempt_starts_after_ms
    return status.changed_at_ms


def scheduled_index_key(tenant: str, job_id: str, start_ms: int) -> bytes:
    """The 0x03 row of a Scheduled job whose pending step starts at start_ms (the status'
    next-attempt time, which every pending step carries: a task key's start time, or a
    chain step's start_ms). = status_index_key(tenant, job_id, JobStatus(SCHEDULED, 0,
    start_ms)), without the JobStatus (it runs once per leased task)."""
    return _index_row(keys.enc_str(tenant), _SCHEDULED_PART, start_ms, keys.enc_str(job_id))


def status_index_key(tenant: str, job_id: str, status: JobStatus) -> bytes:
    """The 0x03 row of a job in this status (equal to keys.status_index)."""
    return _index_row(keys.enc_str(tenant), _STATUS_KEY_PART[status.kind], _index_ts(status),
                      keys.enc_str(job_id))


class ActiveJob:
    """A job that is Scheduled (with a pending task) or Running (with a lease)."""

    __slots__ = ("kind", "task_key", "task_id", "request_key", "cancelled_at_ms", "index_key",
                 "task")

    def __init__(self, kind: int, task_key: bytes | None = None, task_id: str | None = None,
                 request_key: bytes | None = None):
        self.kind = kind
        self.task_key = task_key  # pending task (RunAttempt or a limit-chain step)
        self.task_id = task_id  # lease, while Running
        self.request_key = request_key  # parked as a concurrency waiter
        self.cancelled_at_ms: int | None = None
        # The job's current status-index row (0x03), so a transition deletes it without
        # reading the old status back from storage.
        self.index_key: bytes | None = None
        # The pending task's value when it was read from storage (silo.shard.pending).
        self.task: Task | None = None


class ConcurrencyQueue:
    """One (tenant, key) concurrency queue: who holds a slot, who waits (grant order)."""

    __slots__ = ("holders", "waiting")

    def __init__(self) -> None:
        self.holders: set[str] = set()
        self.waiting: list[bytes] = []  # heap of request keys


class ShardConfig:
    __slots__ = ("lease_ms", "flush_interval_ms", "commit_interval_ms", "commit_min_gap_ms",
                 "commit_busy_gap_ms", "l0_sst_size_bytes",
                 "info_cache_bytes", "flush_on_commit", "write_timeout_ms",
                 "completed_job_expire_ms", "terminal_job_expire_ms", "slatedb",
                 "l0_flush_interval_s", "ready_buffer_size")

    def __init__(
        self,
        *,
        lease_ms: int = 10_000,
        flush_interval_ms: int = 10,
        commit_interval_ms: float = 0.0,
        commit_min_gap_ms: float = 0.0,
        commit_busy_gap_ms: float = 0.0,
        l0_sst_size_bytes: int = 16 << 20,
        info_cache_bytes: int = 16 << 20,
        flush_on_commit: bool = False,
        write_timeout_ms: int = 10_000,
        completed_job_expire_ms: int = 0,
        terminal_job_expire_ms: int = 0,
        slatedb: dict[str, object] | None = None,
        l0_flush_interval_s: float = 0,
        ready_buffer_size: int = 4096,
    ) -> None:
        self.lease_ms = lease_ms
        self.flush_interval_ms = flush_interval_ms
        self.commit_interval_ms = commit_interval_ms
        self.commit_min_gap_ms = commit_min_gap_ms
        self.commit_busy_gap_ms = commit_busy_gap_ms
        self.l0_sst_size_bytes = l0_sst_size_bytes
        self.info_cache_bytes = info_cache_bytes
        self.flush_on_commit = flush_on_commit
        self.write_timeout_ms = write_timeout_ms
        # Retention (0 = keep forever): Succeeded jobs, and Failed/Cancelled ones.
        self.completed_job_expire_ms = completed_job_expire_ms
        self.terminal_job_expire_ms = terminal_job_expire_ms
        # Compactor / garbage collector settings (silo.storage.slatedb_settings).
        self.slatedb = slatedb or {}
        self.l0_flush_interval_s = l0_flush_interval_s  # 0: only when SlateDB decides
        # Pending tasks held in memory per task group (silo.shard.buffer).
        self.ready_buffer_size = ready_buffer_size

    def expire_ms(self, kind: int) -> int:
        """How long a job that ended with status `kind` is kept (0: forever)."""
        if kind == SUCCEEDED:
            return self.completed_job_expire_ms
        return self.terminal_job_expire_ms if kind in TERMINAL else 0


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
            db, commit_interval_s=config.commit_interval_ms / 1000,
            on_seal=lambda writes: counters.seal(self, writes))
        self.committer.flush_on_commit = config.flush_on_commit
        self.committer.write_timeout_s = config.write_timeout_ms / 1000
        self.committer.min_gap_s = config.commit_min_gap_ms / 1000
        self.committer.busy_gap_s = config.commit_busy_gap_ms / 1000
        self.committer.name = shard_id  # metric labels, from the open's first commit on
        self.active: dict[tuple[str, str], ActiveJob] = {}
        self.buffers: dict[str, ReadyBuffer] = {}
        # Queue depth per task group (the silo_ready_tasks gauge): persisted counters,
        # plus adds and removes since open (silo.shard.depth).
        self.depth = depth_counters.Depth()
        self.depth_scan: ResumingScan | None = None  # an older shard's deferred count
        self._depth_count: asyncio.Future[None] | None = None
        self.leases: dict[str, Lease] = {}
        # Task ids whose lease is stored in a 0x06 row (see put_lease); every other
        # lease is the value of its job's Running status-index row.
        self.lease_rows: set[str] = set()
        self.lease_expiry: list[tuple[int, str]] = []
        self.info_cache = InfoCache(config.info_cache_bytes)
        self.prefetches: set[asyncio.Future[None]] = set()  # silo.shard.prefetch reads
        self.conc: dict[tuple[str, str], ConcurrencyQueue] = {}
        self.requests: dict[bytes, RequestTicket] = {}
        self.rate_buckets: dict[tuple[str, str], RateLimitState] = {}
        self.floating: dict[tuple[str, str], FloatingLimitState] = {}
        self.total_jobs = 0
        self.completed_jobs = 0
        self.tenant_status: dict[tuple[str, str], int] = {}
        self.scheduled_jobs = 0  # Scheduled jobs of every tenant (a pending-work hint)
        self.created_at_ms = 0
        # silo.shard.counters: what the next batch must write.
        self._dirty_shard_counters = False
        self._dirty_tenants: set[str] = set()
        self._legacy_counters: list[bytes] = []  # rows of an older layout, to delete
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
        count_depth: bool = True,
    ) -> Shard:
        """Open a shard. An older shard without task-group counters counts its queue once
        in the background: at once, or (count_depth=False) when the caller calls
        silo.shard.depth.start_count, e.g. once it serves."""
        db = await open_database(
            store_url,
            f"shards/{shard_id}",
            flush_interval_ms=config.flush_interval_ms,
            l0_sst_size_bytes=config.l0_sst_size_bytes,
            extra_settings=config.slatedb,
            flush_on_commit=config.flush_on_commit,
        )
        shard = cls(shard_id, range_start, range_end, db, config, clock)
        await shard._rebuild()
        if count_depth:
            depth_counters.start_count(shard)
        from silo.shard.limits import grant_all  # noqa: PLC0415 - limits builds on this module

        if grant_all(shard, shard.now()):
            await shard.committer.commit()
        return shard

    async def _rebuild(self) -> None:
        """Rebuild the in-memory indexes from the database (the only source of truth)."""
        t0 = time.perf_counter()
        db = self.db
        persisted = await counters.load(self)
        created = await db.get(keys.shard_meta("created_at_ms"))
        await depth_counters.load(self, persisted, new=created is None)
        if created is None:
            self.created_at_ms = self.clock()
            self.committer.put(keys.shard_meta("created_at_ms"), encode_i64(self.created_at_ms))
            self.committer.put(keys.shard_meta("layout_version"),
                               encode_i64(keys.LAYOUT_VERSION))
            await self.committer.commit()
        else:
            self.created_at_ms = decode_i64(created)
            from silo.shard.indexes import backfill_if_needed  # noqa: PLC0415 - builds on us

            await backfill_if_needed(self)
        # Pending tasks stay in storage: each group's buffer fills on first use.
        for k, v in await scan_prefix(db, keys.kind_prefix(keys.CONCURRENCY_REQUEST)):
            ticket = request_decoder.decode(v)
            self.index_request(k, ticket)
            job = ActiveJob(SCHEDULED, request_key=k)
            job.index_key = scheduled_index_key(ticket.tenant, ticket.job_id, ticket.start_ms)
            self.active[(ticket.tenant, ticket.job_id)] = job
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
        # Leases in 0x06 rows (refresh tasks', and those written before layout 4), then
        # those kept in their job's Running status-index row (load_running).
        for _k, v in await scan_prefix(db, keys.kind_prefix(keys.LEASE)):
            lease = lease_decoder.decode(v)
            self.lease_rows.add(lease.task.task_id)
            await self.restore_lease(lease)
        from silo.shard.indexes import load_running  # noqa: PLC0415

        await load_running(self)
        log.debug(
            "shard %s opened: %d scheduled jobs, %d leases, %d jobs (%.0f ms)",
            self.id,
            self.scheduled_jobs,
            len(self.leases),
            self.total_jobs,
            (time.perf_counter() - t0) * 1000,
        )

    async def restore_lease(self, lease: Lease) -> ActiveJob | None:
        """At open: a lease read from storage is live again; a RunAttempt's job is
        Running (with its cancel request, if any). Returns that job."""
        task = lease.task
        self.leases[task.task_id] = lease
        heapq.heappush(self.lease_expiry, (lease.expiry_ms, task.task_id))
        if not isinstance(task, RunAttempt):
            return None
        job = ActiveJob(RUNNING, task_id=task.task_id)
        c = await self.db.get(keys.cancellation(task.tenant, task.job_id))
        if c is not None:
            job.cancelled_at_ms = cancellation_decoder.decode(c).cancelled_at_ms
        self.active[(task.tenant, task.job_id)] = job
        return job

    def _count_task(self, key: bytes, n: int) -> None:
        group, pos = keys.dec_str(key, 1)
        job_id, _ = keys.dec_str(key, pos + 9)
        if not job_id.startswith("floating_refresh:"):
            self.depth[group] = self.depth.get(group, 0) + n

    async def close(self) -> None:
        if self._depth_count is not None:
            self._depth_count.cancel()
        for fut in list(self.prefetches):  # reads ahead of leases (silo.shard.prefetch)
            fut.cancel()
        self.depth_scan = None  # a count never started: let its iterator go
        await self.committer.close()
        # Write the memtable out as an L0 SST, so the next open has no WAL to replay
        # (replaying up to l0_sst_size_bytes of WAL is most of a reopen's time).
        try:
            await self.db.flush_with_options(_MEMTABLE_FLUSH)
        except Exception as exc:  # noqa: BLE001 - a failed flush only costs the next open
            log.warning("shard %s: memtable flush at close failed: %r", self.id, exc)
        await self.db.shutdown()

    async def wipe(self) -> int:
        """Delete every row and forget all in-memory state (dev-mode ResetShards)."""
        rows = await self.committer.scan_prefix(b"")
        for k, _ in rows:
            self.committer.delete(k)
        self.active.clear()
        self.buffers.clear()
        self.depth.clear()
        self.depth_scan = None
        depth_counters.mark_complete(self)  # an empty shard's counters are complete
        self.leases.clear()
        self.lease_rows.clear()
        self.lease_expiry.clear()
        self.info_cache.clear()
        self.conc.clear()
        self.requests.clear()
        self.rate_buckets.clear()
        self.floating.clear()
        self.total_jobs = self.completed_jobs = 0
        self.scheduled_jobs = 0
        self._dirty_tenants.update(t for t, _ in self.tenant_status)
        self._legacy_counters = []  # deleted with every other row
        self.tenant_status = dict.fromkeys(self.tenant_status, 0)
        self._dirty_shard_counters = True
        self.created_at_ms = self.clock()
        self.committer.put(keys.shard_meta("created_at_ms"), encode_i64(self.created_at_ms))
        self.committer.put(keys.shard_meta("layout_version"), encode_i64(keys.LAYOUT_VERSION))
        await self.committer.commit()
        self.tenant_status.clear()
        return len(rows)

    # ---- staging primitives (synchronous) -------------------------------------

    def buffer(self, task_group: str) -> ReadyBuffer:
        """The ready buffer of a task group (created empty; it fills from storage)."""
        b = self.buffers.get(task_group)
        if b is None:
            b = self.buffers[task_group] = ReadyBuffer(task_group, self.config.ready_buffer_size)
        return b

    def pending_hint(self) -> int:
        """Roughly how much work is pending here (for spreading LeaseTasks over processes)."""
        return self.scheduled_jobs + sum(len(b.refresh) for b in self.buffers.values())

    def settle(self, tenant: str, job_id: str, job: ActiveJob) -> None:
        """After a step of the limit chain: a Scheduled job whose pending step is a task
        row leaves memory (it is read back from storage when needed); a parked one stays."""
        if (job.kind == SCHEDULED and job.request_key is None
                and self.active.get((tenant, job_id)) is job):
            del self.active[(tenant, job_id)]

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
        # = _count_task(key, 1), from the task instead of decoding its key (the key's job
        # id is the task's; a refresh task's is "floating_refresh:<queue>").
        if not isinstance(task, RefreshFloatingLimit) and not task.job_id.startswith(
                "floating_refresh:"):
            self.depth[task.task_group] = self.depth.get(task.task_group, 0) + 1
        self.buffer(task.task_group).add(key, task)
        self.ready.notify(task.task_group)

    def remove_task(self, key: bytes, task: Task | None = None) -> Task | None:
        """Drop a pending task from storage and from its group's buffer; returns the task
        (the buffered one, else `task`, what the caller read from storage)."""
        group, _ = keys.dec_str(key, 1)
        self.committer.delete(key)
        self._count_task(key, -1)
        buffered = self.buffer(group).remove(key)
        task = buffered if buffered is not None else task
        if task is not None:
            self.drop_pointer(key, task)
        return task

    def drop_pointer(self, key: bytes, task: Task) -> None:
        """A task keyed off its job's next-attempt time has a pointer row (0x0E); the
        task left its key: delete the pointer with it."""
        if isinstance(task, CheckRateLimit) and keys.decode_task(key)[1] != task.start_ms:
            self.committer.delete(keys.pending_pointer(task.tenant, task.job_id))

    def put_status(self, tenant: str, job_id: str, status: JobStatus,
                   old: JobStatus | None = None, index_value: bytes = b"") -> None:
        """Write a job's status and move its status-index row in the same batch.

        The old row is the active job's remembered one; a job that is not active
        (terminal → restart, import over a terminal job) must pass its `old` status.
        `index_value`: the new index row's value (a Running row holds the lease, see
        put_lease; every other row is empty).
        """
        t, j = keys.enc_str(tenant), keys.enc_str(job_id)
        self.committer.put(b"\x02" + t + j, encode(status))  # keys.job_status
        self.info_cache.put_status(tenant, job_id, status)  # GetJob reads it from memory
        new_key = _index_row(t, _STATUS_KEY_PART[status.kind], _index_ts(status), j)
        job = self.active.get((tenant, job_id))
        if old is not None:
            old_key: bytes | None = status_index_key(tenant, job_id, old)
        else:
            old_key = job.index_key if job is not None else None
        if old_key is not None and old_key != new_key:
            self.committer.delete(old_key)
        self.committer.put(new_key, index_value)
        if job is not None:
            job.index_key = new_key
        if status.kind in TERMINAL:
            self.schedule_expiry(tenant, job_id, status)

    def schedule_expiry(self, tenant: str, job_id: str, status: JobStatus) -> None:
        """Stage the retention row of a job that just ended (nothing when retention is off).

        The row is only a reminder: the sweeper (silo.shard.retention) deletes the job only
        if it is still terminal and its own expiry is due, so a job restarted or
        re-imported meanwhile is never deleted by an old row.
        """
        ttl = self.config.expire_ms(status.kind)
        if ttl > 0:
            self.committer.put(keys.expiry_index(status.changed_at_ms + ttl, tenant, job_id), b"")

    def drop_status(self, tenant: str, job_id: str, status: JobStatus | None,
                    metadata: dict[str, str]) -> None:
        """Delete a job's status row and every index row pointing at it (DeleteJob)."""
        self.committer.delete(keys.job_status(tenant, job_id))
        self.info_cache.discard(tenant, job_id)  # the job is gone
        if status is not None:
            self.committer.delete(status_index_key(tenant, job_id, status))
        for k, v in metadata.items():
            self.committer.delete(keys.metadata_index(tenant, k, v, job_id))

    def put_lease(self, lease: Lease) -> None:
        """Track a new or renewed lease and store it.

        A RunAttempt's lease is the value of its job's Running status-index row (0x03):
        that row lives exactly as long as the lease (put when the job starts running,
        deleted by the status change that ends the attempt), so storing the lease there
        saves the 0x06 row's put and delete, 2 of a job's ~17 keys (layout 4). A lease
        already in a 0x06 row (written before layout 4, or of a refresh task) stays
        there until it ends.
        """
        task = lease.task
        task_id = task.task_id
        self.track_lease(lease)
        if task_id not in self.lease_rows and isinstance(task, RunAttempt):
            job = self.active.get((task.tenant, task.job_id))
            if job is not None and job.kind == RUNNING and job.index_key is not None:
                self.committer.put(job.index_key, encode(lease))
                return
        self.committer.put(keys.lease(task_id), encode(lease))
        self.lease_rows.add(task_id)

    def track_lease(self, lease: Lease) -> None:
        """A lease in memory and in the expiry heap (put_lease stores it; a lease
        starting with its job's Running status stores it in that put_status)."""
        task_id = lease.task.task_id
        self.leases[task_id] = lease
        heap = self.lease_expiry
        if len(heap) > 2 * len(self.leases) + _STALE_EXPIRY_SLACK:
            # Mostly entries of leases that ended (or were renewed) before expiring: the
            # reaper would pop each once, a heappop per job in a burst every pass.
            # Rebuilt from the live leases instead, about once per SLACK ended leases.
            heap[:] = [(ls.expiry_ms, tid) for tid, ls in self.leases.items()]
            heapq.heapify(heap)
        else:
            heapq.heappush(heap, (lease.expiry_ms, task_id))

    def drop_lease(self, task_id: str) -> None:
        """Forget a lease and delete its 0x06 row if it has one. A lease kept in its
        job's Running index row leaves storage with that row: every caller ending a
        RunAttempt's lease stages the job's next status (put_status) in the same step."""
        self.leases.pop(task_id, None)
        if task_id in self.lease_rows:
            self.lease_rows.discard(task_id)
            self.committer.delete(keys.lease(task_id))

    def put_attempt(self, tenant: str, attempt: Attempt) -> None:
        self.committer.put(keys.attempt(tenant, attempt.job_id, attempt.attempt), encode(attempt))

    def count_status(self, tenant: str, old: int | None, new: int | None) -> None:
        """Move one job between per-tenant status counters (None = absent)."""
        counts = self.tenant_status
        if old is not None:
            k = (tenant, STATUS_NAMES[old])
            counts[k] = counts.get(k, 0) - 1
        if new is not None:
            k = (tenant, STATUS_NAMES[new])
            counts[k] = counts.get(k, 0) + 1
        self._dirty_tenants.add(tenant)
        self.scheduled_jobs += (new == SCHEDULED) - (old == SCHEDULED)

    def count_jobs(self, total: int = 0, completed: int = 0) -> None:
        self.total_jobs += total
        self.completed_jobs += completed
        self._dirty_shard_counters = True

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
