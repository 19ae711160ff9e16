"""The group committer: the only writer of a shard's SlateDB database.

(Opening that database, and reading it raw, is silo.storage.database.)

State-machine operations stage their puts/deletes synchronously (so the in-memory state
and the staged writes change together, with no await in between) and then await the
batch's durability. The commit is adaptive: when no commit is in flight, what is staged
goes to SlateDB one event-loop pass later (so what the staging woke joins it, see
`_hand_off_next_pass`); while one is in flight (written, not yet durable), new writes
gather and go as the next batch the moment it is durable. So a lone RPC pays no window
and a loaded shard writes large batches, with no interval to tune. An optional cap
(`commit_interval`, > 0) bounds how long a gathered batch waits behind an in-flight
commit: past it the batch is written anyway (pipelined behind the one in flight). Each
batch is one WriteBatch and one durability wait, shared by all its RPCs (group commit);
each RPC answers only after its own write is durable. On the local store that includes
an fsync round after the flush (silo.storage.local_sync): the round runs while the next
batch is written and flushed, one batch ahead and not more. Two optional gaps space
commit starts (`min_gap_s` always, `busy_gap_s` only while the process's CPU is
saturated, see `commit_gap`); neither applies after a lone operation.

A batch is sealed (handed to the writer, pipelined behind the one in flight) once it
holds `max_batch_keys` keys or `max_batch_bytes` bytes at the end of an operation: an
operation's writes are never split, but many large operations arriving together (e.g.
16 ImportJobs of 1,000 jobs) make several bounded batches instead of one huge one.

The write bound (`write_timeout_s`) is armed when the writer starts writing a batch, so
it measures that batch's own write and durability wait, not the time it queued behind
others; when it passes, storage is stalled, and every batch not yet durable (staged,
queued or written) fails at once, as do new ones until a write is durable again.

Reads go through `get`, which sees staged and in-flight writes first: an operation that
runs after another one staged its writes reads what that one wrote, durable or not yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from slatedb.uniffi import FlushOptions, FlushType, WriteBatch

from silo.observability import events, metrics, tracing
from silo.storage import commit_calls, ffi, local_sync, sched
from silo.storage.database import scan_prefix

log = logging.getLogger(__name__)

_WAL_FLUSH = FlushOptions(flush_type=FlushType.WAL)


class StorageError(Exception):
    """A durable write or read failed; the shard can no longer be trusted to serve."""


def _fill_generic(batch: WriteBatch, writes: dict[bytes, bytes | None]) -> None:
    for k, v in writes.items():
        batch.delete(k) if v is None else batch.put(k, v)


class _Batch:
    """One commit's writes and the operations waiting for it.

    Two outcomes: `done` (the storage outcome, set by the writer through
    GroupCommitter._settle) and `acked` (what the operations see: the same outcome, or
    StorageError once the write bound passes, whichever comes first). Each operation
    awaits its own future in `waiters`, resolved directly when the batch is acked: a
    shared future behind asyncio.shield, resolved from a done callback of the storage
    future, cost two more loop passes (and a shield per operation) between the WAL
    flush returning and the operations going on."""

    __slots__ = ("writes", "done", "ops", "acked", "acked_exc", "waiters", "timer", "nbytes",
                 "queued")

    def __init__(self) -> None:
        self.writes: dict[bytes, bytes | None] = {}
        self.done = False
        self.acked = False
        self.acked_exc: BaseException | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.ops = 0
        self.nbytes = 0  # keys and values staged (an estimate: overwrites count twice)
        self.queued = False  # in the writer's queue (sealed there if not before)

    def ack(self, exc: BaseException | None) -> None:
        """Give every waiter the outcome (once; a cancelled waiter is skipped)."""
        if self.acked:
            return
        self.acked = True
        self.acked_exc = exc
        waiters, self.waiters = self.waiters, []
        for f in waiters:
            if not f.done():
                _resolve(f, exc)

    def waiter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future for one more operation: resolved with the outcome if it is known."""
        f = loop.create_future()
        if self.acked:  # failed at once (storage stalled)
            _resolve(f, self.acked_exc)
        else:
            self.waiters.append(f)
        return f


def _resolve(f: asyncio.Future[None], exc: BaseException | None) -> None:
    if exc is None:
        f.set_result(None)
    else:
        f.set_exception(exc)


BUSY = 0.9  # a process using this much of a core's time is saturated (commit_gap)
BUSY_SAMPLE_S = 0.01  # the shortest wall time a busy sample spans


def commit_gap(min_gap_s: float, busy_gap_s: float, busy: float, last_ops: int) -> float:
    """Seconds an idle writer keeps after a commit's start before it starts the next.
    Never after a lone operation (the next caller may be alone too: latency first);
    else `min_gap_s` always, and `busy_gap_s` while the process is saturated."""
    if last_ops <= 1:
        return 0.0
    return max(min_gap_s, busy_gap_s if busy >= BUSY else 0.0)


class GroupCommitter:
    """Gathers the writes of many operations into one durable SlateDB batch."""

    started = 0  # batches taken by any writer of this process (silo.query.pace reads it)

    def __init__(
        self,
        db,
        *,
        commit_interval_s: float,
        on_seal: Callable[[dict[bytes, bytes | None]], None] | None = None,
    ) -> None:
        self._db = db
        self._interval = commit_interval_s
        self._loop = asyncio.get_running_loop()
        self._staged: _Batch | None = None
        self._inflight: list[_Batch] = []  # handed to the writer, db.write not returned yet
        self._queue: asyncio.Queue[_Batch | None] = asyncio.Queue()
        self._on_seal = on_seal
        self._fill = ffi.batch_writer() if ffi.is_applied() else _fill_generic
        self._writer = asyncio.create_task(self._write_loop(), name="silo-committer")
        self._unconfirmed: list[tuple[object, _Batch]] = []
        self._last_handle: object | None = None
        self.flush_on_commit = False
        self._durability_task: asyncio.Task[None] | None = None
        # The write and WAL flush made straight through the FFI (silo.storage.
        # commit_calls) when flush_on_commit is on and the database allows it; decided
        # at the first write (None: not yet, False: the generated calls).
        self._calls: commit_calls.CommitCalls | bool | None = None
        self._failed: BaseException | None = None
        self._local_sync = local_sync.of(db)  # fsyncs each flush's WAL objects, or None
        if self._local_sync is not None:
            self._local_sync.on_room = self._kick  # a held-back commit may go
        # Called once when a write or durability wait fails (e.g. the database was
        # fenced by another opener): the owner decides how to recover.
        self.on_failure: Callable[[BaseException], None] | None = None
        self._closed = False
        self.batches_written = 0
        self.ops_written = 0
        self.bytes_written = 0  # keys and values of those batches (Batch.nbytes)
        self.name = ""  # the shard id, for metrics and events
        # A write not durable within this bound fails its waiters (UNAVAILABLE) instead
        # of hanging them; the write itself carries on and lands if storage comes back.
        self.write_timeout_s = 10.0
        self.stalled_since: float | None = None  # monotonic time the bound first passed
        # A batch holding this much at the end of an operation is sealed at once (not
        # grown further while a commit is in flight): bounds one write's fill and size.
        self.max_batch_keys = 10_000
        self.max_batch_bytes = 8 << 20
        self._pending: set[_Batch] = set()  # batches whose waiters have no outcome yet
        # Called with True when storage stalls, False when a write is durable again.
        self.on_stall: Callable[[bool], None] | None = None
        # storage.commit_min_gap_ms: when the last batch carried more than one operation
        # (calls arrive concurrently), an idle writer starts the next commit no sooner
        # than this after the previous one started, so commits carry more operations
        # each; a lone operation still commits at once. 0 = off.
        self.min_gap_s = 0.0
        # storage.commit_busy_gap_ms: the same gap, but only while this process's CPU is
        # saturated (`busy`, sampled at each commit's start). Then the calls a commit
        # could carry are queued behind the CPU anyway, so starting a commit for every
        # few of them only spends more CPU per call (a commit costs ~1 ms of CPU here)
        # and, in turn, takes fewer calls in: measured on h2load Enqueue (quiet), 5-7
        # operations per commit at 2,300-3,300 calls/s without it, 21-30 at 4,400-7,300
        # with 5 ms. Below saturation (a steady load, a lone caller) it does not apply,
        # so latency there is unchanged. 0 = off.
        self.busy_gap_s = 0.0
        self.cpu_clock: Callable[[], float] = time.process_time  # a seam for tests
        self._cpu_at = 0.0  # cpu_clock() at the last sample
        self._busy_at = 0.0  # loop time of the last sample
        self._busy = 0.0  # recent CPU / wall of this process, at commit starts (EWMA)
        self._last_start = 0.0  # loop time the writer took the last batch
        self._last_ops = 0  # operations in that batch
        self._gap_timer: asyncio.TimerHandle | None = None
        self._sched_at = 0.0  # loop time of the next silo.storage.sched.apply()

    # ---- staging (synchronous; call from the shard's loop) ----------------

    def _batch(self) -> _Batch:
        if self._failed is not None:
            raise StorageError(f"shard storage failed: {self._failed}")
        if self._closed:
            raise StorageError("shard is closing")
        b = self._staged
        if b is None:
            b = self._staged = _Batch()
            if self._idle():
                gap = self._gap_left()
                if gap > 0:
                    self._loop.call_later(gap, self._hand_off_next_pass, b)
                else:
                    self._loop.call_soon(self._hand_off_next_pass, b)
            elif self._interval > 0:
                self._loop.call_later(self._interval, self._hand_off, b)
            # else: handed off by _kick when the commit in flight is durable
            self._pending.add(b)
            if self.stalled_since is not None:
                self._arm_write_bound(b)  # fails at once: it would only queue behind
        return b

    def _hand_off_next_pass(self, b: _Batch) -> None:
        """An idle writer's batch goes one loop pass after the pass that opened it, not
        at its end: whatever that pass woke with a plain future (a worker stream sleeping
        in silo.shard.ready.wait_due on the task just enqueued) runs in between and
        stages into the same batch, so the enqueue and the lease of its task share one
        write and one WAL flush instead of two in a row (measured at 20 jobs/s: 3.0 ->
        2.0 commits per job). Costs one callback; the batch is still written at once:
        the writer is woken here and seals the batch when it runs, in the next pass, where
        a callback sealing it would have run (one pass and one callback fewer than
        sealing in a callback and then waking the writer)."""
        if self._staged is b and not b.queued:
            b.queued = True
            self._queue.put_nowait(b)

    def _idle(self) -> bool:
        """No commit in flight: nothing handed to the writer and not yet durable, and no
        flush waiting for an fsync round that has not started (silo.storage.local_sync:
        one commit is written ahead of the round in progress, not more)."""
        if self._inflight or self._unconfirmed or self._durability_task is not None:
            return False
        ls = self._local_sync
        return ls is None or not ls.backlog

    def _gap_left(self) -> float:
        """Seconds until an idle writer may start the next commit (min_gap_s): 0 when
        the gap is off, has passed, or the last batch held a single operation."""
        gap = commit_gap(self.min_gap_s, self.busy_gap_s, self._busy, self._last_ops)
        if gap <= 0:
            return 0.0
        return self._last_start + gap - self._loop.time()

    def _sample_busy(self, now: float) -> None:
        """Update `_busy` from the CPU this process used since the last sample (at a
        commit's start; at least BUSY_SAMPLE_S apart so one sample is not noise)."""
        if self.busy_gap_s <= 0:
            return
        wall = now - self._busy_at
        if wall < BUSY_SAMPLE_S:
            return
        cpu = self.cpu_clock()
        if self._busy_at > 0:
            self._busy = 0.5 * self._busy + 0.5 * min((cpu - self._cpu_at) / wall, 1.0)
        self._busy_at, self._cpu_at = now, cpu

    def _kick(self) -> None:
        """The commit in flight finished: send what gathered meanwhile, now (or once
        the minimum gap since the last commit's start has passed)."""
        b = self._staged
        if b is not None and self._idle():
            gap = self._gap_left()
            if gap > 0:
                if self._gap_timer is None:
                    self._gap_timer = self._loop.call_later(gap, self._gap_passed)
                return
            self._hand_off(b)

    def _gap_passed(self) -> None:
        self._gap_timer = None
        self._kick()

    def put(self, key: bytes, value: bytes) -> None:
        b = self._batch()
        b.writes[key] = value
        b.nbytes += len(key) + len(value)

    def put_empty(self, keys_: list[bytes]) -> None:
        """Put b"" under each key (index rows): `put(k, b"")` for each, batched."""
        b = self._batch()
        w = b.writes
        n = 0
        for k in keys_:
            w[k] = b""
            n += len(k)
        b.nbytes += n

    def delete(self, key: bytes) -> None:
        b = self._batch()
        b.writes[key] = None
        b.nbytes += len(key)

    def commit(self) -> Awaitable[None]:
        """The durability of everything staged so far (and of this operation)."""
        b = self._batch()
        b.ops += 1
        if len(b.writes) >= self.max_batch_keys or b.nbytes >= self.max_batch_bytes:
            # Sealed at an operation's end, so no operation's writes are split.
            self._hand_off(b)
        f = b.waiter(self._loop)
        if tracing.ENABLED:
            return tracing.awaiting("storage.commit", f)
        return f

    # ---- the write bound (full disk, stuck object store) -----------------------

    def _arm_write_bound(self, b: _Batch) -> None:
        """Fail b's waiters if b is not durable within write_timeout_s of the writer
        starting on it. While storage is stalled, batches fail at once: their waiters
        would only queue behind it."""
        if b.timer is not None or b.acked:
            return
        delay = 0.0 if self.stalled_since is not None else self.write_timeout_s
        b.timer = self._loop.call_later(delay, self._write_bound_passed, b)

    def _settle(self, b: _Batch, exc: BaseException | None) -> None:
        """The storage outcome of b (the writer's; once): its waiters get it now."""
        if b.done:
            return
        b.done = True
        self._pending.discard(b)
        if b.timer is not None:
            b.timer.cancel()
        b.ack(exc)
        if exc is None and self.stalled_since is not None:
            stalled_s = time.monotonic() - self.stalled_since
            self.stalled_since = None
            log.warning("shard storage recovered: writes durable again after %.1f s", stalled_s)
            if self.on_stall is not None:
                self.on_stall(False)

    def _write_bound_passed(self, b: _Batch) -> None:
        if b.acked:
            return
        if self.stalled_since is None:
            self.stalled_since = time.monotonic()
            log.error("shard storage stalled: a write is not durable after %.1f s (disk full "
                      "or object store unreachable?); failing writes with UNAVAILABLE until "
                      "it recovers", self.write_timeout_s)
            if self.on_stall is not None:
                self.on_stall(True)
        # Every batch not yet durable queues behind this one: its waiters fail now too.
        for p in [b, *self._pending]:
            p.ack(StorageError(
                f"write not durable within {self.write_timeout_s:g} s (storage stalled)"))

    def _hand_off(self, b: _Batch) -> None:
        """Seal b and queue it for the writer (unless it is queued already)."""
        if self._staged is b:
            self._seal(b)
            if not b.queued:
                b.queued = True
                self._queue.put_nowait(b)

    def _seal(self, b: _Batch) -> None:
        """No more writes join b: it is the writer's."""
        if self._staged is b:
            self._staged = None
            if self._on_seal is not None:
                # Runs synchronously at the seal, so derived rows (counters) describe
                # exactly the operations in this batch and the batches before it.
                self._on_seal(b.writes)
            self._inflight.append(b)

    # ---- reads ---------------------------------------------------------------

    def staged_value(self, key: bytes) -> tuple[bool, bytes | None]:
        """(found, value) among writes not yet applied to the database."""
        b = self._staged
        if b is not None and key in b.writes:
            return True, b.writes[key]
        for b in reversed(self._inflight):
            if key in b.writes:
                return True, b.writes[key]
        return False, None

    def unapplied(self) -> list[dict[bytes, bytes | None]]:
        """The write sets not yet applied to the database, oldest first (a scan started
        now must overlay them to see what the shard sees; silo.shard.buffer)."""
        out = [b.writes for b in self._inflight]
        if self._staged is not None:
            out.append(self._staged.writes)
        return out

    async def get(self, key: bytes) -> bytes | None:
        found, value = self.staged_value(key)
        if found:
            return value
        try:
            return await self._db.get(key)
        except Exception as e:  # noqa: BLE001 - surface storage failures uniformly
            raise StorageError(f"read failed: {e}") from e

    async def scan_prefix(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Rows under prefix as the shard sees them (database + unapplied writes)."""
        # Capture unapplied batches before scanning: one applied during the scan is
        # merged again, which is harmless; one missed would hide a write.
        pending = list(self._inflight)
        if self._staged is not None:
            pending.append(self._staged)
        try:
            rows = dict(await scan_prefix(self._db, prefix))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"scan failed: {e}") from e
        for b in pending:
            for k, v in b.writes.items():
                if k.startswith(prefix):
                    if v is None:
                        rows.pop(k, None)
                    else:
                        rows[k] = v
        return sorted(rows.items())

    # ---- writing -------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            b = await self._queue.get()
            if b is None:
                return
            self._seal(b)  # queued unsealed by _hand_off_next_pass
            now = self._last_start = self._loop.time()
            self._sample_busy(now)
            GroupCommitter.started += 1
            if now >= self._sched_at:  # Tokio threads started since (silo.storage.sched)
                self._sched_at = now + sched.RESCAN_S
                sched.apply()
            self._last_ops = b.ops
            self._arm_write_bound(b)
            if not b.writes:
                # Nothing to write (an operation that changed nothing still awaits the
                # batch): it is durable once everything written before it is.
                self._inflight.remove(b)
                if self._last_handle is None:
                    self._settle(b, None)
                    self._kick()
                    continue
                self._unconfirmed.append((self._last_handle, b))
                if self._durability_task is None:
                    self._durability_task = asyncio.create_task(self._confirm_durability())
                continue
            try:
                wb = WriteBatch()
                self._fill(wb, b.writes)
                calls = self._commit_calls()
                early = None
                if calls and self._durability_task is None:
                    # The WAL flush goes right behind the write (CommitCalls.
                    # write_flushing); the durability step checks it carried the write.
                    t0 = time.perf_counter()
                    wait_write, early = calls.write_flushing(wb)
                    try:
                        write_handle = await wait_write
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await early  # its future is freed by running it out
                        raise
                    handle = True
                else:
                    # With flush_on_commit the handle is never awaited: the fast write
                    # frees it at once and returns True instead.
                    handle = await (calls.write(wb) if calls else self._db.write(wb))
            except Exception as e:  # noqa: BLE001
                log.error("shard write failed: %s", e)
                self._fail(e)
                self._inflight.remove(b)
                self._settle(b, StorageError(f"write failed: {e}"))
                self._kick()
                continue
            self._inflight.remove(b)
            self._last_handle = handle
            self.batches_written += 1
            self.ops_written += b.ops
            self.bytes_written += b.nbytes
            metrics.COMMIT_BATCH_OPS.observe((self.name,), b.ops)
            self._unconfirmed.append((handle, b))
            if self._durability_task is None:
                first = None
                if early is not None:
                    batches = self._take_unconfirmed()
                    first = (calls.confirm(early, write_handle), batches, t0)
                elif calls:
                    # Send the WAL flush now: the task's first step is a loop pass away.
                    batches = self._take_unconfirmed()
                    first = (calls.flush_wal_started(), batches, time.perf_counter())
                self._durability_task = asyncio.create_task(self._confirm_durability(first))

    def _take_unconfirmed(self) -> list[_Batch]:
        """The batches written and not yet confirmed durable: the next wait covers them."""
        batches = [b for _, b in self._unconfirmed]
        self._unconfirmed.clear()
        return batches

    def _commit_calls(self) -> commit_calls.CommitCalls | None:
        """The fast calls, if flush_on_commit is on and the database allows them."""
        if not self.flush_on_commit:
            return None
        calls = self._calls
        if calls is None:
            calls = self._calls = (commit_calls.CommitCalls(self._db)
                                   if commit_calls.available_for(self._db) else False)
        return calls or None

    def _durability_wait(self, handle) -> Awaitable[None]:
        if self.flush_on_commit or handle is True:
            # Flush the WAL now rather than at the next flush_interval tick: the batch is
            # durable ~1 ms after it is written, at the price of one object-store write
            # per commit instead of per interval.
            calls = self._calls
            if calls:
                return calls.flush_wal_started()
            return self._db.flush_with_options(_WAL_FLUSH)
        return handle.await_durable()

    async def _confirm_durability(self, first=None) -> None:
        """Wait for the newest written batch only: the WAL is durable in write order, so
        one await_durable confirms every batch written before it too. At most one such
        wait is in flight, so a flush costs one cross-thread wake-up however many
        batches it carries. `first`: (a wait already started, the batches it covers,
        its start time), from the writer."""
        try:
            while first is not None or self._unconfirmed:
                if first is not None:
                    wait, batches, t0 = first
                    first = None
                else:
                    handle = self._unconfirmed[-1][0]
                    batches = self._take_unconfirmed()
                    t0 = time.perf_counter()
                    wait = self._durability_wait(handle)
                try:
                    await wait
                    metrics.COMMIT_DURABLE_WAIT.observe((self.name,), time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001
                    self._settle_all(batches, e)
                    continue
                if self._local_sync is not None:  # fsynced before anyone is answered; the
                    self._local_sync.then_sync(batches, self.name, self._settle_all)  # next
                    continue  # commit is written and flushed meanwhile (local_sync)
                self._settle_all(batches, None)
        finally:
            self._durability_task = None
            self._kick()

    def _settle_all(self, batches: list[_Batch], e: BaseException | None) -> None:
        if e is None:
            for b in batches:
                self._settle(b, None)
            return
        if not isinstance(e, asyncio.CancelledError):  # cancelled: the loop is closing
            log.error("shard durability wait failed: %s", e)
            self._fail(e)
        for b in batches:
            self._settle(b, StorageError(f"durability wait failed: {e}"))

    def _fail(self, e: BaseException) -> None:
        first = self._failed is None
        self._failed = e
        events.storage_error(self.name, e)
        if first and self.on_failure is not None:
            self.on_failure(e)

    async def close(self) -> None:
        """Write and make durable everything staged, then stop the writer."""
        b = self._staged
        if b is not None:
            self._hand_off(b)
        self._closed = True
        self._queue.put_nowait(None)
        await self._writer
        while self._durability_task is not None:
            await asyncio.shield(self._durability_task)
        if self._local_sync is not None:
            await self._local_sync.drain()
