"""The client side of Silo's streaming extension (silostream.v1.SiloStream).

`supports_stream` probes a server once (an empty EnqueueMany: a server without the
extension, e.g. upstream Silo, answers UNIMPLEMENTED) and remembers the answer per
address. `enqueue_many` sends one EnqueueMany per server, or falls back to one Enqueue
per job. `WorkStream` is the worker's push stream: tasks arrive into free slots,
outcomes/heartbeats go up the same stream and are acked down; it is driven by
silo.worker.Worker, which falls back to LeaseTasks polling when the server lacks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_stream_pb2 as spb
from silo._proto import silo_stream_pb2_grpc as spb_grpc
from silo.client.errors import SiloError, from_rpc_error, is_wrong_shard
from silo.client.handle import JobHandle
from silo.client.routing import hash_tenant
from silo.client.types import Outcome, RefreshTask, Task, outcome_to_pb

if TYPE_CHECKING:
    from silo.client.client import SiloClient

log = logging.getLogger("silo.client.stream")

ENQUEUE_MANY_RETRIES = 4


class _Status(grpc.RpcError):
    """A per-item status, shaped like a failed call so the client's error typing applies."""

    def __init__(self, st: spb.Status) -> None:
        super().__init__(st.message)
        self._code = _CODES.get(st.code, grpc.StatusCode.UNKNOWN)
        self._message = st.message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple:
        return ()


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def item_error(st: spb.Status, *, op: str = "", job_id: str | None = None,
               tenant: str | None = None) -> SiloError:
    return from_rpc_error(_Status(st), op=op, job_id=job_id, tenant=tenant)


def _stub(client: SiloClient, addr: str) -> spb_grpc.SiloStreamStub:
    cache = client.__dict__.setdefault("_stream_stubs", {})
    conn = client._conn(addr)
    stub = cache.get(addr)
    if stub is None or stub[0] is not conn:
        stub = cache[addr] = (conn, spb_grpc.SiloStreamStub(conn.channel))
    return stub[1]


async def supports_stream(client: SiloClient, addr: str) -> bool:
    """Whether the server at addr offers silostream.v1 (asked once, then remembered)."""
    known = client.__dict__.setdefault("_stream_support", {})
    if addr not in known:
        try:
            await _stub(client, addr).EnqueueMany(spb.EnqueueManyRequest(),
                                                  timeout=client.rpc_timeout_s,
                                                  metadata=await client._metadata())
            known[addr] = True
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise from_rpc_error(e) from e
            known[addr] = False
    return known[addr]


async def enqueue_many(client: SiloClient, jobs: list[dict[str, Any]]
                       ) -> list[JobHandle | SiloError]:
    reqs = [client.enqueue_request(**j) for j in jobs]
    tenants = [j.get("tenant") or None for j in jobs]
    out: list[JobHandle | SiloError | None] = [None] * len(jobs)
    todo = list(range(len(jobs)))
    for attempt in range(ENQUEUE_MANY_RETRIES + 1):
        topo = await client.get_topology()
        by_addr: dict[str, list[int]] = {}
        for i in todo:
            shard = topo.shard_for_key(hash_tenant(tenants[i]))
            reqs[i].shard = shard.shard_id
            by_addr.setdefault(shard.grpc_addr, []).append(i)
        retry: list[int] = []

        async def send(addr: str, idx: list[int], retry: list[int] = retry) -> None:
            if not await supports_stream(client, addr):
                async def one(i: int) -> None:
                    try:
                        out[i] = await client.enqueue(**jobs[i])
                    except SiloError as e:
                        out[i] = e
                await asyncio.gather(*(one(i) for i in idx))
                return
            try:
                resp = await _stub(client, addr).EnqueueMany(
                    spb.EnqueueManyRequest(jobs=[reqs[i] for i in idx]),
                    timeout=client.rpc_timeout_s, metadata=await client._metadata())
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                for i in idx:
                    out[i] = err
                if client._retryable(e):
                    retry.extend(idx)
                return
            for i, r in zip(idx, resp.results, strict=True):
                if r.WhichOneof("result") == "id":
                    out[i] = JobHandle(client, r.id, tenants[i])
                else:
                    out[i] = item_error(r.error, op="enqueue", job_id=jobs[i].get("id"),
                                        tenant=tenants[i])
                    if is_wrong_shard(_CODES.get(r.error.code, grpc.StatusCode.UNKNOWN),
                                      r.error.message) or r.error.code == 14:
                        retry.append(i)

        await asyncio.gather(*(send(a, idx) for a, idx in by_addr.items()))
        if not retry or attempt == ENQUEUE_MANY_RETRIES:
            break
        todo = retry
        await asyncio.sleep(min(client.retry_delay_s * 2 ** attempt, client.max_retry_delay_s))
        await client.refresh_topology()
    return out  # type: ignore[return-value]


class StreamBroken(Exception):
    """The worker stream ended before an item's ack came: use the unary call instead."""


class WorkStream:
    """One push stream to one server for one Worker (see silo.worker).

    `on_task(Task)` / `on_refresh(RefreshTask)` / `on_cancel(task_id)` are the worker's
    callbacks. Up-stream items written in one event-loop pass go as one message."""

    def __init__(self, client: SiloClient, addr: str, worker_id: str, task_group: str,
                 slots: int, *, on_task, on_refresh, on_cancel) -> None:
        self.client = client
        self.addr = addr
        self.worker_id = worker_id
        self.task_group = task_group
        self.slots = slots
        self.on_task = on_task
        self.on_refresh = on_refresh
        self.on_cancel = on_cancel
        self._call: Any = None
        self._up = spb.WorkerUp()
        self._flush_scheduled = False
        self._acks: dict[tuple[int, str], asyncio.Future[spb.Ack]] = {}
        self._stopped = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[spb.WorkerUp | None] = asyncio.Queue()
        self.alive = False
        self.done = asyncio.Event()

    async def start(self) -> None:
        md = await self.client._metadata()
        self._call = _stub(self.client, self.addr).Work(metadata=md)
        first = spb.WorkerUp()
        first.subscribe.worker_id = self.worker_id
        first.subscribe.task_group = self.task_group
        first.subscribe.slots = self.slots
        await self._call.write(first)
        self.alive = True
        self._reader = asyncio.ensure_future(self._read_loop())
        self._writer = asyncio.ensure_future(self._write_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    break
                for t in msg.tasks:
                    self.on_task(Task(t))
                for t in msg.refresh_tasks:
                    self.on_refresh(RefreshTask.from_pb(t))
                for ack in msg.acks:
                    fut = self._acks.pop((ack.kind, ack.task_id), None)
                    if fut is not None and not fut.done():
                        fut.set_result(ack)
                for ref in msg.cancelled:
                    self.on_cancel(ref.task_id)
                if msg.stopped:
                    self._stopped.set()
        except (grpc.RpcError, asyncio.CancelledError) as e:
            if isinstance(e, grpc.RpcError) and e.code() != grpc.StatusCode.CANCELLED:
                log.info("worker stream to %s ended: %s", self.addr, e.details())
        finally:
            self.alive = False
            self._stopped.set()
            acks, self._acks = self._acks, {}
            for fut in acks.values():
                if not fut.done():
                    fut.set_exception(StreamBroken())
            self.done.set()

    # ---- up-stream, coalesced per loop pass -----------------------------------------------

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        msg, self._up = self._up, spb.WorkerUp()
        if self.alive and msg.ByteSize():
            self._outbox.put_nowait(msg)

    async def _write_loop(self) -> None:
        """The one writer of the call (grpc.aio allows one write at a time)."""
        while True:
            msg = await self._outbox.get()
            try:
                if msg is None:
                    await self._call.done_writing()
                    return
                await self._call.write(msg)
            except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError) as e:
                log.debug("worker stream write failed: %s", e)
                return

    def _await_ack(self, kind: int, task_id: str) -> asyncio.Future[spb.Ack]:
        if not self.alive:
            raise StreamBroken()
        fut = asyncio.get_running_loop().create_future()
        self._acks[(kind, task_id)] = fut
        self._schedule()
        return fut

    def add_slots(self, n: int = 1) -> None:
        if self.alive:
            self._up.add_slots += n
            self._schedule()

    async def report_outcome(self, task: Task, outcome: Outcome | Any) -> None:
        req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id)
        outcome_to_pb(req, outcome)
        if task.tenant_id:
            req.tenant_id = task.tenant_id
        fut = self._await_ack(spb.Ack.OUTCOME, task.id)
        self._up.outcomes.append(req)
        self._raise(await fut, "lease")

    async def heartbeat(self, task_id: str, shard: str, tenant: str | None) -> bool:
        req = pb.HeartbeatRequest(shard=shard, worker_id=self.worker_id, task_id=task_id)
        if tenant:
            req.tenant_id = tenant
        fut = self._await_ack(spb.Ack.HEARTBEAT, task_id)
        self._up.heartbeats.append(req)
        ack = await fut
        self._raise(ack, "lease")
        return ack.cancelled

    async def report_refresh_outcome(self, req: pb.ReportRefreshOutcomeRequest) -> None:
        fut = self._await_ack(spb.Ack.REFRESH_OUTCOME, req.task_id)
        self._up.refresh_outcomes.append(req)
        self._raise(await fut, "lease")

    def give_back(self, task: Task) -> None:
        """Return a task that will not be started (no ack awaited: if it is lost, the
        lease simply expires)."""
        if self.alive:
            ref = self._up.give_back.add(shard=task.shard, task_id=task.id)
            if task.tenant_id:
                ref.tenant_id = task.tenant_id
            self._schedule()

    @staticmethod
    def _raise(ack: spb.Ack, op: str) -> None:
        if ack.HasField("error") and ack.error.code != 0:
            raise item_error(ack.error, op=op)

    # ---- ending ----------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Ask for no more tasks; return once the server confirmed (or timeout)."""
        if self.alive:
            self._up.stop = True
            self._schedule()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Half-close and wait for the server to end the stream."""
        if self._call is None:
            return
        if self.alive:
            self._flush()
            self._outbox.put_nowait(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), timeout)
        self._call.cancel()
        for t in (self._reader, self._writer):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
