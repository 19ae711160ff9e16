"""Silo worker: lease tasks of one task group, run a handler on each, report outcomes.

    from silo.client import SiloClient
    from silo.worker import Worker

    async def handle(ctx):
        return {"echo": ctx.payload}          # → success with this result

    async with SiloClient(["127.0.0.1:7450"]) as client:
        async with Worker(client, "emails", handle, concurrency=8):
            await asyncio.Event().wait()      # run until cancelled

The handler gets a :class:`TaskContext` (``ctx.task``, ``ctx.payload``, ``ctx.cancelled``,
``await ctx.wait_cancelled()``, ``await ctx.cancel()``). It may be a coroutine function or
a plain function (run in a thread pool of ``concurrency`` threads). What it returns:

* any value → success with that value as the (msgpack-encoded) result;
* :class:`Failure` ``(code, data)`` → failure; :class:`Cancelled` ``()`` → cancelled;
* an exception → failure ``HANDLER_ERROR`` with msgpack ``{name, message, stack}``.

The loop mirrors Silo's TypeScript worker: ``pollers`` loops each lease up to
min(free slots, ``tasks_per_poll``) tasks (no shard filter, servers round-robin), then
sleep ``poll_interval`` (a poll that came back full polls again at once). A task holds
one of ``concurrency`` slots from delivery until its outcome is reported, so at most
``concurrency`` handlers run at once. Each task heartbeats every ``heartbeat_interval``
from delivery; a heartbeat reply ``cancelled=true`` sets the task's cancellation signal,
and the worker then reports Cancelled whatever the handler returns. A lost lease ("lease
not found" / "lease owner mismatch") sets the signal too, and nothing is reported.
:meth:`Worker.stop` stops polling, waits for running handlers up to its timeout, then
drops the rest (their leases simply expire).

When the server offers Silo's streaming extension (silostream.v1, see
silo.client.stream) and ``stream`` is not False, the worker does not poll: it opens one
push stream per server, which delivers tasks into free slots the moment they are ready;
outcomes and heartbeats travel on that stream (falling back to the unary calls if it
breaks), and on stop the tasks that arrive after stopping are given back at once. Against
a server without the extension (e.g. upstream Silo) it polls as described above.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from silo.client.client import SiloClient
from silo.client.errors import DuplicateTaskDelivery, LeaseLost, SiloError
from silo.client.stream import WorkStream, supports_stream
from silo.client.types import (
    Cancelled,
    Failure,
    RefreshTask,
    Success,
    Task,
    encode,
)
from silo.worker_stream import StreamingWorker

__all__ = ["Cancelled", "Failure", "RefreshContext", "Success", "TaskCancelled",
           "TaskContext", "Worker", "WorkerStats", "HANDLER_ERROR", "REFRESH_HANDLER_ERROR"]

log = logging.getLogger("silo.worker")

HANDLER_ERROR = "HANDLER_ERROR"
REFRESH_HANDLER_ERROR = "REFRESH_HANDLER_ERROR"


class TaskCancelled(Exception):
    """Raised by :meth:`TaskContext.raise_if_cancelled` once the task is cancelled."""


def serialize_error(e: BaseException) -> dict[str, str]:
    """The error object reported with HANDLER_ERROR: {name, message, stack}."""
    stack = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"name": type(e).__name__, "message": str(e), "stack": stack}


class _Execution:
    """Per-task state shared by the handler, its heartbeat timer and the reporter."""

    __slots__ = ("worker", "_event", "_thread_event", "cancel_reason", "settled")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._event = asyncio.Event()
        self._thread_event = threading.Event()
        self.cancel_reason: str | None = None  # "server" | "client" | "lease-lost"
        self.settled = False

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled (by the server or ``cancel()``) or its lease lost."""
        return self.cancel_reason is not None

    @property
    def lease_lost(self) -> bool:
        return self.cancel_reason == "lease-lost"

    def _abort(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self._event.set()
            self._thread_event.set()

    async def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Wait until the task is cancelled; False if ``timeout`` passes first."""
        if timeout is None:
            await self._event.wait()
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def wait_cancelled_sync(self, timeout: float | None = None) -> bool:
        """For sync handlers (in a thread): block until cancelled or ``timeout``."""
        return self._thread_event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        if self.cancel_reason is not None:
            raise TaskCancelled(self.cancel_reason)


class TaskContext(_Execution):
    """What a handler receives for one leased job attempt."""

    __slots__ = ("task",)

    def __init__(self, worker: Worker, task: Task) -> None:
        super().__init__(worker)
        self.task = task

    @property
    def payload(self) -> Any:
        """The decoded job payload (raises on an empty or invalid payload)."""
        return self.task.payload

    async def cancel(self) -> None:
        """Cancel this job: set the signal, ask the server (CancelJob, errors ignored); the
        worker then reports Cancelled."""
        self._abort("client")
        try:
            await self.worker.client.cancel_job(self.task.job_id, self.task.tenant_id)
        except (SiloError, OSError) as e:
            log.debug("CancelJob for %s failed: %s", self.task.job_id, e)


    def cancel_sync(self, timeout: float | None = 30.0) -> None:
        """:meth:`cancel` for sync handlers running in the worker's thread pool."""
        loop = self.worker._loop
        if loop is None:
            raise RuntimeError("the worker is not running")
        asyncio.run_coroutine_threadsafe(self.cancel(), loop).result(timeout)


class RefreshContext(_Execution):
    """What a refresh handler receives for a floating-limit refresh task."""

    __slots__ = ("task",)

    def __init__(self, worker: Worker, task: RefreshTask) -> None:
        super().__init__(worker)
        self.task = task


@dataclass(slots=True)
class WorkerStats:
    polls: int = 0
    empty_polls: int = 0
    tasks_received: int = 0
    refresh_tasks_received: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    lease_lost: int = 0
    duplicates: int = 0
    dropped: int = 0
    heartbeats: int = 0
    errors: int = 0


def _is_async_callable(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))  # noqa: B004


class Worker(StreamingWorker):
    """Runs ``handler`` for the tasks of ``task_group``; see the module docstring."""

    def __init__(
        self,
        client: SiloClient,
        task_group: str,
        handler: Callable[[TaskContext], Any],
        *,
        concurrency: int = 10,
        pollers: int = 1,
        tasks_per_poll: int | None = None,
        poll_interval: float = 1.0,
        heartbeat_interval: float = 5.0,
        worker_id: str | None = None,
        refresh_handler: Callable[[RefreshContext], Any] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        stream: bool | None = None,
    ) -> None:
        if concurrency < 1 or pollers < 1:
            raise ValueError("concurrency and pollers must be >= 1")
        self.client = client
        self.task_group = task_group
        self.handler = handler
        self.refresh_handler = refresh_handler
        self.concurrency = concurrency
        self.pollers = pollers
        self.tasks_per_poll = tasks_per_poll or math.ceil(concurrency / 2)
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.worker_id = worker_id or f"py-{uuid.uuid4()}"
        self.on_error = on_error
        self.stats = WorkerStats()
        self._handler_async = _is_async_callable(handler)
        self._refresh_async = _is_async_callable(refresh_handler)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executions: dict[str, tuple[_Execution, asyncio.Task[None]]] = {}
        self._inflight = 0  # task slots taken: running tasks + leases being requested
        self._poller_tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self._server_rr = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.use_stream = stream  # None: when the server offers it
        self._streams: list[WorkStream] = []
        self._task_stream: dict[str, WorkStream] = {}

    # ---- state -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._poller_tasks) and not self._stopping

    @property
    def active_tasks(self) -> int:
        """Tasks delivered and not yet finished (handlers running or reporting)."""
        return len(self._executions)

    @property
    def available_slots(self) -> int:
        return max(0, self.concurrency - self._inflight)

    # ---- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start polling (idempotent)."""
        if self._poller_tasks:
            return
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        if (not self._handler_async or (self.refresh_handler and not self._refresh_async)) \
                and self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="silo-worker")
        topo = await self.client.get_topology()
        if self.use_stream is not False and topo is not None:
            addrs = sorted({s.grpc_addr for s in topo.shards})
            if addrs and all([await supports_stream(self.client, a) for a in addrs]):
                share = max(1, self.concurrency // len(addrs))
                self._poller_tasks = [asyncio.ensure_future(self._stream_loop(a, share))
                                      for a in addrs]
                return
        self._poller_tasks = [asyncio.ensure_future(self._poll_loop(i))
                              for i in range(self.pollers)]

    async def stop(self, timeout: float = 30.0) -> bool:
        """Stop polling, wait up to ``timeout`` s for running tasks to finish and report,
        then drop the rest without reporting. True when nothing had to be dropped. Task
        cancellation signals are not set."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        pollers, self._poller_tasks = self._poller_tasks, []
        if pollers:
            # A lease RPC in flight is let finish, so the tasks it brings are started.
            _, pending = await asyncio.wait(pollers, timeout=max(0.0, deadline - time.monotonic()))
            for p in pending:
                p.cancel()
        clean = True
        running = [ex for _, ex in self._executions.values()]
        if running:
            _, pending = await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
            if pending:
                clean = False
                self.stats.dropped += len(pending)
                for p in pending:
                    p.cancel()
                await asyncio.wait(pending, timeout=1.0)
        streams, self._streams = self._streams, []
        for ws in streams:
            await ws.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        return clean

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no task is in flight (testing aid); False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while self._executions:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            await asyncio.wait([ex for _, ex in self._executions.values()], timeout=left)
        return True

    # ---- polling -----------------------------------------------------------------------

    def _error(self, e: BaseException) -> None:
        self.stats.errors += 1
        if self.on_error is not None:
            try:
                self.on_error(e)
            except Exception:
                log.exception("on_error callback failed")
        else:
            log.warning("worker %s: %s: %s", self.worker_id, type(e).__name__, e)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, returning early when stop() is called."""
        assert self._wake is not None
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _wait_for_slot(self) -> None:
        assert self._slot_freed is not None and self._wake is not None
        self._slot_freed.clear()
        wake = asyncio.ensure_future(self._wake.wait())
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait((wake, freed), timeout=max(self.poll_interval / 2, 0.001),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            freed.cancel()

    async def _poll_loop(self, index: int) -> None:
        while not self._stopping:
            free = self.concurrency - self._inflight
            if free <= 0:
                await self._wait_for_slot()
                continue
            n = min(free, self.tasks_per_poll)
            self._inflight += n  # reserve before the RPC so pollers never over-lease
            self._server_rr += 1
            try:
                res = await self.client.lease_tasks(self.worker_id, n, self.task_group,
                                                    server_index=self._server_rr)
            except asyncio.CancelledError:
                self._inflight -= n
                raise
            except Exception as e:
                self._inflight -= n
                self._error(e)
                await self._sleep(self.poll_interval)
                continue
            self.stats.polls += 1
            got = len(res.tasks)
            self._inflight -= n - got
            if got == 0 and not res.refresh_tasks:
                self.stats.empty_polls += 1
            self.stats.tasks_received += got
            for t in res.tasks:
                self._start_task(t)
            for r in res.refresh_tasks:
                self._start_refresh(r)
            if got < n:
                await self._sleep(self.poll_interval)

    def _release(self, task_id: str, counted: bool) -> None:
        self._executions.pop(task_id, None)
        ws = self._task_stream.pop(task_id, None)
        if counted:
            self._inflight -= 1
            if ws is not None:
                ws.add_slots(1)
            if self._slot_freed is not None:
                self._slot_freed.set()

    def _start_task(self, task: Task) -> None:
        if task.id in self._executions:
            self.stats.duplicates += 1
            self._inflight -= 1
            self._error(DuplicateTaskDelivery(task.id))
            return
        ctx = TaskContext(self, task)
        ex = asyncio.ensure_future(self._execute(ctx))
        self._executions[task.id] = (ctx, ex)

    def _start_refresh(self, task: RefreshTask) -> None:
        self.stats.refresh_tasks_received += 1
        if task.id in self._executions:
            self.stats.duplicates += 1
            self._error(DuplicateTaskDelivery(task.id))
            return
        ctx = RefreshContext(self, task)
        ex = asyncio.ensure_future(self._execute_refresh(ctx))
        self._executions[task.id] = (ctx, ex)

    # ---- one task ------------------------------------------------------------------------

    async def _heartbeat_loop(self, ex: _Execution, task_id: str, shard: str,
                              tenant: str | None) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if ex.settled:
                return
            try:
                cancelled = await self._heartbeat(task_id, shard, tenant)
            except LeaseLost as e:
                if not ex.settled:
                    log.info("worker %s: lost the lease of task %s: %s", self.worker_id,
                             task_id, e)
                    ex._abort("lease-lost")
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not ex.settled:
                    self._error(e)
                continue
            self.stats.heartbeats += 1
            if cancelled and not ex.settled:
                ex._abort("server")

    async def _call(self, fn: Callable[[Any], Any], is_async: bool, ctx: _Execution) -> Any:
        if is_async:
            r = fn(ctx)
        else:
            loop = asyncio.get_running_loop()
            call = functools.partial(contextvars.copy_context().run, fn, ctx)
            r = await loop.run_in_executor(self._executor, call)
        if inspect.isawaitable(r):
            r = await r
        return r

    async def _execute(self, ctx: TaskContext) -> None:
        task = ctx.task
        hb = asyncio.ensure_future(self._heartbeat_loop(ctx, task.id, task.shard,
                                                        task.tenant_id))
        try:
            try:
                result = await self._call(self.handler, self._handler_async, ctx)
                outcome = result if isinstance(result, Success | Failure | Cancelled) \
                    else Success(result)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                outcome = Failure(HANDLER_ERROR, serialize_error(e))
            ctx.settled = True
            hb.cancel()
            if ctx.lease_lost:
                self.stats.lease_lost += 1
                return
            if ctx.cancelled:
                outcome = Cancelled()
            await self._report(task, outcome)
        finally:
            ctx.settled = True
            hb.cancel()
            self._release(task.id, counted=True)

    async def _report(self, task: Task, outcome: Success | Failure | Cancelled) -> None:
        if isinstance(outcome, Success):
            try:
                encode(outcome.result)
            except (TypeError, ValueError, OverflowError) as e:
                outcome = Failure(HANDLER_ERROR, serialize_error(
                    TypeError(f"handler result cannot be msgpack-encoded: {e}")))
        elif isinstance(outcome, Failure) and not isinstance(outcome.data, bytes | bytearray):
            try:
                encode(outcome.data)
            except (TypeError, ValueError, OverflowError) as e:
                outcome = Failure(outcome.code, {"message": f"unencodable failure data: {e}"})
        try:
            await self._report_outcome(task, outcome)
        except LeaseLost as e:
            self.stats.lease_lost += 1
            log.info("worker %s: task %s lease lost before its outcome was reported: %s",
                     self.worker_id, task.id, e)
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._error(e)
            return
        if isinstance(outcome, Success):
            self.stats.succeeded += 1
        elif isinstance(outcome, Failure):
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1

    async def _execute_refresh(self, ctx: RefreshContext) -> None:
        task = ctx.task
        hb = asyncio.ensure_future(self._heartbeat_loop(ctx, task.id, task.shard,
                                                        task.tenant_id))
        try:
            new_max: int | None = None
            err_msg = ""
            if self.refresh_handler is None:
                err_msg = ("received a floating limit refresh task but no refresh_handler "
                           "(refreshHandler) is configured")
                self._error(SiloError(err_msg))
            else:
                try:
                    new_max = int(await self._call(self.refresh_handler, self._refresh_async,
                                                   ctx))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    err_msg = str(e) or type(e).__name__
            ctx.settled = True
            hb.cancel()
            if ctx.lease_lost:
                return
            try:
                if new_max is not None:
                    await self.client.report_refresh_outcome(
                        task.id, task.shard, new_max_concurrency=new_max, tenant=task.tenant_id)
                else:
                    await self.client.report_refresh_outcome(
                        task.id, task.shard, error_code=REFRESH_HANDLER_ERROR,
                        error_message=err_msg, tenant=task.tenant_id)
            except LeaseLost:
                pass
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._error(e)
        finally:
            ctx.settled = True
            hb.cancel()
            self._release(task.id, counted=False)
