"""The push-stream half of silo.worker.Worker (silostream.v1, see silo.client.stream).

A mixin so the polling worker stays readable: one stream per server, kept open (and
reopened when it breaks) until stop(); tasks it pushes start at once, or are given back
when the worker is stopping; heartbeats and outcomes of its tasks go up the same stream
and fall back to the unary calls when it is gone. Everything else (slots, handlers,
reports) is Worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING

from silo.client.stream import StreamBroken, WorkStream
from silo.client.types import Cancelled, Failure, Success, Task

if TYPE_CHECKING:
    from silo.worker import Worker


class StreamingWorker:
    async def _stream_loop(self: Worker, addr: str, share: int) -> None:
        """Keep one push stream to addr open until stop(); reconnect when it breaks."""
        assert self._wake is not None
        backoff = 0.1
        while not self._stopping:
            ws = WorkStream(self.client, addr, self.worker_id, self.task_group,
                            max(0, min(share, self.concurrency - self._inflight)),
                            on_task=None, on_refresh=self._start_refresh,
                            on_cancel=self._cancelled_by_server)
            ws.on_task = functools.partial(self._stream_task, ws)
            try:
                await ws.start()
            except Exception as e:
                self._error(e)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self._streams.append(ws)
            backoff = 0.1
            wake = asyncio.ensure_future(self._wake.wait())
            done = asyncio.ensure_future(ws.done.wait())
            await asyncio.wait((wake, done), return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            done.cancel()
            if self._stopping:
                await ws.stop(timeout=5.0)
                return
            self._streams.remove(ws)
            await ws.close()
            await self._sleep(backoff)

    def _stream_task(self: Worker, ws: WorkStream, task: Task) -> None:
        self.stats.tasks_received += 1
        if self._stopping:
            ws.give_back(task)  # never started: back to its queue at once
            return
        self._inflight += 1
        if task.id in self._executions:
            ws.add_slots(1)  # _start_task counts the duplicate and gives its slot back
        else:
            self._task_stream[task.id] = ws
        self._start_task(task)

    def _cancelled_by_server(self: Worker, task_id: str) -> None:
        entry = self._executions.get(task_id)
        if entry is not None and not entry[0].settled:
            entry[0]._abort("server")

    async def _heartbeat(self: Worker, task_id: str, shard: str, tenant: str | None) -> bool:
        ws = self._task_stream.get(task_id)
        if ws is not None and ws.alive:
            with contextlib.suppress(StreamBroken):
                return await ws.heartbeat(task_id, shard, tenant)
        return await self.client.heartbeat(self.worker_id, task_id, shard, tenant)

    async def _report_outcome(self: Worker, task: Task, outcome: Success | Failure | Cancelled) -> None:
        ws = self._task_stream.get(task.id)
        if ws is not None and ws.alive:
            with contextlib.suppress(StreamBroken):
                return await ws.report_outcome(task, outcome)
        await self.client.report_outcome(task.id, task.shard, outcome, task.tenant_id)
