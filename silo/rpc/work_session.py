"""One worker stream (SiloStream.Work): push tasks into free slots, take outcomes back.

A session has one *source* per place its tasks can come from: this process's shards,
and each other worker process of the node (its shards are leased there and relayed
over the Unix socket, so one connection gets tasks from every shard of the node). Each
source loops: wait until it has a due task of the group and the worker has a free slot
(no polling: shards wake waiters when they index a task, and the wait also ends at the
earliest future start time), reserve a fair share of the free slots, lease that many
through the same code LeaseTasks uses, push them. Free slots are split between sources
and between due local shards, so a busy shard cannot starve the others.

Up-stream items (outcomes, heartbeats, refresh outcomes, give-backs) run concurrently,
each through its unary handler, and are acked down-stream once durable. All writes to
the stream go through one writer that merges whatever is waiting into one message.

Ending: `stop` (or the client half-closing) stops the sources; tasks leased after that,
or leased and not yet written, are given back at once. A cut stream leaves the leases
of tasks it had written to expire (the worker may be running them), and gives back the
ones it had not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_stream_pb2 as spb
from silo.errors import SiloError
from silo.observability import metrics
from silo.rpc import batch, convert, guard, stream
from silo.rpc.service import SiloService, _OwnedElsewhere
from silo.shard import lease
from silo.shard.ready import due_now, interrupt_all, wait_due

log = logging.getLogger(__name__)

WAIT_S = 5.0  # a source re-checks its state at least this often
RETRY_S = 0.5  # pause after a source failed (e.g. the owner process is restarting)
CANCEL_CHECK_S = 0.25  # how often leased tasks of local shards are checked for a cancel
ACK = spb.Ack


class WorkSession:
    def __init__(self, svc: SiloService, context: grpc.aio.ServicerContext) -> None:
        self.svc = svc
        self.node = svc.node
        self.context = context
        self.worker_id = ""
        self.task_group = ""
        self.free = 0
        self.stopping = False
        self._stop = asyncio.Event()
        self._slots = asyncio.Event()
        self._sleeping: set[asyncio.Future[object]] = set()  # local sources' wait_due
        self._out = spb.WorkerDown()
        self._out_tasks: list[tuple[str, str]] = []  # (shard, task id) in _out, not written
        self._has_out = asyncio.Event()
        self._closed = False
        self._sources: list[asyncio.Task[None]] = []
        self._items: set[asyncio.Task[None]] = set()
        # task id → (shard, tenant, job id) for tasks written to this stream, not ended
        self.leased: dict[str, tuple[str, str, str]] = {}
        self._cancel_sent: set[str] = set()
        self.bad: SiloError | None = None  # an up-stream message that did not parse

    # ---- lifecycle -------------------------------------------------------------------

    async def read(self, first: bool = False):  # -> spb.WorkerUp | grpc.aio.EOF
        """The next WorkerUp, or EOF. The service takes raw bytes (stream.
        add_stream_service); one that does not parse ends the stream INVALID_ARGUMENT:
        at once if it is the first, else like a half-close (`self.bad`, see run)."""
        raw = await self.context.read()
        if raw is grpc.aio.EOF or not isinstance(raw, bytes):
            return raw
        try:
            return guard.parse_request(spb.WorkerUp, "Work", raw)
        except SiloError as e:
            if first:  # nothing runs yet: end now
                await self.context.abort(e.code, e.message)
            self.bad = e
            return grpc.aio.EOF

    async def run(self) -> None:
        ctx = self.context
        first = await self.read(first=True)
        if first is grpc.aio.EOF:
            return
        sub = first.subscribe
        if not sub.task_group:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "task_group is required")
        self.worker_id, self.task_group = sub.worker_id, sub.task_group
        try:
            sources = self._plan(sub.shard if sub.HasField("shard") else None)
        except SiloError as e:
            await ctx.abort(e.code, e.message)
        self.free = sub.slots
        writer = asyncio.create_task(self._write_loop())
        watcher = asyncio.create_task(self._watch_cancellations())
        self._sources = [asyncio.create_task(s) for s in sources]
        clean = False
        try:
            self._take(first)
            while True:
                msg = await self.read()
                if msg is grpc.aio.EOF:
                    break
                self._take(msg)
            clean = True
        finally:
            watcher.cancel()
            # Detached: the handler may be cancelled (stream cut) but the give-backs and
            # the acks of items already taken must still happen.
            end = asyncio.ensure_future(self._finish(writer, clean))
            if clean:
                await end
        if self.bad is not None:
            # Only now: grpcio refuses to send a status while the writer's message is in
            # flight (abort then raised, and the call hung until its deadline).
            await ctx.abort(self.bad.code, self.bad.message)

    async def _finish(self, writer: asyncio.Task[None], clean: bool) -> None:
        self._halt()
        if self._sources:
            await asyncio.wait(self._sources)
        if self._items:
            await asyncio.wait(list(self._items))
        # Tasks not written yet go back rather than to a worker that is leaving.
        unsent, self._out_tasks = self._out_tasks, []
        del self._out.tasks[:]
        await self._give_back_all(unsent)
        if clean:
            self._closed = True
            self._has_out.set()
            with contextlib.suppress(Exception):
                await writer
        else:
            self._closed = True
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
        unsent, self._out_tasks = self._out_tasks, []
        await self._give_back_all(unsent)

    def _halt(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._stop.set()
            self._slots.set()
            interrupt_all(self._sleeping)

    # ---- up-stream -------------------------------------------------------------------

    def _take(self, msg: spb.WorkerUp) -> None:
        if msg.add_slots:
            self._give_slots(msg.add_slots)
        if msg.outcomes:
            self._run_items(ACK.OUTCOME, "ReportOutcome", msg.outcomes)
        if msg.heartbeats:
            self._run_items(ACK.HEARTBEAT, "Heartbeat", msg.heartbeats)
        if msg.refresh_outcomes:
            self._run_items(ACK.REFRESH_OUTCOME, "ReportRefreshOutcome", msg.refresh_outcomes)
        for ref in msg.give_back:
            self._spawn(self._give_back_item(ref))
        if msg.stop and not self.stopping:
            self._spawn(self._stop_item())

    def _run_items(self, kind: int, method: str, requests) -> None:
        """Items of this process's shards run here one by one; those of each other
        process go to it as one forwarded batch (a relay costs more than the item)."""
        remote: dict[int, list] = {}
        here: list = []
        owner_of = stream.owner_lookup(self.svc)
        for r in requests:
            owner = owner_of(r.shard)
            if owner is None:
                if kind == ACK.OUTCOME:
                    here.append(r)
                else:
                    self._spawn(self._item(kind, method, r))
            else:
                remote.setdefault(owner, []).append(r)
        if here:
            self._spawn(self._outcomes_here(here))
        for owner, reqs in remote.items():
            self._spawn(self._remote_items(kind, method, owner, reqs))

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._items.add(t)
        t.add_done_callback(self._items.discard)

    async def _item(self, kind: int, method: str, request) -> None:
        try:
            reply = await stream.call_unary(self.svc, method, request)
        except Exception as e:  # noqa: BLE001 - acked, not raised
            reply = e
        self._ack(kind, request, reply)

    async def _outcomes_here(self, requests: list) -> None:
        """Outcomes of this process's shards: one pass for the message (silo.rpc.batch)."""
        svc = self.svc
        replies = await batch.report_outcomes(
            svc, requests, lambda r: stream.call_unary(svc, "ReportOutcome", r))
        for request, reply in zip(requests, replies, strict=True):
            self._ack(ACK.OUTCOME, request, reply)

    async def _remote_items(self, kind: int, method: str, owner: int, requests: list) -> None:
        try:
            replies = await stream.call_unary_many(self.svc, owner, method, requests)
        except Exception as e:  # noqa: BLE001 - the relay failed, so did each item
            replies = [e] * len(requests)
        for request, reply in zip(requests, replies, strict=True):
            self._ack(kind, request, reply)

    def _ack(self, kind: int, request, reply) -> None:
        """Ack one item down-stream: its reply, or the error the unary call ended with."""
        ack = self._out.acks.add(kind=kind, task_id=request.task_id)  # built in place
        if isinstance(reply, BaseException):
            ack.error.CopyFrom(stream.status_of(reply))
            if isinstance(reply, SiloError) and reply.code == grpc.StatusCode.NOT_FOUND:
                self.leased.pop(request.task_id, None)
        else:
            if kind == ACK.HEARTBEAT and reply.cancelled:
                ack.cancelled = True
                ack.cancelled_at_ms = reply.cancelled_at_ms
            if kind != ACK.HEARTBEAT:
                self.leased.pop(request.task_id, None)
        self._has_out.set()

    async def _give_back_item(self, ref: spb.TaskRef) -> None:
        ack = ACK(kind=ACK.GIVE_BACK, task_id=ref.task_id)
        try:
            await stream.give_back_task(self.svc, self.worker_id, ref.shard, ref.task_id)
            self.leased.pop(ref.task_id, None)
        except Exception as e:  # noqa: BLE001 - acked, not raised
            ack.error.CopyFrom(stream.status_of(e))
        self._out.acks.append(ack)
        self._has_out.set()

    async def _stop_item(self) -> None:
        self._halt()
        if self._sources:
            await asyncio.wait(self._sources)
        self._out.stopped = True
        self._has_out.set()

    # ---- down-stream -----------------------------------------------------------------

    def _push_relayed(self, raw: bytes) -> int:
        """A relayed LeaseTasksResponse, parsed straight into the message being built
        (its tasks and refresh_tasks are WorkerDown's fields 1 and 2: no copy); returns
        how many run tasks it held."""
        out = self._out
        start = len(out.tasks)
        refreshes = len(out.refresh_tasks)
        out.MergeFromString(raw)
        new = out.tasks[start:]
        for t in new:
            self._out_tasks.append((t.shard, t.id))
            self.leased[t.id] = (t.shard, t.tenant_id if t.HasField("tenant_id") else "-",
                                 t.job_id)
        if new or len(out.refresh_tasks) > refreshes:
            self._has_out.set()
        return len(new)

    async def _lease_here(self, s, n: int) -> int:
        """Lease up to n tasks of one local shard (the LeaseTasks path: lease_tasks and
        its metrics) and write them in place into the message being built; returns how
        many run tasks it leased."""
        g = self.task_group
        got = await lease.lease_tasks(s, self.worker_id, n, g)
        metrics.POLLS.inc((s.id, g))
        if not got:
            return 0
        self.node.publish(s)
        if self.stopping:  # leased after the worker stopped: never sent, straight back
            back = [(s.id, t.lease.task.task_id) for t in got if t.info is not None]
            self._spawn(self._give_back_all(back))
            return len(back)
        lease_ms = s.config.lease_ms
        out = self._out
        k = 0
        for t in got:
            if t.info is None:
                convert.fill_refresh_task(out.refresh_tasks.add(), t.lease, s.id, lease_ms)
                continue
            task = t.lease.task
            convert.fill_task(out.tasks.add(), t, s.id, lease_ms)
            self._out_tasks.append((s.id, task.task_id))
            self.leased[task.task_id] = (s.id, task.tenant, task.job_id)
            metrics.task_leased(s.id, t.info.task_group, task.relative_attempt,
                                t.info.enqueue_time_ms, t.lease.started_at_ms)
            k += 1
        self._has_out.set()
        return k

    async def _write_loop(self) -> None:
        while True:
            await self._has_out.wait()
            self._has_out.clear()
            msg, self._out = self._out, spb.WorkerDown()
            written, self._out_tasks = self._out_tasks, []
            # (not ByteSize(): upb computes it by encoding, and the write encodes again)
            if not (msg.tasks or msg.acks or msg.refresh_tasks or msg.cancelled
                    or msg.stopped):
                if self._closed:
                    return
                continue
            try:
                await self.context.write(msg)
            except BaseException:
                self._out_tasks = written + self._out_tasks  # not sent: give back
                raise
            if self._closed and not self._has_out.is_set():
                return

    async def _watch_cancellations(self) -> None:
        """Cancellation flows down: each task leased here whose job got a cancel request
        is named once in `cancelled` (tasks of other processes' shards are asked about
        in one forwarded call per process)."""
        while True:
            await asyncio.sleep(CANCEL_CHECK_S)
            self._cancel_sent &= self.leased.keys()
            by_owner: dict[int, list[tuple[str, str, str, str]]] = {}
            for task_id, (shard_id, tenant, job_id) in list(self.leased.items()):
                local = self.node.shards.get(shard_id)
                if local is not None and task_id not in local.leases:
                    del self.leased[task_id]  # ended elsewhere (unary report, expiry)
                    continue
                if task_id not in self._cancel_sent:
                    owner = self.node.owner_of.get(shard_id, self.node.index)
                    by_owner.setdefault(owner, []).append((shard_id, tenant, job_id, task_id))
            found: list[str] = []
            for owner, tasks in by_owner.items():
                if owner == self.node.index:
                    found += stream.cancelled_here(self.svc, tasks)
                else:
                    with contextlib.suppress(SiloError):
                        found += await stream.cancelled_at(self.svc, owner, tasks)
            refs = []
            for task_id in found:
                entry = self.leased.get(task_id)
                if entry is not None and task_id not in self._cancel_sent:
                    self._cancel_sent.add(task_id)
                    refs.append(spb.TaskRef(shard=entry[0], task_id=task_id,
                                            tenant_id=None if entry[1] == "-" else entry[1]))
            if refs:
                self._out.cancelled.extend(refs)
                self._has_out.set()

    # ---- sources -----------------------------------------------------------------------

    def _plan(self, shard_id: str | None) -> list:
        """The sources of this stream: coroutines, one per place tasks come from."""
        if shard_id is not None:
            try:
                return [self._local_source([self.svc.shard(shard_id)])]
            except _OwnedElsewhere as e:
                return [self._remote_source(e.owner, shard_id)]
        out = [self._local_source(list(self.node.shards.values()))]
        out += [self._remote_source(p, "") for p in self.node.peers]
        return out

    def _share(self) -> int:
        n = max(1, len(self._sources))
        return max(1, math.ceil(self.free / n)) if self.free > 0 else 0

    def _give_slots(self, n: int) -> None:
        """Slots come free (the worker added them, or a source reserved more than it
        leased): wake every source waiting for one. Only the worker's add_slots used to
        wake them, so slots a source handed back after an empty or short lease sat idle
        while another source had due tasks, until the worker next finished a task (with
        nothing running there: never)."""
        if n > 0:
            self.free += n
            self._slots.set()

    async def _until_slot(self) -> bool:
        while self.free <= 0 and not self.stopping:
            self._slots.clear()
            await self._slots.wait()
        return not self.stopping

    async def _or_stop(self, aw) -> object | None:
        """Await aw unless the session stops first (then cancel it, return None)."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return None
        return task.result()

    async def _local_source(self, shards: list) -> None:
        g = self.task_group
        while await self._until_slot():
            due = [s for s in shards if due_now(s, g)]
            if not due:
                # Not through _or_stop (two tasks and an asyncio.wait per wait): the
                # wake-up is one loop pass, so the lease below joins the group commit
                # of the enqueue that woke it (silo.storage.db); _halt interrupts it.
                with contextlib.suppress(Exception):
                    await wait_due(shards, g, WAIT_S, self._sleeping)
                continue
            n = self._share()
            random.shuffle(due)
            due = due[:n]
            per, extra = divmod(n, len(due))
            self.free -= n
            got: list[int | BaseException]
            if len(due) == 1:  # the common case: no task per shard
                try:
                    got = [await self._lease_here(due[0], n)]
                except Exception as e:  # noqa: BLE001 - logged, retried below
                    got = [e]
            else:
                got = await asyncio.gather(
                    *(self._lease_here(s, per + (1 if i < extra else 0))
                      for i, s in enumerate(due)), return_exceptions=True)
            leased = 0
            for r in got:
                if isinstance(r, BaseException):
                    log.warning("worker stream: leasing failed: %s", r)
                    continue
                leased += r
            self._give_slots(n - leased)
            if leased < n and any(isinstance(r, BaseException) for r in got):
                await asyncio.sleep(RETRY_S)

    async def _remote_source(self, owner: int, shard_id: str) -> None:
        g = self.task_group
        more = False  # the last lease filled its request: lease again without waiting
        while await self._until_slot():
            if not more:
                try:
                    ready = await self._or_stop(stream.stream_wait(
                        self.svc, owner, g, shard_id, int(WAIT_S * 1000)))
                except SiloError:
                    await asyncio.sleep(RETRY_S)
                    continue
                if not ready or self.stopping:
                    continue
            more = False
            n = self._share()
            if n <= 0:
                continue
            self.free -= n
            req = pb.LeaseTasksRequest(worker_id=self.worker_id, task_group=g, max_tasks=n)
            method = "LeaseTasks@local"
            if shard_id:
                req.shard = shard_id
                method = "LeaseTasks"
            try:
                raw = await self.node.peers[owner].call(method, req.SerializeToString())
            except SiloError as e:
                self._give_slots(n)
                log.debug("worker stream: leasing from w%d failed: %s", owner, e)
                await asyncio.sleep(RETRY_S)
                continue
            if self.stopping:  # leased after the worker stopped: never sent, straight back
                tasks = pb.LeaseTasksResponse.FromString(raw).tasks
                self._spawn(self._give_back_all([(t.shard, t.id) for t in tasks]))
                got = len(tasks)
            else:
                got = self._push_relayed(raw)
            self._give_slots(n - got)
            more = got >= n

    async def _give_back_all(self, refs: list[tuple[str, str]]) -> None:
        async def one(shard_id: str, task_id: str) -> None:
            try:
                await stream.give_back_task(self.svc, self.worker_id, shard_id, task_id)
            except Exception as e:  # noqa: BLE001 - its lease expires instead
                log.info("worker stream: give back of task %s failed: %s", task_id, e)
            self.leased.pop(task_id, None)

        if refs:
            await asyncio.gather(*(one(s, t) for s, t in refs))
